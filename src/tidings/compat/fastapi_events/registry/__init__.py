"""Payload schemas: Pydantic models that ``dispatch()`` validates payloads against, by event name."""
