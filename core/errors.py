"""Errors a user can cause and fix; the CLI prints them as one line, without a traceback."""


class MergetuneError(Exception):
    """Base class: the message says what went wrong and what to do about it."""

    exit_code = 2


class ConfigError(MergetuneError):
    """A config or recipe file is malformed or names something that does not exist."""


class OutputExistsError(MergetuneError):
    """The output directory exists and is not empty, and --force was not given."""


class ModelSetError(MergetuneError):
    """The base model and fine-tunes do not fit together (names, shapes, dtypes, statistics)."""


class DiskFullError(MergetuneError):
    """The disk filled up while writing; nothing partial is left behind."""


class NonFiniteMergeError(MergetuneError):
    """A merged tensor came out with NaN or inf values; the merge stops (a disk merge writes nothing)."""
