from __future__ import annotations

from typing import Any

import pytest

from tidings import ConfigurationError, Event, EventBus
from tidings._core.registry import HandlerSpec, Registry, is_pattern


def spec(target: object, *, batch: bool = False, timeout: float | None = None) -> HandlerSpec:
    return HandlerSpec.from_target(target, batch=batch, timeout=timeout)


def first(event: Event) -> None: ...
def second(event: Event) -> None: ...
def third(event: Event) -> None: ...


def test_exact_and_wildcard_resolve_in_registration_order() -> None:
    registry = Registry()
    a, b, c = spec(first), spec(second), spec(third)
    registry.add("user.*", a)
    registry.add("user.created", b)
    registry.add("*", c)
    assert registry.resolve("user.created") == (a, b, c)
    assert registry.resolve("user.email.changed") == (a, c)  # '*' matches dots too
    assert registry.resolve("order.placed") == (c,)
    assert registry.resolve("USER.created") == (c,)  # case-sensitive


def test_question_mark_and_character_classes() -> None:
    registry = Registry()
    a = spec(first)
    registry.add("order.v[12]", a)
    registry.add("job.?", a)
    assert registry.resolve("order.v1") == (a,)
    assert registry.resolve("order.v3") == ()
    assert registry.resolve("job.x") == (a,)
    assert registry.resolve("job.xy") == ()


def test_cache_is_invalidated_by_a_new_registration() -> None:
    registry = Registry()
    a, b = spec(first), spec(second)
    registry.add("a", a)
    assert registry.resolve("a") == (a,)
    registry.add("*", b)
    assert registry.resolve("a") == (a, b)


def test_cache_is_bounded() -> None:
    registry = Registry()
    registry.add("*", spec(first))
    for i in range(5000):
        registry.resolve(f"name.{i}")
    assert len(registry._cache) <= 4096


@pytest.mark.parametrize("pattern", ["", 3, None])
def test_bad_patterns_fail_at_registration(pattern: Any) -> None:
    with pytest.raises(ConfigurationError, match="non-empty str"):
        Registry().add(pattern, spec(first))


def test_is_pattern() -> None:
    assert is_pattern("user.*") and is_pattern("a?") and is_pattern("[ab]")
    assert not is_pattern("user.created")


def test_handler_kinds_are_detected_once() -> None:
    async def coroutine(event: Event) -> None: ...

    class AsyncCallable:
        async def __call__(self, event: Event) -> None: ...

    class Forwarder:
        async def handle_many(self, events: list[Event]) -> None: ...

    class OneByOne:
        def handle(self, event: Event) -> None: ...

    assert spec(coroutine).is_async and not spec(coroutine).batch
    assert not spec(first).is_async
    assert spec(AsyncCallable()).is_async
    forwarder = spec(Forwarder())
    assert forwarder.batch and forwarder.is_async
    one = spec(OneByOne())
    assert not one.batch and not one.is_async
    assert one.name.endswith("OneByOne")
    assert spec(first).name == f"{__name__}.first"


def test_invalid_handlers_and_timeouts_fail_at_registration() -> None:
    with pytest.raises(ConfigurationError, match="callable"):
        spec(42)
    with pytest.raises(ConfigurationError, match="timeout"):
        spec(first, timeout=0)
    bus = EventBus()
    with pytest.raises(ConfigurationError, match="at least one"):
        bus.subscribe(first)
    with pytest.raises(ConfigurationError, match="timeout"):
        bus.on("a", timeout=-1)(first)


def test_on_returns_the_function_and_applies_the_default_timeout() -> None:
    bus = EventBus(handler_timeout=7)
    assert bus.on("a", "b")(first) is first
    assert bus.subscribe(second, "c", timeout=None).timeout is None
    specs = [s.handler for s in bus.registry]
    assert [s.pattern for s in bus.registry] == ["a", "b", "c"]
    assert specs[0].timeout == 7
    assert len(bus.registry) == 3


def test_a_handler_class_or_a_method_that_cannot_take_the_event_is_refused_at_registration() -> None:
    # Both used to be accepted: every event then failed with a TypeError, into the dead letters.
    bus = EventBus()

    class AnalyticsForwarder:
        async def handle_many(self, events: list[Event]) -> None: ...

    class NeedsMore:
        async def handle(self, event: Event, extra: str) -> None: ...

    with pytest.raises(ConfigurationError, match=r"AnalyticsForwarder is a class: register an instance"):
        bus.subscribe(AnalyticsForwarder, "*")
    with pytest.raises(ConfigurationError, match=r"its handle\(\) cannot be called with the event alone"):
        bus.subscribe(NeedsMore(), "*")
    bus.subscribe(AnalyticsForwarder(), "*")  # an instance is what was meant
    assert len(bus.registry) == 1
