"""One job on the ranks as ipyparallel sees it: per rank, its reply and what it has sent so far;
and ``Messages``, what the notebook sends the ranks through one ipyparallel Client."""

from __future__ import annotations

import concurrent.futures
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Optional

import ipyparallel as ipp

from ..results import Outcome, RankError
from . import ClusterError


class RankTask:
    """One rank's share of a dispatched job.

    ipyparallel accumulates a task's stdout, stderr, displayed outputs and published data in
    its metadata as messages arrive (on its I/O thread); reading that record, rather than only
    reacting to callbacks, means output that arrived before anyone listened is not lost.
    """

    def __init__(self, rank: int, future: Any, messages: Optional[Messages] = None):
        self.rank, self._future, self._messages = rank, future, messages
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
    :meth:`Messages.forget`); tasks still waiting for a reply are kept.

    Example::

        tasks = messages.dispatch({0: 3, 1: 4}, fn)  # rank -> engine id
        ...  # wait for them
        forget(tasks.values())
    """
    done = [t for t in tasks if t._messages is not None and t.replied]
    if done:
        done[0]._messages.forget([t._future.msg_id for t in done])


class Messages:
    """What the notebook sends the ranks through one ipyparallel Client: jobs (dispatched here,
    forgotten here once done), control messages, and the hub's queues read against them."""

    def __init__(self, client: ipp.Client):
        self.client = client
        # the last messages of ours forgotten: the hub's queue status lags their replies
        self.forgotten: deque[str] = deque(maxlen=4096)
        self._views: tuple[list[int], Optional[ipp.DirectView]] = ([], None)

    def dispatch(self, engines: dict[int, int], fn: Callable, *args: Any) -> dict[int, RankTask]:
        """``fn(*args)`` on every engine of ``engines`` (rank -> engine id) in one apply: the
        same dispatch cost as a raw DirectView call. :func:`forget` the tasks after."""
        ar = self._view(list(engines.values())).apply_async(fn, *args)
        return {r: RankTask(r, child, self) for r, child in zip(engines, ar._children)}

    def _view(self, ids: list[int]) -> ipp.DirectView:
        """The view jobs go through: one per set of engines (a new DirectView costs ~0.1 ms),
        private so that nobody retargets it."""
        if self._views[1] is None or self._views[0] != ids:
            self._views = (ids, self.client[ids])
        view = self._views[1]
        view.history.clear()  # it would grow by a message id per rank per cell
        return view

    def forget(self, msg_ids: Iterable[str]) -> None:
        """Drop ``msg_ids`` from the client's caches, once their replies came.

        The Client appends every message id it sends to ``client.history`` and never trims it,
        and keeps a message's result and metadata until its reply *and* its end of output
        arrived (the latter never does for a rank whose output was given up on): without this,
        one entry per rank per job, forever. Messages still outstanding are kept (a reply may
        still come).

        Example::

            ar = view.apply_async(fn)
            ar.get()
            messages.forget(ar.msg_ids)
        """
        client = self.client
        ids = set(msg_ids) - client.outstanding
        for cache in (client.results, client.metadata, client._futures, client._output_futures):
            for msg_id in ids:
                cache.pop(msg_id, None)
        if ids:
            client.history[:] = [m for m in client.history if m not in ids]
            self.forgotten.extend(ids)

    def send_control(self, engine_ids: Iterable[int], msg_type: str, content: Optional[dict] = None) -> None:
        """A message on the engines' control channel, which their kernels serve while a cell runs."""
        for eid in engine_ids:
            ident = self.client._engines[eid]
            self.client.session.send(
                self.client._control_socket, msg_type, content=content or {}, ident=[ident.encode()]
            )

    def queued(self, engines: dict[int, int], timeout: float = 3.0) -> tuple[set[int], set[int]]:
        """Of ``engines`` (rank -> engine id): (ranks the hub has work of others queued for,
        ranks the hub cannot account for). Within ``timeout`` whatever state the hub is in:
        ClusterError if it does not answer."""
        from ipyparallel import util

        client = self.client
        query = client._send(client._query_stream, "queue_request", content={"targets": None, "verbose": True})
        if not query.wait(timeout):
            raise ClusterError(f"the controller did not answer within {timeout:g} s")
        queues = util.int_keys({k: v for k, v in query.result()["content"].items() if k != "status"})
        ours = set(client.history) | set(self.forgotten)
        busy, lost = set(), set()
        for rank, eid in engines.items():
            q = queues.get(eid, {})
            if not isinstance(q, dict):
                lost.add(rank)
            # the hub's queue lags replies the notebook already has: of our own messages
            # only those still without a reply count; another client's work counts
            elif [m for m in q.get("queue", []) if m in client.outstanding or m not in ours]:
                busy.add(rank)
        return busy, lost
