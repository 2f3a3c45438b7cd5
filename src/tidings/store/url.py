"""Stores named by URL: ``EventBus(store="sqlite:///events.db")``."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..exceptions import ConfigurationError

if TYPE_CHECKING:
    from .base import Store

__all__ = ["store_from_url"]


def store_from_url(url: str) -> Store:
    """The store a URL names.

    - ``memory://``: a :class:`~tidings.store.MemoryStore`.
    - ``sqlite:///events.db`` (relative to the working directory) or ``sqlite:////var/lib/app/events.db``
      (absolute): a :class:`~tidings.store.SQLiteStore`.
    - ``postgresql://user@host/db`` (or ``postgres://``), optionally with ``?schema=name``: a
      :class:`~tidings.store.postgres.PostgresStore` (needs the ``postgres`` extra).

    Raises:
        ConfigurationError: a URL that cannot be read, an unknown scheme, or a URL without the
            part its store needs (the message shows the URL with its password masked).

    Example:
        >>> store_from_url("sqlite:///events.db")
        <SQLiteStore 'events.db' closed>
        >>> store_from_url("memory://")
        <MemoryStore 0 dead letter(s)>
    """
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # "Invalid IPv6 URL": said without the URL, which may hold a password
        raise ConfigurationError(f"the store URL cannot be read: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme == "memory":
        from .memory import MemoryStore

        return MemoryStore()
    if scheme == "sqlite":
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if parts.netloc or not path:
            raise ConfigurationError(
                f"a SQLite store URL is sqlite:///relative.db or sqlite:////abs.db, got {_masked(url)!r}"
            )
        from .sqlite import SQLiteStore

        return SQLiteStore(path)
    if scheme in ("postgresql", "postgres"):
        query = parse_qsl(parts.query, keep_blank_values=True)
        schema = next((value for key, value in query if key == "schema"), None)
        rest = urlencode([(key, value) for key, value in query if key != "schema"])
        from .postgres import PostgresStore

        return PostgresStore(urlunsplit(parts._replace(query=rest)), schema=schema)
    raise ConfigurationError(
        f"unknown store URL scheme {parts.scheme!r} in {_masked(url)!r}: use memory, sqlite or postgresql"
    )


def _masked(url: str) -> str:
    """``url`` with its password replaced by ``***``: errors end up in logs and on terminals."""
    parts = urlsplit(url)
    user, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in user:
        return url
    return urlunsplit(parts._replace(netloc=f"{user.partition(':')[0]}:***@{host}"))
