"""The `mergetune zoo` commands: build the miniature capability zoo."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def build(
    out: Path = typer.Argument(..., help="output directory (created; must be absent or empty unless --force)"),
    preset: str = typer.Option("demo", "--preset", help="tiny (seconds, for tests) or demo (minutes)"),
    seed: int = typer.Option(0, "--seed", help="seed of the data, the initialisation and the batch order"),
    force: bool = typer.Option(False, "--force", help="replace an existing non-empty OUT"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch threads (default: torch's choice)"),
    allow_weak: bool = typer.Option(
        False, "--allow-weak", help="keep a zoo that misses the demo acceptance (the build fails on it otherwise)"
    ),
) -> None:
    """Train a base model and one SFT expert per task on CPU; write models, task data, lm-eval tasks, zoo.json."""
    from mergetune.core.fs import check_output_dir
    from mergetune.zoo.presets import get_preset

    # Fail on user errors before the heavy imports and minutes of training.
    get_preset(preset)
    check_output_dir(out.absolute(), force)

    import torch
    import transformers

    from mergetune.zoo.build import build_zoo

    transformers.utils.logging.disable_progress_bar()  # rich shows the progress
    if threads is not None:
        torch.set_num_threads(threads)
    build_zoo(out, preset, seed=seed, force=force, allow_weak=allow_weak)


def register(app: typer.Typer) -> None:
    zoo = typer.Typer(help="Build the miniature capability zoo (base + per-task experts) offline.", no_args_is_help=True)
    zoo.command("build")(build)
    app.add_typer(zoo, name="zoo")
