"""Event handlers: :mod:`.local` (functions per event name), :mod:`.echo`, :mod:`.null`, and
:mod:`.base` to write your own.

The SQS and Pub/Sub forwarders of fastapi-events (``handlers.aws``, ``handlers.gcp``) are not part of
this layer yet: they arrive with tidings' broker transports. Importing a name from those modules
raises an ``ImportError`` that says so.
"""
