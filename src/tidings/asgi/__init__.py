"""ASGI integration: one pure ASGI middleware that also runs the bus's lifecycle."""

from .middleware import TidingsMiddleware as TidingsMiddleware

__all__ = ["TidingsMiddleware"]
