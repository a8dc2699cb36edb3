"""One job on the ranks as ipyparallel sees it: per rank, its reply and what it has sent so far."""

from __future__ import annotations

import concurrent.futures
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Optional

import ipyparallel as ipp

from ..results import Outcome, RankError


class RankTask:
    """One rank's share of a dispatched job.

    ipyparallel accumulates a task's stdout, stderr, displayed outputs and published data in
    its metadata as messages arrive (on its I/O thread); reading that record, rather than only
    reacting to callbacks, means output that arrived before anyone listened is not lost.
    """

    def __init__(self, rank: int, future: Any, client: Optional[ipp.Client] = None):
        self.rank, self._future, self._client = rank, future, client
        self._md = future.output.metadata

    # what the rank has sent so far
    @property
    def stdout(self) -> str:
        return self._md["stdout"] or ""

    @property
    def stderr(self) -> str:
        return self._md["stderr"] or ""

    @property
    def outputs(self) -> list:
        return self._md["outputs"]

    @property
    def data(self) -> dict:
        return self._md["data"]

    # when things arrive (callbacks run on ipyparallel's I/O thread)
    def on_message(self, callback: Callable[[], None]) -> None:
        """``callback()`` for every message of the task but status messages (they carry nothing
        to show, and waking the notebook's thread for each costs a context switch)."""

        def poke(msg: dict) -> None:
            if msg["header"]["msg_type"] != "status":
                callback()

        self._future.iopub_callbacks.append(poke)

    def on_progress(self, callback: Callable[[], None]) -> None:
        """``callback()`` when the reply arrives, and when the end of its output does."""
        self._future.add_done_callback(lambda _f: callback())
        self._future.output.add_done_callback(lambda _f: callback())

    @property
    def replied(self) -> bool:
        return self._future.done()

    @property
    def output_done(self) -> bool:
        return self._future.output.done()

    def succeeded(self, wait: float = 0.0) -> bool:
        """The reply came (within ``wait`` s) and the function returned without raising."""
        concurrent.futures.wait([self._future], timeout=wait)
        if not self._future.done():
            return False
        try:
            self._future.result()
        except BaseException:
            return False
        return True

    def reply_failed(self) -> bool:
        """The reply came, and it is not a clean outcome (an error, a lost engine)."""
        try:
            result = self._future.result()
        except BaseException:  # cancelled, or an exception set on the future
            return True
        return not isinstance(result, Outcome) or result.error is not None

    def outcome(self, wait: float) -> Outcome:
        """The rank's outcome; waits up to ``wait`` s for its last output to arrive first."""
        concurrent.futures.wait([self._future.output], timeout=wait)
        try:
            result = self._future.result()
        except BaseException as e:  # cancelled, or an exception set on the future
            result = e
        # an engine that died mid-task comes back as EngineError, raised or wrapped
        if isinstance(result, ipp.error.EngineError) or getattr(result, "ename", "") == "EngineError":
            return Outcome(self.rank, lost=True)
        if isinstance(result, ipp.RemoteError):
            return Outcome(
                self.rank, error=RankError(result.ename, str(result.evalue), result.traceback or "", time.time())
            )
        if not isinstance(result, Outcome):  # TaskAborted and the like: ipyparallel's, not the cell's
            return Outcome(self.rank, error=RankError(type(result).__name__, str(result), "", time.time()))
        return result


def forget(tasks: Iterable[RankTask]) -> None:
    """Drop a finished job's messages from the ipyparallel Client's caches (see
    :func:`forget_messages`); tasks still waiting for a reply are kept.

    Example::

        tasks = dispatch(view, [0, 1], fn)
        ...  # wait for them
        forget(tasks.values())
    """
    done = [t for t in tasks if t._client is not None and t.replied]
    if done:
        forget_messages(done[0]._client, [t._future.msg_id for t in done])


def forget_messages(client: ipp.Client, msg_ids: Iterable[str]) -> None:
    """Drop ``msg_ids`` from ``client``'s caches, once their replies came.

    The Client appends every message id it sends to ``client.history`` and never trims it,
    and keeps a message's result and metadata until its reply *and* its end of output
    arrived (the latter never does for a rank whose output was given up on): without this,
    one entry per rank per job, forever. Messages still outstanding are kept (a reply may
    still come).

    Example::

        ar = view.apply_async(fn)
        ar.get()
        forget_messages(view.client, ar.msg_ids)
    """
    ids = set(msg_ids) - client.outstanding
    for cache in (client.results, client.metadata, client._futures, client._output_futures):
        for msg_id in ids:
            cache.pop(msg_id, None)
    if ids:
        client.history[:] = [m for m in client.history if m not in ids]
        recently_forgotten(client).extend(ids)


def recently_forgotten(client: ipp.Client) -> deque:
    """The last messages of ours forgotten: the hub's queue status lags their replies."""
    if not hasattr(client, "_mlx_nb_forgotten"):
        client._mlx_nb_forgotten = deque(maxlen=4096)
    return client._mlx_nb_forgotten


def dispatch(view: ipp.DirectView, ranks: list[int], fn: Callable, *args: Any) -> dict[int, RankTask]:
    """``fn(*args)`` on every engine of ``view`` (one per rank of ``ranks``, in order) in one
    apply: the same dispatch cost as a raw DirectView call. :func:`forget` the tasks after."""
    ar = view.apply_async(fn, *args)
    return {r: RankTask(r, child, view.client) for r, child in zip(ranks, ar._children)}
