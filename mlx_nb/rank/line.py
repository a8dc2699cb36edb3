"""A direct line between the notebook and rank 0 for a long job: the notebook's messages in,
rank 0's reports out, over two zmq sockets on loopback beside ipyparallel's channels.

Through ipyparallel a message to a running job goes notebook -> controller -> the engine's
control thread (``Cluster.send``, 3-5 ms), and a report comes back engine IOPub -> controller ->
the client's IO thread (about 5 ms): two Python relays each way. A served request waits for both
before its first token, where mlx_lm.server hands them through a queue in its own process. The
line takes both to one zmq hop each way (well under a millisecond), and takes the controller
and the client's IO thread off the path of every served token.

Only where rank 0 runs on the notebook's machine: both ends listen on 127.0.0.1, so nothing
leaves the machine (elsewhere the job uses ipyparallel's channels, encrypted off loopback). Each
end listens with a PULL socket and sends with a PUSH connected to the other's: the notebook's
address travels with the job's call, rank 0's comes back as the line's first message
(``Opened``). Every message is signed with a key that travels with the call (HMAC-SHA256, as
ipyparallel signs its own), and one that fails the check is dropped unread: another process on
the machine can reach a loopback port, but cannot hand rank 0 a request or the notebook a
pickle, and, as no end listens with a PUSH, cannot take messages meant for the other. Both
ends live here so that the framing is in one place: :class:`NotebookEnd` in the notebook
(``mlx_nb.serve``), :class:`RankEnd` on rank 0 (``mlx_nb.rank.serve``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import pickle
import secrets
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import zmq

from .state import state

POLL_MS = 100  # a reader thread looks whether its end closed this often
MAX_MESSAGE = 64 << 20  # bytes: a longer message (a request is at most 8 MB of JSON) is dropped unread
OPEN_TIMEOUT = 10.0  # seconds the notebook's send waits for rank 0's end to open


@dataclass(frozen=True)
class Address:
    """Where the notebook's end listens, and the key both ends sign with (it travels with the
    job's call, through ipyparallel's authenticated channel)."""

    url: str  # rank 0 pushes here, the notebook pulls
    key: str  # hex


@dataclass(frozen=True)
class Opened:
    """Rank 0's first message on the line: where it listens for the notebook's."""

    url: str


@dataclass(frozen=True)
class Closed:
    """Rank 0's last message on the line: every report before it has arrived."""


def _sign(key: bytes, data: bytes) -> list[bytes]:
    return [hmac.new(key, data, hashlib.sha256).digest(), data]


def _check(key: bytes, frames: list[bytes]) -> Optional[bytes]:
    """The data of a signed message, or None if it is not one of ours."""
    if len(frames) != 2:
        return None
    mac, data = frames
    return data if hmac.compare_digest(mac, hmac.new(key, data, hashlib.sha256).digest()) else None


def _reader(
    sock: zmq.Socket,
    key: bytes,
    done: threading.Event,
    take: Callable[[bytes], None],
    broken: Callable[[BaseException], None],
) -> None:
    try:
        while not done.is_set():
            try:
                frames = sock.recv_multipart() if sock.poll(POLL_MS) else None
            except zmq.ZMQError as e:  # the socket itself failed: nothing more comes this way
                if e.errno != zmq.ETERM:  # (not the process ending)
                    broken(e)
                return
            data = _check(key, frames) if frames is not None else None
            if data is None:
                continue
            try:
                take(data)
            except Exception:  # one message's failure must not end the line: shown, and on
                traceback.print_exc()
    finally:
        sock.close(linger=0)


def _listening(ctx: zmq.Context) -> tuple[zmq.Socket, str]:
    """A PULL socket on a free port of 127.0.0.1 and its URL."""
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
    return sock, f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"


