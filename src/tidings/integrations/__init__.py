"""Integrations with other libraries, each behind its extra: ``tidings.integrations.sqlalchemy``."""
