"""User-facing errors: each is printed by `main` as one line and exits non-zero.

Raise these for anything a user can fix (a config key, an input file, a checkpoint directory); the message must name
the key or file:line and the bad value, and say what would be accepted.
"""


class UserError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""


class ConfigError(UserError, ValueError):
    """A config key has an unknown name or a bad value."""


class DataError(UserError, ValueError):
    """An input file is missing or malformed; the message names file:line."""


class CheckpointError(UserError):
    """A checkpoint directory does not fit the run that tries to resume from it."""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (a non-finite loss under the default `nan_policy`)."""
