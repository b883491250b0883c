"""lm-eval parity on a zoo: our LmEvalEvaluator on each saved model equals the `lm_eval` CLI on the same tasks and limit.

The tests check this on the tiny zoo; this script checks the demo zoo (base and every expert,
every task's `test` split, lm-eval's own `--limit`: the first N items).

    .venv/bin/python benchmarks/lm_eval_parity.py [--zoo zoo-demo] [--limit 40]

Prints a table and writes benchmarks/results/lm_eval_parity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from _common import git_commit  # benchmarks/, the script's own folder
from mergetune.evaluators.base import HFBackend, build_evaluator

RESULTS = Path(__file__).resolve().parent / "results"


def cli_scores(zoo: Path, model: Path, tasks: list[str], limit: int, batch_size: int) -> dict[str, float]:
    """Exact match per task from lm-eval's CLI on the saved model (offline)."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as out:
        command = [
            str(Path(sys.executable).with_name("lm_eval")), "--model", "hf", "--model_args", f"pretrained={model}",
            "--device", "cpu", "--batch_size", str(batch_size), "--include_path", str(zoo / "tasks"),
            "--tasks", ",".join(f"zoo_{t}" for t in tasks), "--limit", str(limit), "--output_path", out,
        ]  # fmt: skip
        subprocess.run(command, check=True, env=env, capture_output=True)
        (results,) = Path(out).rglob("results_*.json")
        found = json.loads(results.read_text())["results"]
    return {t: found[f"zoo_{t}"]["exact_match,none"] for t in tasks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("zoo-demo"))
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    zoo = args.zoo.resolve()
    tasks = list(json.loads((zoo / "zoo.json").read_text())["tasks"])
    evaluator = build_evaluator(
        {
            "kind": "lm_eval",
            "tasks": {t: {"search": f"zoo_{t}_search", "test": f"zoo_{t}"} for t in tasks},
            "include_path": str(zoo / "tasks"),
            "limit": args.limit,
            "seed": None,  # lm-eval's own limit: the first items, as the CLI takes them
            "batch_size": args.batch_size,
        }
    )
    models = {"base": zoo / "base", **{d.name: d for d in sorted((zoo / "experts").iterdir()) if d.is_dir()}}
    rows = []
    for name, path in models.items():
        ours = evaluator.evaluate(HFBackend.from_pretrained(path, "cpu"), split="test")
        theirs = cli_scores(zoo, path, tasks, args.limit, args.batch_size)
        rows.append({"model": name, "ours": ours, "cli": theirs, "equal": ours == theirs})

    table = Table(title=f"{zoo.name}: exact match on test (limit {args.limit}), ours / lm_eval CLI")
    for column in ("model", *tasks, "equal"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        table.add_row(row["model"], *(f"{row['ours'][t]:.3f} / {row['cli'][t]:.3f}" for t in tasks), str(row["equal"]))
    console = Console()
    console.print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "lm_eval_parity.json"
    out.write_text(json.dumps({"zoo": str(zoo), "limit": args.limit, "commit": git_commit(), "rows": rows}, indent=2))
    console.print(f"all equal: {all(r['equal'] for r in rows)}; wrote {out}")


if __name__ == "__main__":
    main()
