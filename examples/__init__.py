"""Runnable examples of tidings."""
