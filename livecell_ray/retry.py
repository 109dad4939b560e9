"""Errors, shared by every stage: transient I/O errors retried with backoff (reading and writing), and any
error told in one line (a failures/ row, a log line, an ``error:`` line)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def retry(fn: Callable[..., T], *args: Any, attempts: int = 5, base_delay: float = 0.2, **kwargs: Any) -> T:
    """Call fn, retrying transient I/O errors (object-store 5xx, throttling, dropped connections) with
    exponential backoff; the last error propagates so the caller can record the field as failed."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
            raise  # not transient
        except Exception:
            if i == attempts - 1:
                raise
            time.sleep(base_delay * (2**i) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
