"""One job at a time on a cluster's ranks: a foreground cell, a chat reply, fine-tuning, a server.

A second job started meanwhile says at once what runs and for how long, and waits for it
(the interrupt gives up waiting); behind a server, which runs until stopped, it is refused.
Inside a job (a restart that replays the setup cells) nothing waits for itself.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Optional

from .engines import ClusterError

SERVING = "serving"  # the job name of a server: it runs until stopped, so nothing waits for it


class JobSlot:
    """The ranks' one job: who holds them, what it is, since when.

    Example::

        slot = JobSlot()
        with slot.hold("fine-tuning", print):
            ...  # the ranks are ours
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: Optional[int] = None  # the thread whose job runs
        self.what: Optional[str] = None
        self.since = 0.0

    @property
    def mine(self) -> bool:
        return self._owner == threading.get_ident()

    @contextlib.contextmanager
    def hold(self, what: str, say: Callable[[str], None]) -> Iterator[None]:
        if self.mine:
            yield
            return
        if not self._lock.acquire(blocking=False):
            running, took = self.what, time.monotonic() - self.since
            if running == SERVING:
                raise ClusterError(f"the ranks are serving (for {took:.0f} s): stop the server first (%mlx_serve stop)")
            say(f"Waiting for {running} to finish (running for {took:.0f} s); interrupt to give up...")
            try:
                while not self._lock.acquire(timeout=0.2):
                    pass
            except KeyboardInterrupt:
                raise ClusterError(f"gave up waiting: {running} still runs on the ranks") from None
        self._owner, self.what, self.since = threading.get_ident(), what, time.monotonic()
        try:
            yield
        finally:
            self._owner = self.what = None
            self._lock.release()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no job runs (``timeout`` s at most); whether none does."""
        if self.mine or not self._lock.acquire(timeout=timeout):
            return self.what is None
        self._lock.release()
        return True
