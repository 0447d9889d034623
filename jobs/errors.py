"""Errors a user sees as one line."""


class UsageError(Exception):
    """Bad input from the user: reported as one line with exit code 2, before any heavy work."""
