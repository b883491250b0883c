"""Entry point of the `mergetune` CLI; each area registers its own commands here.

Heavy libraries (torch, ray, lm-eval) are imported inside the commands, so `--help`
and config errors answer fast.
"""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console
from rich.text import Text

from mergetune.core.errors import MergetuneError

app = typer.Typer(
    name="mergetune",
    help="Auto-tune LLM model merges: search per-layer merge recipes, score them, export the best.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


# --- command registration (one line per area) ---
from mergetune.studies.cli import register as _register_studies  # noqa: E402
_register_studies(app)
from mergetune.search.cli import register as _register_search  # noqa: E402
_register_search(app)
from mergetune.zoo.cli import register as _register_zoo  # noqa: E402
_register_zoo(app)
from mergetune.merge.cli import register as _register_merge  # noqa: E402
_register_merge(app)
# --- end of command registration ---


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors become one red line on stderr and exit code 2."""
    try:
        app(args=argv, standalone_mode=True)
    except MergetuneError as exc:
        # The message is user text (paths, `[low, high]`): never read as rich markup.
        Console(stderr=True).print(Text.assemble(("error:", "bold red"), " ", str(exc)), highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:  # a Ctrl-C outside a study run: nothing to clean up
        Console(stderr=True).print("interrupted", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
