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


class AdapterExistsError(LoradError):
    """An upload names an adapter id that already exists and did not ask to replace it."""


class LimitExceededError(LoradError):
    """A server limit was reached (too many pins, an upload too large, too many uploads at once)."""


class AdapterDoesNotFitError(LoradError):
    """An adapter this server, as configured, cannot hold (its modules_to_save copies exceed the
    device budget, or pinned adapters hold the rest of it): retrying will not help."""


class IntegrityError(LoradError):
    """Received files do not match the digest the sender announced."""


class UnauthenticatedError(LoradError):
    """A call carries no credential, or one the server does not accept."""


class ReadOnlyAdaptersError(LoradError):
    """The adapters folder cannot be written (a read-only mount): it serves, nothing is published."""


class PermissionDeniedError(LoradError):
    """The caller is known but may not do this (or the feature is disabled on this server)."""
