"""A tiny in-memory shop that shows tidings off without any broker. See :mod:`examples.shop.app`."""
