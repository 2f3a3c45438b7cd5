"""The event log: where deliveries and dead letters are kept.

``MemoryStore`` (the default) keeps dead letters in memory and records nothing else; ``SQLiteStore``
records every (event, handler) delivery durably in one file, so a crash loses nothing. Both follow the
:class:`Store` protocol, and one conformance suite (tests/store) holds every store to it.
"""

from .base import DeadLetter as DeadLetter
from .base import Delivery as Delivery
from .base import Store as Store
from .base import UnreadableLetter as UnreadableLetter
from .memory import MemoryStore as MemoryStore
from .sqlite import SQLiteStore as SQLiteStore
from .url import store_from_url as store_from_url

__all__ = [
    "DeadLetter",
    "Delivery",
    "MemoryStore",
    "SQLiteStore",
    "Store",
    "UnreadableLetter",
    "store_from_url",
]
