"""A fastapi-events app moved to tidings by changing its imports, and nothing else.

Every ``fastapi_events`` import became ``tidings.compat.fastapi_events``; the code is otherwise
written exactly as for fastapi-events 0.12 (so it avoids what fastapi-events does not support:
``yield`` and ``Annotated`` dependencies in handlers, dispatching from plain ``def`` handlers).
``tests/compat/test_port.py`` runs it end to end, and runs it again on fastapi-events itself with
the imports switched back.

Run it (from the repository root) with ``uv run uvicorn examples.fastapi_events_port.app:app``.
"""
