"""Errors a cache user can cause (wrong path, mismatched settings, corruption)."""


class CacheError(Exception):
    """A one-line, user-facing problem with a cache store."""