class NotebookEnd:
    """The notebook's end: ``send`` a JSON-able message to rank 0's job; rank 0's reports go to
    ``on_report`` on this end's reader thread, and ``on_broken(error)`` is called there if its
    socket fails (no report comes after). ``close`` when the job has ended."""

    def __init__(
        self,
        on_report: Callable[[Any], None],
        on_broken: Callable[[BaseException], None] = lambda e: None,
        name: str = "mlx_nb-line",
    ) -> None:
        self._key = secrets.token_bytes(32)
        # a context of its own: ipyparallel's client ends the shared one when its cluster stops
        self._ctx = zmq.Context()
        self._out = self._ctx.socket(zmq.PUSH)
        self._out.setsockopt(zmq.LINGER, 0)
        inbound, url = _listening(self._ctx)
        self.address = Address(url, self._key.hex())
        self.broken: Optional[BaseException] = None  # why this end's reader stopped, if it failed
        self.opened = threading.Event()  # rank 0's end listens, and this end's sends go to it
        self.peer: Optional[str] = None  # where rank 0's end listens, once opened
        self.closed = threading.Event()  # rank 0 said its last (``Closed``)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._on_report, self._on_broken = on_report, on_broken
        self._thread = threading.Thread(
            target=_reader, args=(inbound, self._key, self._done, self._take, self._broke), name=name, daemon=True
        )
        self._thread.start()

    def _broke(self, error: BaseException) -> None:
        self.broken = error
        self._on_broken(error)

    def _take(self, data: bytes) -> None:
        report = pickle.loads(data)  # signed by rank 0's end: the key came from here
        if isinstance(report, Opened):
            with self._lock:
                if not self._done.is_set():
                    self._out.connect(report.url)
                    self.peer = report.url
            self.opened.set()
        elif isinstance(report, Closed):
            self.closed.set()
        else:
            self._on_report(report)

    def send(self, content: dict) -> None:
        """Hand ``content`` to rank 0's job (its ``session.inbox``); safe from any thread, in order.
        ``TimeoutError`` if rank 0's end has not opened within ``OPEN_TIMEOUT`` s (its job
        reports ``Ready`` after it opened: a server sends nothing before)."""
        if not self.opened.wait(OPEN_TIMEOUT):
            raise TimeoutError(f"rank 0's end of the line did not open within {OPEN_TIMEOUT:g} s")
        data = json.dumps(content).encode()
        with self._lock:
            if self._done.is_set() or self.broken is not None:
                raise ConnectionError(f"the line to rank 0 is closed{f' ({self.broken})' if self.broken else ''}")
            self._out.send_multipart(_sign(self._key, data), flags=zmq.NOBLOCK)

    def close(self, wait: float = 0.0) -> None:
        """Stop reading (after rank 0's ``Closed``, waiting up to ``wait`` s for it) and close."""
        if self._done.is_set():
            return
        if wait:
            self.closed.wait(wait)
        self._done.set()
        self._thread.join()
        with self._lock:
            self._out.close(linger=0)
        self._ctx.term()


class RankEnd:
    """Rank 0's end: the notebook's messages go to ``session.inbox`` (as ``Cluster.send``'s do),
    ``report`` sends one back. Never blocks the rank: a report waits in zmq's queue for the
    notebook's end, however long. ``on_broken(error)``: its socket failed, no message comes
    after (the job should end, so that the notebook's requests do not wait for nothing)."""

    def __init__(self, address: Address, on_broken: Callable[[BaseException], None] = lambda e: None) -> None:
        self._key = bytes.fromhex(address.key)
        inbound, url = _listening(zmq.Context.instance())
        self._out = zmq.Context.instance().socket(zmq.PUSH)
        self._out.setsockopt(zmq.SNDHWM, 0)  # no limit: a report is never dropped nor waited for
        self._out.connect(address.url)
        self.report(Opened(url))
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=_reader,
            args=(inbound, self._key, self._done, self._take, on_broken),
            name="mlx_nb-line",
            daemon=True,
        )
        self._thread.start()

    @staticmethod
    def _take(data: bytes) -> None:
        state.inbox.put(json.loads(data))

    def report(self, payload: Any) -> None:
        self._out.send_multipart(_sign(self._key, pickle.dumps(payload)), flags=zmq.NOBLOCK)

    def close(self) -> None:
        """Say ``Closed`` and close; what was sent still goes (the socket lingers, 2 s at most:
        the engine's exit waits that long for a notebook that is gone)."""
        self.report(Closed())
        self._done.set()
        self._thread.join()
        self._out.close(linger=2000)
