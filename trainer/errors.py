"""Typed exceptions of `lorad train`. Each message is a sentence a user can act on; the CLI
prints it and exits non-zero. `ConfigError` (a bad YAML key or value) comes from lorad.errors."""

from lorad.errors import ConfigError, LoradError

__all__ = ["ConfigError", "DataError", "CheckpointError", "ResumeMismatchError", "TrainingDivergedError", "PushError"]


class DataError(LoradError, ValueError):
    """A dataset file or row cannot be turned into a training sample; the message names file, row and field."""


class CheckpointError(LoradError):
    """No usable checkpoint where one was asked for, or a checkpoint that cannot be read."""


class ResumeMismatchError(CheckpointError):
    """The config differs from the one the checkpoint was written with; the message lists every difference."""


class TrainingDivergedError(LoradError):
    """The loss became NaN or infinite."""


class PushError(LoradError):
    """The adapter could not be handed to a running server."""
