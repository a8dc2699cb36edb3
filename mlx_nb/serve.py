"""Serving the model the ranks hold: an OpenAI-compatible HTTP API with continuous batching.

    load_model(cluster, pipeline=True)
    server = serve(cluster, port=8000)      # the notebook stays free meanwhile
    # any OpenAI client: OpenAI(base_url=server.url, api_key="-")
    server.status()                         # requests running and queued, tok/s, first token
    server.stop()                           # the port closes, the ranks are free again

The ranks run one long job (:mod:`mlx_nb.rank.serve`) from a thread of this process. Each HTTP
request is checked and tokenized here (:mod:`mlx_nb.openai_api`), handed to rank 0's inbox,
and joins the batch at the next step (on a GPU after up to 50 ms for others to share its
prefill); rank 0 reports each step's tokens, which go to the
request's handler, which streams them (server-sent events) or answers when the reply is done.
Where rank 0 runs on this machine, requests and reports take a direct line to it
(:mod:`mlx_nb.rank.line`), else ipyparallel's channels. A client that leaves is noticed within a
step or a quarter of a second and leaves the batch.
"""

from __future__ import annotations

import itertools
import queue
import random
import statistics
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

import zmq

from .batch import check_max_batch
from .cell import DistCellError
from .display import Table
from .engines import ClusterError
from .generate import check_max_tokens
from .hostfile import is_local
from .jobs import SERVING
from .models import BUNDLED_NAMES
from .openai_api import ApiError, Completion, ServedModel
from .rank.batch import Tokens
from .rank.line import NotebookEnd
from .rank.serve import Ready, Refused, Scheduling, serve_on_rank, source
from .serve_http import Ending, HTTPServer, Piece

__all__ = ["FirstToken", "ServeError", "ServeStatus", "Server", "serve"]

BUNDLED_ID = "SmolLM2-135M-Instruct"
MAX_BODY = 8 << 20  # bytes of a request body (413 above)
LOOK_EVERY = 0.25  # seconds between looks at a waiting request's client
WINDOW = 10.0  # seconds of steps that tokens/s counts
LOG_LINES = 1000  # the server's log keeps the last ones


class ServeError(RuntimeError):
    """The server could not start (or go on): what happened and what to do."""


@dataclass(frozen=True)
class FirstToken:
    """Where a request's time to its first token went, in seconds (``Server.first_tokens``): the
    first with text, what its client sees first (a streaming detokenizer holds back a token that
    begins a character of several bytes).

    With rank 0 on another host, ``to_ranks`` and ``back`` also hold the two clocks' difference
    (one more, the other less): their sum is right."""

    read: float  # its HTTP thread reading and tokenizing it
    to_ranks: float  # from there to rank 0 taking it into the batch: the inbox, the step in flight, the others gathered
    prefill: float  # on rank 0, from there to its first token: the prefill past the cached prefix, and a step or more
    back: float  # that token's way back to the notebook (rank 0's report)

    @property
    def total(self) -> float:
        return self.read + self.to_ranks + self.prefill + self.back

    @staticmethod
    def median(parts: list[FirstToken]) -> Optional[FirstToken]:
        """Each part's median over ``parts`` (None for none)."""
        if not parts:
            return None
        return FirstToken(
            *(statistics.median(getattr(p, f) for p in parts) for f in ("read", "to_ranks", "prefill", "back"))
        )

    def __str__(self) -> str:
        ms = lambda x: f"{x * 1000:.0f}"
        return f"{ms(self.read)} / {ms(self.to_ranks)} / {ms(self.prefill)} / {ms(self.back)} ms"


