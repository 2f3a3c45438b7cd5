from __future__ import annotations

import time
from datetime import UTC, datetime

from tidings import Event

CROCKFORD = set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")


def test_ids_are_unique_ulids_sorted_by_emit_order() -> None:
    now = time.time_ns()
    events = [Event("a", timestamp_ns=now + i) for i in range(1000)]
    ids = [e.id for e in events]
    assert len(set(ids)) == 1000
    assert ids == sorted(ids)
    assert all(len(i) == 26 and set(i) <= CROCKFORD for i in ids)


def test_id_is_stable_and_time_is_utc() -> None:
    stamp = 1_700_000_000_123_000_000
    event = Event("user.created", {"id": 1}, timestamp_ns=stamp)
    assert event.id == event.id
    assert event.time == datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)
    assert "user.created" in repr(event) and event.id in repr(event)


def test_ids_of_later_milliseconds_sort_later() -> None:
    early = Event("a", timestamp_ns=1_000_000_000_000_000_000)
    late = Event("a", timestamp_ns=1_000_000_000_001_000_000)
    assert early.id < late.id


def test_explicit_id_and_headers_are_kept() -> None:
    event = Event("a", timestamp_ns=0, id="X" * 26, headers={"correlation-id": "c1"})
    assert event.id == "X" * 26
    assert event.headers == {"correlation-id": "c1"}
    assert Event("b", timestamp_ns=0).headers == {}
