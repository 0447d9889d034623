"""Errors as the user sees them: ``UsageError``, and an exception as one line. Imports nothing from ``jobs``."""
import re


class UsageError(Exception):
    """Bad input from the user: reported as one line with exit code 2, before any heavy work."""


def first_line(text: str) -> str:
    return text.splitlines()[0] if text.strip() else ""


def one_line(e: BaseException) -> str:
    """The first line of ``e``'s message (pyarrow, transformers and others raise many), or its type's name."""
    return first_line(str(e)) if str(e).strip() else type(e).__name__


def innermost_cause(e: BaseException) -> BaseException:
    """The exception at the bottom of a chain: a Ray task error wraps the worker's own one (``.cause``)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        if not isinstance(inner, BaseException):
            break
        e = inner
    return e


def plain_error(e: BaseException) -> str:
    """'Type: first line' of the innermost cause: a Ray task error wraps the worker's own exception
    (``.cause``) behind an ANSI-coloured actor repr, which the manifest should not store."""
    e = innermost_cause(e)
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return f"{type(e).__name__}: {first_line(text)}"[:500]
