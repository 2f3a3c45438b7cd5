"""fastapi-events' small helpers: ``strtobool`` (how its environment variables are read) and ``chunk``."""

from __future__ import annotations

from itertools import islice
from typing import TYPE_CHECKING, Final, TypeVar

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

__all__ = ["chunk", "strtobool"]

T = TypeVar("T")

_TRUE: Final = frozenset({"y", "yes", "t", "true", "on", "1"})
_FALSE: Final = frozenset({"n", "no", "f", "false", "off", "0"})


def strtobool(val: str) -> bool:
    """Read a truth value the way ``distutils.util.strtobool`` did.

    Raises:
        ValueError: ``val`` is neither true (``y``, ``yes``, ``t``, ``true``, ``on``, ``1``) nor
            false (``n``, ``no``, ``f``, ``false``, ``off``, ``0``), in any case.

    Example:
        >>> strtobool("Yes"), strtobool("0")
        (True, False)
    """
    lowered = val.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"invalid truth value {val}")


def chunk(it: Iterable[T], size: int) -> Iterator[tuple[T, ...]]:
    """Split ``it`` into tuples of ``size`` items (the last one may be shorter).

    Example:
        >>> list(chunk(range(5), 2))
        [(0, 1), (2, 3), (4,)]
    """
    iterator = iter(it)
    return iter(lambda: tuple(islice(iterator, size)), ())
