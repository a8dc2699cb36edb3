"""Waiting for a condition, always with a deadline: the one way the tests and their helpers wait.

Imported by conftest (whose names the tests import) and by the helper modules that must not import
conftest (it marks every process the session starts).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(condition: Callable[[], Any], timeout: float, every: float = 0.1) -> Any:
    """``condition()``'s first truthy value, polled every ``every`` s for up to ``timeout`` s; its
    last, falsy value once the deadline has passed (what that means is the caller's to say)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(every)
    return value


def wait_for(condition: Callable[[], Any], timeout: float = 120.0, what: str = "the condition", every: float = 0.1):
    """``condition()``'s first truthy value, polled until ``timeout`` s; a TimeoutError naming
    ``what`` after that."""
    value = wait_until(condition, timeout, every)
    if not value:
        raise TimeoutError(f"after {timeout:.0f} s, still waiting for {what}")
    return value
