"""User-facing errors.

Every problem caused by the user's input (a bad flag, a missing file, a model we do not support)
is raised as a ``LosaError`` subclass whose message names the problem and the fix. The CLI prints
such errors as one line and exits with status 2; anything else is a bug and keeps its traceback.
"""


class LosaError(Exception):
    """Base class of errors caused by user input or environment, not by a bug."""


class ConfigError(LosaError, ValueError):
    """An invalid setting (sparsity out of range, bad N:M pattern, unknown key, ...)."""


class DataError(LosaError):
    """Data that cannot be used (missing file, too few tokens, malformed jsonl, no network)."""


class ModelError(LosaError):
    """A model that cannot be loaded or is not supported."""


class OutputError(LosaError):
    """An output location that cannot be written (exists without --overwrite, read-only)."""


class TrainingError(LosaError):
    """Training diverged (NaN / inf loss); the last good state is kept."""