@dataclass
class ServeStatus:
    """What the server is doing: ``Server.status()``, ``%mlx_serve status``."""

    url: str
    model: str
    state: str  # "serving", "stopped", or "stopped: why"
    running: int  # requests receiving tokens
    queued: int  # requests handed to the ranks, no token yet (waiting or prefilling)
    completed: int
    cancelled: int  # their client left
    failed: int
    tokens_per_second: float  # every request's tokens together, over the ranks' time generating them (last WINDOW s)
    ttft_median: Optional[float]  # seconds from a request's arrival to its first token (last 100)
    ttft_last: Optional[float]
    batch: int  # sequences in the ranks' batch at the last step
    batch_max: int
    generated: int  # tokens since the start
    uptime: float
    prompt_tokens: int = 0  # of the requests the ranks took, since the start
    cached_tokens: int = 0  # of those, the tokens the prompt cache held (not prefilled)
    ttft_parts: Optional[FirstToken] = None  # each part's median over the same requests as ttft_median
    channel: str = ""  # how requests reach rank 0: a direct line (rank 0 on this machine) or ipyparallel's channels
    prefill: str = ""  # how rank 0 groups prompts into prefill passes (its device's defaults, or what was asked)

    def table(self) -> Table:
        def s(x: Optional[float]) -> str:
            return "-" if x is None else f"{x:.2f} s"

        share = f" ({self.cached_tokens / self.prompt_tokens:.0%})" if self.prompt_tokens else ""

        rows = [
            ["state", self.state],
            ["requests running / queued", f"{self.running} / {self.queued}"],
            ["completed / cancelled / failed", f"{self.completed} / {self.cancelled} / {self.failed}"],
            [f"tokens/s while generating (last {WINDOW:g} s)", f"{self.tokens_per_second:.1f}"],
            ["first token: median / last", f"{s(self.ttft_median)} / {s(self.ttft_last)}"],
            ["first token, median: read / to the ranks / prefill / back", str(self.ttft_parts or "-")],
            ["requests to rank 0 and tokens back", self.channel],
            ["prefill", self.prefill or "-"],
            ["batch now / largest", f"{self.batch} / {self.batch_max}"],
            ["tokens generated", self.generated],
            ["prompt tokens: from the cache / all", f"{self.cached_tokens} / {self.prompt_tokens}{share}"],
            ["up", f"{self.uptime:.0f} s"],
        ]
        return Table(["measure", "value"], rows, f"{self.model} at {self.url}")

    def __repr__(self) -> str:
        return repr(self.table())

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()


@dataclass(frozen=True)
class _Failure:
    """The ranks cannot answer a request: the status and message its client gets."""

    status: int
    message: str


@dataclass
class _Tally:
    """What the server did since it started (its status counts)."""

    endings: Counter[Ending] = field(default_factory=Counter)  # requests completed, cancelled, failed
    tokens: int = 0  # generated
    prompt_tokens: int = 0  # of the requests the ranks took
    cached_tokens: int = 0  # of those, the prompt cache's

    def copy(self) -> _Tally:
        return replace(self, endings=Counter(self.endings))


class _Pending:
    """A request handed to the ranks: what came back for it so far."""

    def __init__(self, rid: int, request: Completion, arrived: float) -> None:
        self.id, self.request = rid, request
        self.events: queue.SimpleQueue[Union[Piece, _Failure]] = queue.SimpleQueue()
        self.arrived, self.submitted = arrived, time.time()  # its handler began to read it; it went to the ranks
        self.admitted: Optional[float] = None  # rank 0 took it into the batch (rank 0's clock)
        self.first: Optional[float] = None  # its first token with text came (what its client sees first)
        self.answering = False  # a token came (perhaps one whose text waits for the next)
        self.cached = 0  # prompt tokens the ranks' prompt cache held for it
        self.on_ranks = True  # until its last token came, or it was cancelled
        self.gone = False  # its client left


MAX_GATHER = 10.0  # seconds: a longer wait is a mistake (milliseconds meant?), not a setting


def check_gather(gather: Any) -> None:
    """Seconds a request arriving while others generate may wait for more to share its prefill:
    0 to ``MAX_GATHER`` (None: the default for the ranks' device).

    >>> check_gather(50)
    Traceback (most recent call last):
    ...
    ValueError: --gather must be 0-10 seconds (a request's longest wait for others to share its prefill), got 50
    """
    if gather is None:
        return
    if isinstance(gather, bool) or not isinstance(gather, (int, float)) or not 0 <= gather <= MAX_GATHER:
        raise ValueError(
            f"--gather must be 0-{MAX_GATHER:g} seconds (a request's longest wait for others to share "
            f"its prefill), got {gather!r}"
        )


