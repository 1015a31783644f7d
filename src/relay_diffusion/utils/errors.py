"""Errors as the one line a command prints."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line. An error re-raised by torch's DataLoader from a worker process
    (``Caught ValueError in DataLoader worker process 0. Original Traceback ...``) is reduced to the original
    error's message, which names the file it was reading; otherwise the first line."""
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    if "Original Traceback" in message:
        last = message.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return (message.strip().splitlines() or [type(exc).__name__])[0]
