"""CLI commands of the merge area: `merge` (standalone, disk to disk), `stats fisher|gram`, `moments compress`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console


def register(app: typer.Typer) -> None:
    console = Console()

    @app.command("merge")
    def merge(
        recipe: Path = typer.Argument(..., help="Recipe YAML (or JSON): models, base, rules; or a mergekit-yaml config."),
        out: Path = typer.Option(..., "--out", "-o", help="Output model directory."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed of random methods (default: the recipe's)."),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
        force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
        shard_gb: float = typer.Option(5.0, "--shard-gb", help="Largest safetensors shard, in GiB."),
        strict: bool = typer.Option(False, "--strict", help="Refuse experts with tensors the base lacks (default: drop them with a warning)."),
    ) -> None:
        """Merge a recipe (or a mergekit-yaml config) into a Hugging Face model directory (our `mergekit-yaml`)."""
        from mergetune.core.fs import check_output_dir
        from mergetune.merge.engine import merge_recipe_to_dir
        from mergetune.merge.mergekit_config import load_recipe

        check_output_dir(out, force)
        parsed = load_recipe(recipe)
        if parsed.dataflow is not None:  # a data-flow path: its folded model (studies/dataflow_export.py)
            from mergetune.core.fs import atomic_output_dir
            from mergetune.studies.dataflow_export import write_path_model

            with atomic_output_dir(out, force=force) as tmp:
                write_path_model(parsed, tmp, device=device)
            console.print(f"wrote the {len(parsed.dataflow.slots)}-layer data-flow path model into {out}", markup=False)
            return
        timings = merge_recipe_to_dir(
            parsed, out, seed=seed, device=device, force=force, progress=True,
            max_shard_bytes=int(shard_gb * 1024**3), strict=strict,
        )  # fmt: skip
        console.print(f"merged into {out} in {timings['total_s']:.1f}s", markup=False)

    @app.command("import")
    def import_mergekit(
        config: Path = typer.Argument(..., help="A mergekit-yaml config."),
        out: Path = typer.Option(..., "--out", "-o", help="Recipe YAML to write."),
        force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    ) -> None:
        """Translate a mergekit-yaml config into a mergetune recipe (`mergetune merge` also runs one directly)."""
        from mergetune.core.errors import ConfigError, OutputExistsError
        from mergetune.core.config import load_yaml
        from mergetune.merge.mergekit_config import is_mergekit_config, load_recipe

        if out.exists() and not force:
            raise OutputExistsError(f"{out} exists; pass --force to replace it")
        recipe = load_recipe(config)  # one line for a missing file, bad YAML or a multi-document config
        if not is_mergekit_config(load_yaml(config)):
            raise ConfigError(f"{config}: not a mergekit config (it has no merge_method:)")
        out.write_text(recipe.to_yaml())
        console.print(f"wrote {out} ({len(recipe.rules)} rule(s), {len(recipe.experts)} expert(s))", markup=False)

    stats_app = typer.Typer(help="Calibration statistics for Fisher averaging and RegMean.", no_args_is_help=True)
    app.add_typer(stats_app, name="stats")

    def stats_command(kind: str, summary: str):
        def command(
            model: str = typer.Argument(..., help="Model directory (the expert the statistic belongs to)."),
            data: Path = typer.Option(..., "--data", help='Calibration JSONL of {"prompt", "answer"} records.'),
            out: Path = typer.Option(..., "--out", "-o", help="Output safetensors file."),
            limit: Optional[int] = typer.Option(None, "--limit", help="Use the first N records."),
            batch_size: int = typer.Option(16, "--batch-size", help="Batch size of the forward passes (gram)."),
            device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
            force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
        ) -> None:
            from mergetune.merge.engine import check_device
            from mergetune.merge.stats import compute_stats_file

            check_device(device)
            path = compute_stats_file(kind, model, data, out, limit=limit, batch_size=batch_size, device=device, force=force)
            console.print(f"wrote {path}", markup=False)

        command.__doc__ = summary
        return command

    stats_app.command("fisher")(
        stats_command("fisher", "Diagonal Fisher: mean squared gradients of the answer loss, keyed by parameter name.")
    )
    stats_app.command("gram")(
        stats_command("gram", "RegMean Gram matrices XᵀX/#tokens of every linear layer's inputs, keyed by its weight name.")
    )

    moments_app = typer.Typer(help="Adam second-moment files (OTA/FFG inputs).", no_args_is_help=True)
    app.add_typer(moments_app, name="moments")

    @moments_app.command("compress")
    def compress(
        src: Path = typer.Argument(..., help="adam_second_moments.safetensors (full form)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output file (rank-1 form)."),
        force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    ) -> None:
        """Rank-1 row/column factorisation of 2-D second moments; OTA/FFG read either form."""
        from mergetune.core.errors import OutputExistsError
        from mergetune.merge.moments import compress_moments

        if out.exists() and not force:
            raise OutputExistsError(f"{out} exists; pass --force to replace it")
        counts = compress_moments(src, out)
        ratio = counts["elements_before"] / max(counts["elements_after"], 1)
        console.print(f"wrote {out}: {counts['elements_before']:,} → {counts['elements_after']:,} values ({ratio:.0f}× smaller)", markup=False)