class Server:
    """An OpenAI-compatible API for the model loaded on ``cluster`` (``load_model``); see :func:`serve`."""

    def __init__(
        self,
        cluster,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: Optional[str] = None,
        *,
        model_name: Optional[str] = None,
        max_batch: int = 32,
        prefill_batch: Optional[int] = None,
        gather: Optional[float] = None,
        prefill_step: int = 512,
        max_body: int = MAX_BODY,
        default_max_tokens: int = 512,
        line: bool = True,
    ) -> None:
        if api_key is None and not is_local(host):
            raise ValueError(
                f"--host {host} is reachable from other machines: give an --api-key too "
                "(clients send it as 'Authorization: Bearer KEY')"
            )
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
            raise ValueError(f"--port must be 0-65535, got {port}")
        check_max_batch(max_batch)
        if prefill_batch is not None:
            check_max_batch(prefill_batch, "--prefill-batch")
        check_gather(gather)
        check_max_tokens(default_max_tokens, "default_max_tokens")
        self.cluster, self.host, self.port, self.api_key = cluster, host, port, api_key
        self.model_name, self.max_batch, self.prefill_step = model_name, max_batch, prefill_step
        self.prefill_batch, self.gather = prefill_batch, gather
        self.max_body, self.default_max_tokens = max_body, default_max_tokens
        self.use_line = line
        self.id = uuid.uuid4().hex
        self.model: Optional[ServedModel] = None
        self.error: Optional[BaseException] = None  # why the ranks stopped serving, if not asked to
        self.scheduling: Optional[Scheduling] = None  # how rank 0 groups prompts into passes, once it serves
        self._pending: dict[int, _Pending] = {}
        self._arriving = 0  # requests being read and tokenized by the HTTP threads, not yet submitted
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._ready, self._ended = threading.Event(), threading.Event()
        self._stopping = False
        self._tally = _Tally()
        self._recent: deque = deque()  # (monotonic time, tokens, seconds the ranks took) per step
        self._ttfts: deque = deque(maxlen=100)
        self.first_tokens: deque[FirstToken] = deque(maxlen=100)  # the last requests' first token, in parts
        self._batch, self._batch_max, self._started = 0, 0, 0.0
        self._httpd: Optional[HTTPServer] = None
        self._line: Optional[NotebookEnd] = None  # the direct line to rank 0, where it runs on this machine
        self._http: Optional[threading.Thread] = None  # the thread serving HTTP, once started
        self.log: deque[str] = deque(maxlen=LOG_LINES)  # what the notebook is not shown: connections ended badly

    @property
    def url(self) -> str:
        """The API's base URL, as OpenAI clients take it (``.../v1``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def serving(self) -> bool:
        return self._httpd is not None and not self._ended.is_set()

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 120.0) -> Server:
        """Bind the port, start the ranks' job, and return once they serve."""
        if (running := self.cluster.running_job) is not None:
            raise ServeError(f"{running} runs on the ranks: wait for it (or stop it) before serving")
        self.model = self._served_model()
        try:
            self._httpd = HTTPServer((self.host, self.port), self)
        except OSError as e:
            raise ServeError(
                f"cannot listen on {self.host}:{self.port}: {e.strerror or e}; "
                "choose another --port (0 takes any free one)"
            ) from None
        self.port = self._httpd.server_address[1]
        if self.use_line and 0 not in self.cluster.spec.remote:
            self._line = NotebookEnd(
                lambda report: self._on_report(0, report), on_broken=self._line_broke, name="mlx_nb-serve-line"
            )
        self._started = time.monotonic()
        threading.Thread(target=self._job, name="mlx_nb-serve-ranks", daemon=True).start()
        while not (self._ready.wait(0.1) or self._ended.is_set()):
            if time.monotonic() - self._started > timeout:
                self.stop()
                raise ServeError(f"the ranks did not start serving within {timeout:g} s")
        if not self._ready.is_set():
            self._httpd.server_close()
            self._httpd = None
            raise ServeError(f"the ranks could not serve:\n{self.error}")
        self._http = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="mlx_nb-serve-http", daemon=True
        )
        self._http.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Close the port, end the ranks' job (every rank at the same step), and answer what
        was still running with an error (HTTP 503)."""
        if self._stopping:
            return
        self._stopping = True
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()  # the port is closed from here on
        if not self._ended.is_set():
            self._send({"serve": self.id, "stop": True}, fallback=True)
            if not self._ended.wait(timeout):
                self.cluster.request_stop()
                self._ended.wait(timeout)
        if self._httpd is not None:
            self._httpd.close_connections(wait=2.0)

    def _served_model(self) -> ServedModel:
        from mlx_lm.utils import load_tokenizer

        try:
            src = self.cluster.call(source, ranks=0)
        except DistCellError as e:
            why = e.root.error.message if e.root is not None and e.root.error is not None else str(e)
            raise ServeError(why) from None
        path, model = src.origin.path, src.origin.model
        tokenizer = load_tokenizer(Path(path) if Path(path).exists() else path, eos_token_ids=src.eos)
        bundled = model is None or str(model).lower() in BUNDLED_NAMES
        name = self.model_name or (BUNDLED_ID if bundled else str(model))
        names = {path, str(model)} | (set(BUNDLED_NAMES) if bundled else set())
        return ServedModel(name, tokenizer, src.context, src.vocab, names)

    def _job(self) -> None:
        line = self._line.address if self._line is not None else None
        try:
            self.cluster.call(
                serve_on_rank,
                self.id,
                self.max_batch,
                self.prefill_step,
                kwargs={"line": line, "prefill_batch": self.prefill_batch, "gather": self.gather},
                on_report=self._on_report,
                what=SERVING,
            )
        except BaseException as e:  # a thread has no cell to raise into: kept, shown by status()
            self.error = e
        finally:
            asked = self._stopping
            if self._line is not None and asked and self.error is None:
                self._line.closed.wait(2.0)  # what rank 0 sent before it ended arrives first
            if self.error is None and not asked:
                self.error = ClusterError("the ranks' job ended: the cluster was stopped")
            self._fail_pending("the server stopped" if asked else f"the ranks stopped serving: {self.error}")
            if not asked and self._http is not None:  # nothing is left listening
                self._httpd.shutdown()
                self._httpd.server_close()
            self._ended.set()
            if self._line is not None:
                self._line.close()

    # ---------------------------------------------------------------- requests
    def arrive(self) -> float:
        """A request began to arrive (its handler reads it): ``submit`` tells the ranks it comes.
        Its arrival time (time.time), for ``submit``."""
        with self._lock:
            self._arriving += 1
        return time.time()

    def leave(self) -> None:
        """A request that arrived will not be submitted (its body was refused)."""
        with self._lock:
            self._arriving -= 1

    def submit(self, request: Completion, arrived: float) -> _Pending:
        """Hand ``request`` (announced by ``arrive``) to the ranks; it joins the batch at their
        next step. It tells them how many others are still arriving ("more"): rank 0, idle,
        waits for those to plan them together (:func:`mlx_nb.rank.serve.gathered`)."""
        p = _Pending(next(self._ids), request, arrived)
        seed = request.seed % (1 << 63) if request.seed is not None else random.getrandbits(63)
        add = {
            "id": p.id,
            "prompt": request.prompt,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": seed,
        }
        with self._lock:  # counted and sent in one order: the last one sent says 0
            self._arriving -= 1
            if not (self._ended.is_set() or self._stopping):
                self._pending[p.id] = p
                if self._send({"serve": self.id, "add": [add], "more": self._arriving}):
                    return p
                del self._pending[p.id]
                raise ApiError(
                    503, "This server cannot take requests: rank 0 does not take them in.", kind="server_error"
                )
        why = "it is stopping" if self._stopping else f"the ranks stopped serving ({self.error})"
        raise ApiError(
            503, f"This server cannot take requests: {why}. Start it again (%mlx_serve).", kind="server_error"
        )

    def events(self, p: _Pending, gone: Callable[[], bool]) -> Iterator[Piece]:
        """A :class:`Piece` per token of ``p`` as the ranks make it, until its finish; it ends early
        (with ``p.gone``) if ``gone()`` says its client left. ``ApiError`` if the server stops."""
        looked = time.monotonic()
        while True:
            try:
                event = p.events.get(timeout=LOOK_EVERY)
            except queue.Empty:
                event = None
            if time.monotonic() - looked >= LOOK_EVERY or event is None:
                looked = time.monotonic()
                if gone():
                    p.gone = True
                    return
            if event is None:
                continue
            if isinstance(event, _Failure):
                raise ApiError(event.status, event.message, kind="server_error")
            yield event
            if event.finish is not None:
                return

    def finish(self, p: _Pending, ending: Ending) -> None:
        """The handler is done with ``p`` (completed, cancelled or failed): it leaves the batch if
        the ranks still generate for it."""
        with self._lock:
            if self._pending.pop(p.id, None) is None:
                return
            self._tally.endings[ending] += 1
        if p.on_ranks and not self._ended.is_set():
            p.on_ranks = False
            self._send({"serve": self.id, "cancel": [p.id]}, fallback=True)

    def note(self, line: str) -> None:
        """A line in the server's log (``server.log``), with the time."""
        self.log.append(f"{time.strftime('%H:%M:%S')} {line}")

    def _send(self, content: dict, fallback: bool = False) -> bool:
        """Hand ``content`` to rank 0's job: over the line where there is one, else
        ``Cluster.send``. False if the line's other end was not there (``fallback``: then
        through ipyparallel, which the job also reads: a stop, a cancellation)."""
        if self._line is None or (fallback and not self._line.opened.is_set()):
            self.cluster.send(content)
            return True
        try:
            self._line.send(content)
            return True
        except (zmq.ZMQError, TimeoutError, ConnectionError) as e:
            self.note(f"rank 0's end of the line did not take a message ({e}): {content}")
            if fallback:
                self.cluster.send(content)
            return False

    def _line_broke(self, error: BaseException) -> None:
        # no token comes back any more: what waits is answered now, and the ranks are stopped
        self.note(f"the line from rank 0 failed ({error}): the server stops")
        self.error = ServeError(f"the line from rank 0 failed ({error})")
        self._fail_pending(str(self.error))
        self.cluster.send({"serve": self.id, "stop": True})

    def _fail_pending(self, why: str) -> None:
        """Answer every request still waiting with a 503 saying ``why``."""
        with self._lock:
            pending = list(self._pending.values())
        for p in pending:
            p.events.put(_Failure(503, f"This reply could not be finished: {why}."))

    def _on_report(self, rank: int, report: Union[Ready, Refused, Tokens]) -> None:
        if isinstance(report, Ready):
            if rank == 0:  # with a line, rank 0's comes over it: the line is there both ways
                self.scheduling = report.scheduling
                self._ready.set()
        elif isinstance(report, Refused):
            for r in report.refusals:
                if (p := self._pending.get(r.id)) is not None:
                    p.on_ranks = False
                    p.events.put(_Failure(400, r.message))
        elif isinstance(report, Tokens):
            self._on_tokens(report)

    def _on_tokens(self, report: Tokens) -> None:
        now = time.monotonic()
        for a in report.admitted:
            if (p := self._pending.get(a.id)) is not None:
                p.cached, p.admitted = a.cached, a.at
                with self._lock:
                    self._tally.prompt_tokens += len(p.request.prompt)
                    self._tally.cached_tokens += a.cached
        with self._lock:
            self._recent.append((now, len(report.tokens), report.seconds))
            self._tally.tokens += len(report.tokens)
            self._batch = report.batch
            self._batch_max = max(self._batch_max, self._batch)
        for t in report.tokens:
            p = self._pending.get(t.id)
            if p is None:
                continue  # its client is gone; the ranks drop it at their next step
            p.answering = True
            if p.first is None and (t.text or t.finish is not None):
                p.first = time.time()
                self._ttfts.append(p.first - p.arrived)
                if p.admitted is not None:
                    self.first_tokens.append(
                        FirstToken(
                            p.submitted - p.arrived, p.admitted - p.submitted, report.t - p.admitted, p.first - report.t
                        )
                    )
            if t.finish is not None:
                p.on_ranks = False
            p.events.put(Piece(t.text, t.finish))

    # ---------------------------------------------------------------- status
    def status(self) -> ServeStatus:
        """Requests running and queued, tokens/s, time to first token, the batch.

        Example::

            server.status()     # a table in the notebook; its fields as attributes
        """
        now = time.monotonic()
        with self._lock:
            while self._recent and now - self._recent[0][0] > WINDOW:
                self._recent.popleft()
            # over the time the ranks generated, not the idle seconds between: a burst after a pause
            tokens, busy = sum(n for _, n, _ in self._recent), sum(s for _, _, s in self._recent)
            pending = list(self._pending.values())
            tally = self._tally.copy()
        if self.serving:
            state = "serving"
        elif self.error is not None:
            state = f"stopped: {str(self.error).splitlines()[0] if str(self.error) else type(self.error).__name__}"
        else:
            state = "stopped"
        ttfts = list(self._ttfts)
        return ServeStatus(
            self.url,
            self.model.id if self.model else "-",
            state,
            running=sum(p.answering for p in pending),
            queued=sum(not p.answering for p in pending),
            completed=tally.endings[Ending.COMPLETED],
            cancelled=tally.endings[Ending.CANCELLED],
            failed=tally.endings[Ending.FAILED],
            tokens_per_second=tokens / busy if busy > 0 else 0.0,
            ttft_median=statistics.median(ttfts) if ttfts else None,
            ttft_last=ttfts[-1] if ttfts else None,
            batch=self._batch if self.serving else 0,
            batch_max=self._batch_max,
            generated=tally.tokens,
            uptime=now - self._started if self._started else 0.0,
            prompt_tokens=tally.prompt_tokens,
            cached_tokens=tally.cached_tokens,
            ttft_parts=FirstToken.median(list(self.first_tokens)),
            channel="a direct line (rank 0 runs here)" if self._line is not None else "ipyparallel's channels",
            prefill=str(self.scheduling or ""),
        )

    def __repr__(self) -> str:
        return f"<mlx_nb.Server {self.url} {'serving' if self.serving else 'stopped'}>"


