"""Errors a user sees as one line."""


class UsageError(Exception):
    """Bad input from the user: reported as one line with exit code 2, before any heavy work."""


def one_line(e: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
