"""Compatibility layers: run code written for another events library on tidings, imports changed only.

* :mod:`tidings.compat.fastapi_events`: the API of `fastapi-events
  <https://github.com/melvinkcx/fastapi-events>`_ 0.12, same module paths
  (``fastapi_events.dispatcher`` becomes ``tidings.compat.fastapi_events.dispatcher``, and so on).
  The migration guide is ``docs/migrating-from-fastapi-events.md``.
"""