def serve(cluster, port: int = 8000, host: str = "127.0.0.1", api_key: Optional[str] = None, **options: Any) -> Server:
    """Serve the model loaded on ``cluster`` (``load_model``) as an OpenAI-compatible HTTP API.

    ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed or
    not, with ``max_tokens``, ``temperature`` (default 0: greedy, as mlx_lm.server), ``top_p``,
    ``stop`` and ``seed``. Requests are batched continuously: one that arrives while others run
    joins at the next step (on a GPU after waiting up to ``gather`` s for others to share its
    prefill). It listens on 127.0.0.1 unless ``host`` says otherwise, and a host
    reachable from other machines needs ``api_key`` (checked on every request). ``port=0``
    takes a free port. Options: ``model_name`` (the id clients use; default the model's
    name), ``max_batch`` (sequences decoded together, 32), ``prefill_batch`` (most prompts in one
    prefill pass) and ``gather`` (seconds a request arriving while others generate may wait for
    more to share its pass): by default on a GPU ``max_batch`` and 0.05, on a CPU 8 and 0 (see
    :class:`mlx_nb.rank.serve.Scheduling` for why), ``prefill_step``, ``max_body``,
    ``default_max_tokens``, ``line`` (True: where rank 0 runs on this machine, requests and
    tokens take a direct line to it, :mod:`mlx_nb.rank.line`; False: ipyparallel's channels, as
    for a rank 0 on another machine). The notebook stays free; ``stop()`` ends it. ``server.log`` keeps
    what the notebook is not shown: connections that ended badly (a client's reset, say).

    Example::

        server = serve(cluster, port=8000)
        from openai import OpenAI
        client = OpenAI(base_url=server.url, api_key="-")
        client.chat.completions.create(model=server.model.id, messages=[{"role": "user", "content": "Hi"}])
        server.stop()
    """
    return Server(cluster, host, port, api_key, **options).start()
