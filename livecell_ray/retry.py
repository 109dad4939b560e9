"""Retries with backoff for transient I/O errors, shared by reading (imaging) and writing (store)."""

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
