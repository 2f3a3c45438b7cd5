"""Benchmarks for tidings against fastapi-events, Litestar's events and a bare Starlette app.

Run everything with ``uv run --group bench python -m bench`` from the repository root; see
``bench/README.md`` for what each scenario measures.
"""
