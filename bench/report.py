"""Turn raw samples into medians, ratios, target checks and a Markdown table."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .apps import SystemName

__all__ = ["COLUMNS", "Measurement", "Results", "Row", "build_rows", "render_markdown"]

TIMES: Final = "\N{MULTIPLICATION SIGN}"
DASH: Final = "\N{EN DASH}"
COLUMNS: Final[tuple[tuple[SystemName, str], ...]] = (
    ("starlette", "bare Starlette"),
    ("tidings", "tidings"),
    ("tidings-sqlite", "tidings + SQLite log"),
    ("tidings-postgres", "tidings + PostgreSQL log"),
    ("fastapi-events", "fastapi-events"),
    ("tidings-compat", "tidings compat (fastapi-events API)"),
    ("litestar", "Litestar events"),
    ("litestar-bare", "bare Litestar"),
)


@dataclass(frozen=True, slots=True)
class Measurement:
    """All samples of one (scenario, system, variant); one sample per repeat."""

    scenario: str
    system: SystemName
    variant: str
    unit: str
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median of the samples: how noisy the repeats were."""
        return (max(self.samples) - min(self.samples)) / self.median if self.median else 0.0


@dataclass(slots=True)
class Results:
    measurements: dict[tuple[str, str, str], Measurement] = field(default_factory=dict)

    def add(self, m: Measurement) -> None:
        self.measurements[(m.scenario, m.system, m.variant)] = m

    def median(self, scenario: str, system: str, variant: str) -> float | None:
        m = self.measurements.get((scenario, system, variant))
        return None if m is None else m.median


Comparison = Literal["<=", ">="]


@dataclass(frozen=True, slots=True)
class Target:
    """A bound on tidings' figure: ``value <op> bound`` (the value may itself be a ratio)."""

    op: Comparison
    bound: float
    text: str

    def met(self, value: float) -> bool:
        return value <= self.bound if self.op == "<=" else value >= self.bound


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: a figure for every system, and tidings' target check."""

    scenario: str
    metric: str
    cells: dict[str, str]
    values: dict[str, float]
    target: str
    met: bool | None  # None: no target, or tidings was not measured

    @property
    def met_text(self) -> str:
        return "" if self.met is None else ("✅ met" if self.met else "❌ not met")


