"""Typed exceptions shared by every lorad component.

Each carries a sentence a user can act on. The gRPC layer (lorad.server) maps them to status
codes; the CLI prints them and exits non-zero. Nothing here knows about gRPC.
"""


class LoradError(Exception):
    """Base class: an error whose message is meant for the user."""


class ConfigError(LoradError, ValueError):
    """A configuration value is invalid; the message names the field."""


class BaseModelError(LoradError):
    """The base model cannot be resolved or loaded."""


class AdapterNotFoundError(LoradError):
    """No adapter with this id exists."""


class InvalidAdapterError(LoradError):
    """An adapter exists but its files are unusable (format, shapes, values)."""


class InvalidRequestError(LoradError, ValueError):
    """A request parameter is out of range, or the prompt does not fit."""


class QueueFullError(LoradError):
    """The server's bounded request queue is full; retry later."""


class ClientTooSlowError(LoradError):
    """A streaming client did not read its responses; its request was cancelled."""


class DeadlineExceededError(LoradError):
    """The request's deadline passed before it finished."""


class EngineStoppedError(LoradError):
    """The engine is shutting down or has stopped."""
