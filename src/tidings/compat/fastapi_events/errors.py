"""The exceptions of fastapi-events, with its names and its hierarchy.

The tree::

    FastapiEventError                       a BaseException, as in fastapi-events
    ├── ConfigurationError                  a handler or middleware option that cannot work
    ├── MissingEventNameError
    │   ├── MissingEventNameDuringRegistration   a schema registered with no event name
    │   └── MissingEventNameDuringDispatch       dispatch() could not tell the event's name
    └── MultiplePayloadsDetectedDuringDispatch   a model and a payload given together (also a ValueError)

``FastapiEventError`` derives from ``BaseException``, not ``Exception``, because fastapi-events' does:
code that catches these by name keeps working, and ``except Exception`` does not catch them, exactly
as before the move.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "FastapiEventError",
    "MissingEventNameDuringDispatch",
    "MissingEventNameDuringRegistration",
    "MissingEventNameError",
    "MultiplePayloadsDetectedDuringDispatch",
]


class FastapiEventError(BaseException):
    """Base of every exception of this compatibility layer."""


class ConfigurationError(FastapiEventError):
    """An option or a handler that cannot work."""


class MissingEventNameError(FastapiEventError):
    """An event name could not be determined."""


class MissingEventNameDuringRegistration(MissingEventNameError):
    """Raised by ``registry.register()`` for a schema with neither ``event_name=`` nor ``__event_name__``."""

    def __init__(self) -> None:
        super().__init__(
            "Event name cannot be determined during schema registration. "
            "Please ensure '__event_name__' is defined in your payload schema "
            "or 'event_name' is provided to @payload_schema.register() as a kwarg."
        )


class MissingEventNameDuringDispatch(MissingEventNameError):
    """Raised by ``dispatch()`` when nothing names the event (no name, no ``__event_name__``)."""

    def __init__(self) -> None:
        super().__init__(
            "Event name cannot be determined during dispatch. "
            "Please ensure 'event_name' is provided to dispatch() as an argument "
            "or '__event_name__' is defined in your payload schema."
        )


class MultiplePayloadsDetectedDuringDispatch(FastapiEventError, ValueError):
    """Raised by ``dispatch()`` when given a model to dispatch and a ``payload`` as well."""

    def __init__(self) -> None:
        super().__init__(
            "Multiple payloads detected during dispatch. "
            "Please ensure you're not providing both dict and pydantic.Model at the same time."
        )
