"""Pieces every mergetune subpackage shares: user-facing errors and safe output directories."""

from mergetune.core.errors import ConfigError, MergetuneError, OutputExistsError
from mergetune.core.fs import atomic_output_dir

__all__ = ["ConfigError", "MergetuneError", "OutputExistsError", "atomic_output_dir"]