def _num(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def _ratio(value: float) -> str:
    return f"{value:.2f}{TIMES}"


def _row(
    scenario: str,
    metric: str,
    values: dict[str, float],
    fmt: Callable[[float], str],
    target: Target | None = None,
    checked: float | None = None,
    *,
    cells: dict[str, str] | None = None,
) -> Row:
    if cells is None:
        cells = {system: fmt(v) for system, v in values.items()}
    met = None if target is None or checked is None else target.met(checked)
    return Row(scenario, metric, cells, values, target.text if target else "", met)


def build_rows(results: Results) -> list[Row]:
    """Every table row that has at least one measured figure."""
    rows: list[Row] = []
    med = results.median

    def per_turn(variant: str, system: str, bare: str, *, difference: bool = False) -> float | None:
        """The median over turns of ``bare``'s time / ``system``'s (its req/s relative to
        ``bare``), or of ``system``'s time - ``bare``'s; ``None`` unless both were measured in the
        same turns."""
        measured = results.measurements.get(("requests", system, variant))
        baseline = results.measurements.get(("requests", bare, variant))
        if measured is None or baseline is None or len(measured.samples) != len(baseline.samples):
            return None
        pairs = zip(baseline.samples, measured.samples, strict=True)
        if difference:
            return statistics.median(mine - theirs for theirs, mine in pairs)
        return statistics.median(theirs / mine for theirs, mine in pairs)

    def collect(scenario: str, variant: str) -> dict[str, float]:
        """Each measured system's median for ``variant``."""
        values: dict[str, float] = {}
        for system, _ in COLUMNS:
            value = med(scenario, system, variant)
            if value is not None:
                values[system] = value
        return values

    # 1. emit cost
    emit = collect("emit", "")
    if emit:
        rows.append(
            _row(
                "emit cost (in a request)",
                "µs per emit call",
                emit,
                lambda v: _num(v, 3),
                Target("<=", 0.5, "≤ 0.5 µs"),
                emit.get("tidings"),
            )
        )

    if "tidings" in emit and "tidings-sqlite" in emit:
        rows.append(
            _row(
                "emit cost (in a request)",
                f"SQLite log: {TIMES} the in-memory emit",
                {"tidings-sqlite": emit["tidings-sqlite"] / emit["tidings"]},
                _ratio,
                Target("<=", 2.0, f"≤ 2{TIMES} in-memory"),
                emit["tidings-sqlite"] / emit["tidings"],
            )
        )

    if "tidings" in emit and "tidings-compat" in emit:
        # the compatibility layer's dispatch() against the tidings.emit() it is built on
        rows.append(
            _row(
                "emit cost (in a request)",
                f"fastapi-events API: dispatch() {TIMES} tidings.emit()",
                {"tidings-compat": emit["tidings-compat"] / emit["tidings"]},
                _ratio,
                Target("<=", 2.0, f"≤ 2{TIMES} emit()"),
                emit["tidings-compat"] / emit["tidings"],
            )
        )

    # 2. in-process ASGI requests/s: each event count against the bare frameworks measured beside it.
    # The ratios (and the middleware cost) are medians of per-turn comparisons: a worker takes one
    # sample of every system per turn, so two systems' samples at one index were taken moments
    # apart, in one machine state; the medians of pooled samples, taken in different states in
    # different processes, can move by several percent between runs.
    targets = {
        "1": Target(">=", 0.75, f"≥ 0.75{TIMES} bare"),
        "10": Target(">=", 0.40, f"≥ 0.40{TIMES} bare"),
    }
    for events in ("0", "1", "10"):
        us = collect("requests", events)
        if not us or (set(us) <= {"starlette", "litestar-bare"} and events != "0"):
            continue
        rps = {system: 1e6 / v for system, v in us.items()}
        ratios: dict[str, float] = {}
        for system in us:
            ratio = per_turn(events, system, "starlette")
            if ratio is not None:
                ratios[system] = ratio
        cells = {
            system: f"{_num(v)} ({_ratio(ratios[system])})" if system in ratios else _num(v)
            for system, v in rps.items()
        }
        label = f"{events} event{'s' if events != '1' else ''}/request"
        rows.append(
            _row(
                "in-process ASGI",
                f"req/s ({label}; {TIMES} bare Starlette, per turn)",
                rps,
                _num,
                targets.get(events),
                ratios.get("tidings"),
                cells=cells,
            )
        )
        if events == "0":
            overhead: dict[str, float] = {}
            for system, bare_system in (
                ("tidings", "starlette"),
                ("fastapi-events", "starlette"),
                ("tidings-compat", "starlette"),
                ("litestar", "litestar-bare"),
            ):
                extra = per_turn(events, system, bare_system, difference=True)
                if extra is not None:
                    overhead[system] = extra
            if overhead:
                rows.append(
                    _row(
                        "in-process ASGI",
                        "middleware cost with no events, µs/request over its bare framework (per turn)",
                        overhead,
                        lambda v: _num(v, 2),
                        Target("<=", 1.0, "≤ 1 µs"),
                        overhead.get("tidings"),
                    )
                )
    # 3. 1,000 events in one request
    for kind, bound, text in (("async", 500_000, "≥ 500k events/s"), ("sync", 150_000, "≥ 150k events/s")):
        eps = collect("burst", kind)
        if eps:
            rows.append(
                _row(
                    "1,000 events in one request",
                    f"events/s to one {kind} no-op handler",
                    eps,
                    lambda v: _num(v),
                    Target(">=", bound, text),
                    eps.get("tidings"),
                )
            )
    burst = collect("burst", "async")
    for system, name, target in (
        ("tidings-sqlite", "SQLite", Target(">=", 20_000, "≥ 20k events/s")),
        ("tidings-postgres", "PostgreSQL", None),  # a stated figure, no target (issue 4)
    ):
        if system in burst:
            rows.append(
                _row(
                    "1,000 events in one request",
                    f"{name} log: events/s recorded, handled and completed (committed)",
                    {system: burst[system]},
                    lambda v: _num(v),
                    target,
                    burst[system] if target is not None else None,
                )
            )

    # 4. uvicorn + wrk
    wrk_rps = collect("wrk", "rps")
    if wrk_rps:
        bare_rps = wrk_rps.get("starlette")
        p50 = collect("wrk", "p50")
        p99 = collect("wrk", "p99")
        bare_p99 = p99.get("starlette")

        def rel(value: float, base: float | None) -> str:
            return f" ({_ratio(value / base)})" if base else ""

        tid_rps = wrk_rps.get("tidings")
        tid_p99 = p99.get("tidings")
        scenario = "uvicorn + wrk, 1 event/request"
        rows.append(
            _row(
                scenario,
                f"req/s ({TIMES} bare Starlette)",
                wrk_rps,
                lambda v: _num(v) + rel(v, bare_rps),
                Target(">=", 0.95, f"≥ 0.95{TIMES} bare"),
                None if tid_rps is None or not bare_rps else tid_rps / bare_rps,
            )
        )
        rows.append(_row(scenario, "p50 latency, ms", p50, lambda v: _num(v, 2)))
        rows.append(
            _row(
                scenario,
                f"p99 latency, ms ({TIMES} bare Starlette)",
                p99,
                lambda v: _num(v, 2) + rel(v, bare_p99),
                Target("<=", 1.2, f"≤ 1.2{TIMES} bare"),
                None if tid_p99 is None or not bare_p99 else tid_p99 / bare_p99,
            )
        )
    return rows


def render_markdown(rows: Sequence[Row]) -> str:
    """The results as one Markdown table (targets apply to tidings' figure)."""
    header = ["Scenario", "Metric", *(title for _, title in COLUMNS), "tidings target", "Met?"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [row.scenario, row.metric, *(row.cells.get(system, DASH) for system, _ in COLUMNS)]
        lines.append("| " + " | ".join([*cells, row.target or DASH, row.met_text or DASH]) + " |")
    return "\n".join(lines)
