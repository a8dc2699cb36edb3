"""SPMD execution of one cell: dispatch, live output, results, errors and recovery."""

from __future__ import annotations

import concurrent.futures
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import ipyparallel as ipp

from . import engine
from .cluster import Cluster, ClusterError, SetupCell, _ranges
from .spec import check_timeout

# lines MLX's ring backend writes on fd 2 when a peer goes away: noise, not news
_NOISE = ("[ring]",)
RANK_FAILED = "a rank failed"  # why run_cell stopped waiting, besides a timeout or an interrupt
_SETTLE = 0.5  # seconds after a failure before a rank's trace can say it is stuck
_OUTPUT_WAIT = 5.0  # seconds a rank's end of output may lag its reply before we stop waiting
_CHECK_EVERY = 0.25  # seconds between looks at the ranks' processes while a cell runs


def parse_ranks(spec: Union[int, str, Sequence[int]], n: int) -> list[int]:
    """'0' / 'all' / '0,2' / 1 / [0, 2] -> sorted rank list, checked against n."""
    if isinstance(spec, int):
        ranks = [spec]
    elif isinstance(spec, str):
        if spec.strip() == "all":
            return list(range(n))
        try:
            ranks = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--ranks takes 'all' or rank numbers like 0,2; got {spec!r}") from None
    else:
        ranks = list(spec)
    bad = [r for r in ranks if not 0 <= r < n]
    if bad or not ranks:
        raise ValueError(f"--ranks {spec!r}: this cluster has ranks 0-{n - 1}")
    return sorted(set(ranks))


def label(ranks: Sequence[int]) -> str:
    return f"[rank {ranks[0]}]" if len(ranks) == 1 else f"[ranks {_ranges(ranks)}]"


@dataclass
class CellResult:
    """What a %%mlx_dist cell produced: per-rank reports, rank 0's value, pulled values."""

    results: list[dict]
    value: Optional[dict] = None
    pulled: Any = None
    wall: float = 0.0
    notes: list[str] = field(default_factory=list)
    profile: Any = None  # a CellProfile with profile=True

    def _repr_mimebundle_(self, include=None, exclude=None):
        return self.value

    @property
    def ok(self) -> bool:
        return all(r and not r.get("error") for r in self.results)


class DistCellError(Exception):
    """A %%mlx_dist cell failed; the message leads with the root-cause rank."""

    def __init__(self, report: str, root: Optional[dict] = None, result: Optional[CellResult] = None):
        super().__init__(report)
        self.report, self.root, self.result = report, root, result

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of a traceback through mlx_nb's own frames
        return self.report.splitlines()


class _Printer:
    """Rank output into the notebook: live, labelled, whole lines, duplicates merged."""

    def __init__(self, show: list[int]):
        self.show, self.single = show, len(show) == 1
        self.partial = {(r, s): "" for r in show for s in ("stdout", "stderr")}
        self.lines: dict[tuple, list[str]] = {(r, s): [] for r in show for s in ("stdout", "stderr")}
        self.emitted = {"stdout": 0, "stderr": 0}
        self.finished: set[int] = set()

    def feed(self, rank: int, stream: str, text: str) -> None:
        if rank not in self.show:
            return
        key = (rank, stream)
        if self.single and stream == "stdout":
            _write(stream, text)  # live, even without a newline (streamed tokens)
            return
        text = self.partial[key] + text
        *whole, self.partial[key] = text.split("\n")
        self.lines[key].extend(whole)
        self._emit(stream)

    def finish(self, rank: int) -> None:
        self.finished.add(rank)
        for stream in ("stdout", "stderr"):
            key = (rank, stream)
            if key in self.partial and self.partial[key]:
                self.lines[key].append(self.partial[key])
                self.partial[key] = ""
            self._emit(stream)

    def _emit(self, stream: str) -> None:
        while True:
            k = self.emitted[stream]
            have = {r: self.lines[(r, stream)] for r in self.show}
            if any(len(lines) <= k and r not in self.finished for r, lines in have.items()):
                return
            texts: dict[str, list[int]] = {}
            for r, lines in have.items():
                if len(lines) > k:
                    texts.setdefault(lines[k], []).append(r)
            if not texts:
                return
            self.emitted[stream] = k + 1
            for text, ranks in texts.items():
                if stream == "stderr" and text.lstrip().startswith(_NOISE):
                    continue
                prefix = "" if self.single else label(ranks) + " "
                _write(stream, prefix + text + "\n")


def _write(stream: str, text: str) -> None:
    out = sys.stdout if stream == "stdout" else sys.stderr
    out.write(text)
    out.flush()


def _display(content: dict) -> None:
    from IPython.display import publish_display_data

    publish_display_data(content.get("data", {}), content.get("metadata", {}))


def run_cell(
    cluster: Cluster,
    code: str,
    *,
    ranks: Union[int, str, Sequence[int]] = 0,
    timeout: Optional[float] = None,
    push: Optional[dict] = None,
    pull: Optional[str] = None,
    setup: bool = False,
    quiet: bool = False,
    register: bool = True,
    on_report: Optional[Callable[[int, dict], None]] = None,
    profile: bool = False,
) -> CellResult:
    """Run ``code`` on every rank at once, streaming the output of ``ranks`` live.

    Raises DistCellError (root cause first) if any rank fails; a cluster left
    unusable by the failure is restarted, and its setup cells replayed, first.

    Example::

        cluster.run("x = mx.distributed.all_sum(mx.array([rank]))\\nx")
    """
    cluster._require_running()
    check_timeout(timeout, "timeout")
    show = [] if quiet else parse_ranks(ranks, cluster.n)
    heal_lost_ranks(cluster)
    if push:
        cluster.push(push)
    cell_id = cluster.next_cell_id()
    printer = _Printer(show)
    events: "queue.Queue[tuple]" = queue.Queue()
    traces: dict[int, dict] = {}
    cluster.live = traces  # where each rank is, while the cell runs
    t0 = time.perf_counter()
    pull_from = show if len(show) > 1 else [0]
    # one apply to the whole view: the same dispatch cost as a raw DirectView call
    ar = cluster._cells_view().apply_async(engine.run_cell, code, cell_id, show, pull, pull_from, profile)
    ars = dict(zip(range(cluster.n), ar._children))  # per-rank message futures, rank order
    finished = _Finished(ars, events)
    inbox = _Inbox(ars, events, printer, traces, on_report)

    results: dict[int, Optional[dict]] = {}
    failure: Optional[str] = None  # why we stopped waiting: timeout / interrupt / rank failure
    first_error_at = None
    checked = t0
    try:
        while len(results) < cluster.n:
            try:
                kind, rank, payload = events.get(timeout=0.25)
            except queue.Empty:
                kind = None
            if kind == "poke":
                inbox.drain(rank)
            for rank in finished.new(results):
                results[rank] = _outcome(ars[rank], finished.wait(rank))
                inbox.drain(rank)
                printer.finish(rank)
                if results[rank].get("error") and first_error_at is None:
                    first_error_at = time.perf_counter()
            now = time.perf_counter()
            # not after every message (a stream of output would pay it per line)
            check = kind is None or first_error_at is not None or now - checked > _CHECK_EVERY
            if check:
                checked = now
            lost = [r for r in cluster._dead_ranks() if r not in results] if check else []
            for r in lost:
                results[r] = {"rank": r, "lost": True, "error": None}
            if lost and first_error_at is None:
                first_error_at = now
            if timeout is not None and now - t0 > timeout and len(results) < cluster.n:
                failure = f"--timeout {timeout:g} s expired"
                break
            if first_error_at is not None and (
                now - first_error_at > cluster.grace
                # a trace is a moment old: give the ranks time to report leaving a collective
                or (now - first_error_at > _SETTLE and _stuck(cluster.n, results, traces))
            ):
                failure = RANK_FAILED
                break
    except KeyboardInterrupt:
        failure = _stop_cooperatively(cluster, results, inbox, events, ars, finished, printer)
    wall = time.perf_counter() - t0
    if failure is None and any(res.get("lost") for res in results.values()):
        failure = RANK_FAILED  # every rank has reported, but a group that lost one cannot go on

    if failure is not None:
        return _recover(cluster, ars, results, traces, printer, inbox, events, finished, failure, wall)
    for r in show:
        printer.finish(r)
    for r, res in results.items():
        if "active_memory" in res:
            cluster.ranks[r].active_memory, cluster.ranks[r].peak_memory = res["active_memory"], res["peak_memory"]
    cell = CellResult(
        [results[r] for r in range(cluster.n)],
        value=_value_of(results, show),
        pulled=None if pull is None else (
            [results[r].get("pulled") for r in pull_from] if len(pull_from) > 1 else results[0].get("pulled")
        ),
        wall=wall,
    )
    if profile:
        from .profile import CellProfile, record

        cell.profile = CellProfile.from_results(cell.results)
        record(cell.profile)
    if not cell.ok:
        raise _error(cluster, cell, traces, restarted=None)
    if setup and register:
        cluster.setup_cells.append(SetupCell(code, dict(push or {})))
    return cell


def _stop_cooperatively(cluster, results, inbox, events, ars, finished, printer) -> Optional[str]:
    """First interrupt: ask the ranks to stop at a point they agree on, and wait.

    Returns None when every rank finished (the cell ends normally), else why not.
    """
    if not any(t.get("polls_stop") for t in inbox.traces.values()):
        return "interrupted"  # the cell never looks at the stop flag: interrupt the ranks
    cluster.on_message("Interrupt: asking every rank to stop (interrupt again to force)...")
    cluster.request_stop()
    try:
        for rank in _finishing(events, inbox, ars, finished, results, time.perf_counter() + cluster.grace, lambda: False):
            printer.finish(rank)
    except KeyboardInterrupt:
        pass
    return None if len(results) == cluster.n else "interrupted"


def _finishing(events, inbox, ars, finished, results, deadline, give_up) -> Iterator[int]:
    """Yield each rank that finishes before ``deadline`` (or until ``give_up()``), recording it."""
    finished.every = True  # each rank that finishes now matters at once
    while len(results) < len(ars) and time.perf_counter() < deadline and not give_up():
        try:
            kind, rank, _ = events.get(timeout=0.1)
            inbox.drain(rank)
        except queue.Empty:
            pass
        for rank in finished.new(results):
            results[rank] = _outcome(ars[rank], finished.wait(rank))
            inbox.drain(rank)
            yield rank


def _stuck(n: int, results: dict, traces: dict) -> list[int]:
    """Unfinished ranks waiting in a collective that can no longer complete.

    Such a rank evaluates a pending collective whose other side has stopped: a
    group-wide one once any rank has stopped, or a send/recv whose peer has. It
    sits in MLX's native wait, where SIGINT does not reach it.
    """
    stuck = []
    for r in range(n):
        t = traces.get(r) or {}
        if r in results or not (t.get("in_eval") and t.get("pending")):
            continue
        peer = t["pending"][0].get("peer")
        if (peer is None and results) or (peer is not None and peer in results):
            stuck.append(r)
    return stuck


class _Inbox:
    """What each rank's engine has sent so far, read from ipyparallel's own record.

    The iopub callback only pokes the main thread; reading the accumulated record
    means output that arrived before we subscribed is not lost.
    """

    def __init__(self, ars: dict, events: "queue.Queue", printer: _Printer, traces: dict, on_report=None):
        self.md = {r: child.output.metadata for r, child in ars.items()}
        self.printer, self.traces, self.on_report = printer, traces, on_report
        self.last_report = {r: "" for r in ars}
        self.seen = {(r, s): 0 for r in ars for s in ("stdout", "stderr", "outputs")}
        for r, child in ars.items():
            child.iopub_callbacks.append(lambda msg, r=r: _poke(events, r, msg))
        for r in ars:
            self.drain(r)

    def drain(self, rank: int) -> None:
        md = self.md[rank]
        for name in ("stdout", "stderr"):
            text, k = md[name] or "", (rank, name)
            if len(text) > self.seen[k]:
                self.printer.feed(rank, name, text[self.seen[k] :])
                self.seen[k] = len(text)
        outputs, k = md["outputs"], (rank, "outputs")
        for content in outputs[self.seen[k] :]:
            if rank in self.printer.show:
                if not self.printer.single:
                    _write("stdout", label([rank]) + "\n")
                _display(content)
        self.seen[k] = len(outputs)
        reports = sorted(k for k in md["data"] if k.startswith("mlx_nb_report_") and k > self.last_report[rank])
        for key in reports:
            self.last_report[rank] = key
            if self.on_report is not None:
                self.on_report(rank, md["data"][key])
        if "mlx_nb_trace" in md["data"]:
            self.traces[rank] = md["data"]["mlx_nb_trace"]


def _poke(events: "queue.Queue", rank: int, msg: dict) -> None:
    # status messages carry nothing to show: waking the notebook's thread for them costs
    # a context switch each (the end of a rank's output is _Finished's business)
    if msg["header"]["msg_type"] != "status":
        events.put(("poke", rank, None))


class _Finished:
    """Which ranks have finished: their reply *and* their last output have arrived.

    Both arrive on ipyparallel's I/O thread. The notebook's thread is woken for a
    rank that failed (the others may now be stuck), for the last rank, or for every
    rank once ``every`` is set (while stopping); otherwise it reads ``new()`` when
    it wakes anyway. One wake-up per healthy cell instead of one per message.
    """

    def __init__(self, ars: dict, events: "queue.Queue"):
        self.ars, self.events = ars, events
        self.lock = threading.Lock()
        self.ranks: list[int] = []
        self.every = False
        self.replied: dict[int, float] = {}  # rank -> when its reply came, its output not yet complete
        self.forced: set[int] = set()
        for rank, child in ars.items():
            check = lambda _f, rank=rank: self._check(rank)  # noqa: E731
            child.add_done_callback(check)
            child.output.add_done_callback(check)

    def _check(self, rank: int) -> None:
        child = self.ars[rank]
        if not child.done():
            return
        try:
            result = child.result()
        except BaseException:  # cancelled, or an exception set on the future
            result = None
        failed = not isinstance(result, dict) or bool(result.get("error"))
        # a failed rank may send no end-of-output (a dead engine): _outcome waits briefly
        if not (failed or child.output.done()):
            with self.lock:
                self.replied.setdefault(rank, time.monotonic())
            return
        with self.lock:
            if rank in self.ranks:
                return
            self.ranks.append(rank)
            last = len(self.ranks) == len(self.ars)
        if failed or last or self.every:
            self.events.put(("done", rank, None))

    def new(self, results: dict) -> list[int]:
        now = time.monotonic()
        with self.lock:
            for r, at in self.replied.items():
                # its end-of-output message never came (the controller's relay can drop
                # messages under a flood): take the rank as finished rather than wait forever
                if r not in self.ranks and now - at > _OUTPUT_WAIT:
                    self.ranks.append(r)
                    self.forced.add(r)
            return [r for r in self.ranks if r not in results]

    def wait(self, rank: int) -> float:
        """How long _outcome may still wait for the rank's output."""
        return 0.0 if rank in self.forced else _OUTPUT_WAIT


def _outcome(child, wait: float = _OUTPUT_WAIT) -> dict:
    """A finished rank's report; waits (briefly) for its last output to arrive."""
    concurrent.futures.wait([child.output], timeout=wait)
    try:
        result = child.result()
    except BaseException as e:  # cancelled, or an exception set on the future
        result = e
    # an engine that died mid-task comes back as EngineError, raised or wrapped
    if isinstance(result, ipp.error.EngineError) or getattr(result, "ename", "") == "EngineError":
        return {"lost": True, "error": None}
    if isinstance(result, ipp.RemoteError):
        return {"error": {"type": result.ename, "message": str(result.evalue),
                          "traceback": result.traceback or "", "time": time.time()}}
    if not isinstance(result, dict):  # TaskAborted and the like: ipyparallel's, not the cell's
        return {"error": {"type": type(result).__name__, "message": str(result),
                          "traceback": "", "time": time.time()}}
    return result


def _value_of(results: dict, show: list[int]) -> Optional[dict]:
    for r in sorted(results):
        if r in show and results[r].get("value"):
            return results[r]["value"]
    return None


def heal_lost_ranks(cluster: Cluster) -> None:
    """Before a cell: a rank that died while idle (or a failed restart) means new ranks."""
    dead = cluster._dead_ranks()
    if not dead:
        return
    if cluster.ranks:
        why = f"{label(dead)} lost: engine process exited while idle"
    else:
        why = "no ranks are running (the last restart failed)"
    cluster.on_message(f"{why}; restarting the cluster...")
    t0 = time.perf_counter()
    took = cluster.restart(reason=why)
    cluster.on_message(f"Restarted {cluster.n} ranks in {time.perf_counter() - t0:.1f} s.")
    if cluster.setup_cells:
        cluster.on_message(_replayed(cluster, took) + ".")


def _recover(cluster, ars, results, traces, printer, inbox, events, finished, failure, wall) -> CellResult:
    """Stop waiting: interrupt what still runs, restart if the group cannot go on."""
    running = [r for r in range(cluster.n) if r not in results]
    if running:
        # a rank in Python stops at once; one in MLX's native wait only when (if) it returns
        cluster.signal(signal.SIGINT, running)
        # after a rank failed, the others have had the grace period already
        wait = cluster.grace if failure != RANK_FAILED else min(cluster.grace, 1.0)
        stuck = lambda: set(running) <= set(_stuck(cluster.n, results, traces))  # noqa: E731
        for rank in _finishing(events, inbox, ars, finished, results, time.perf_counter() + wait, stuck):
            running.remove(rank)
            err = results[rank].get("error")
            if err and err["type"] == "KeyboardInterrupt":
                results[rank]["interrupted"] = True
    for r in printer.show:
        printer.finish(r)
    for r in running:
        results[r] = {"rank": r, "blocked": True, "error": None, "trace": traces.get(r, {})}
    # the group survives only if no rank is stuck and no rank was lost
    must_restart = bool(running) or any(res.get("lost") for res in results.values())
    cell = CellResult([results[r] for r in range(cluster.n)], wall=wall)
    cell.notes.append(failure)
    restarted = None
    if must_restart:
        t0 = time.perf_counter()
        try:
            replay = cluster.restart(reason=failure)
            restarted = (time.perf_counter() - t0, replay)
        except (ClusterError, ipp.error.TimeoutError) as e:
            restarted = e
        except KeyboardInterrupt:
            # a second interrupt: keep the explanation of the first failure, and what is left
            # (no half-formed group: restart() removed it) is repaired by the next cell
            restarted = ClusterError("interrupted before the new ranks were ready")
    raise _error(cluster, cell, traces, restarted=restarted, failure=failure)


def _describe_rank(res: dict, trace: Optional[dict]) -> str:
    trace = trace or {}
    at = f" at line {trace['line']}" if trace.get("line") else ""
    if res.get("lost"):
        seen = f" (last seen at line {trace['line']})" if trace.get("line") else ""
        return f"lost: its engine process died{seen}"
    if res.get("blocked"):
        if _in_collective(trace):
            return f"blocked in a collective: {_collective(trace)}{at}"
        return f"still running{at}, not in a collective; stopped by the restart"
    err = res.get("error")
    if err:
        where = f" at line {err['lineno']}" if err.get("lineno") else ""
        if res.get("interrupted"):
            return f"interrupted{where}" + (f": {err['line']}" if err.get("line") else "")
        return f"raised {err['type']}: {err['message']}{where}"
    return "finished"


def _in_collective(trace: dict) -> bool:
    return bool(trace.get("in_eval") and trace.get("pending"))


def _collective(trace: dict) -> str:
    """'all_sum #2 (shape (4,), float32)': the first pending call, the one an eval waits in."""
    call = trace["pending"][0]
    details = [f"shape {tuple(call['shape'])}, {call['dtype']}"] if "shape" in call else []
    if call.get("peer") is not None:
        details.append(f"{'to' if call['op'] == 'send' else 'from'} rank {call['peer']}")
    text = f"{call['op']} #{call['seq']}" + (f" ({'; '.join(details)})" if details else "")
    more = trace.get("n_pending", 1) - 1
    return text + (f", {more} more pending after it" if more > 0 else "")


def _root_cause(results: list[dict]) -> Optional[int]:
    """The rank that failed first: lost, else the earliest real error, else a straggler."""
    lost = [r for r, res in enumerate(results) if res.get("lost")]
    if lost:
        return lost[0]
    errs = [
        (res["error"].get("time", 0), r)
        for r, res in enumerate(results)
        if res.get("error") and not res.get("interrupted") and not _consequence(res["error"])
    ]
    if errs:
        return min(errs)[1]
    # stopped by an interrupt or --timeout while others waited in a collective: it held them up
    if any(res.get("blocked") for res in results):
        late = [r for r, res in enumerate(results) if res.get("interrupted")]
        if late:
            return late[0]
    errs = [(res["error"].get("time", 0), r) for r, res in enumerate(results) if res.get("error") and not res.get("interrupted")]
    return min(errs)[1] if errs else None


def _consequence(err: dict) -> bool:
    """An error a rank gets because another rank went away, not a cause."""
    return "peer was lost" in err.get("message", "")


def _replayed(cluster: Cluster, took: float) -> str:
    firsts = [(c.code.strip().splitlines() or [""])[0] for c in cluster.setup_cells]
    shown = "; ".join(f if len(f) <= 50 else f[:47] + "..." for f in firsts)
    return f"Replayed {len(firsts)} setup cell(s) on the new ranks in {took:.1f} s: {shown}"


def _same_error(a: Optional[dict], b: Optional[dict]) -> bool:
    return bool(a and b) and (a["type"], a["message"], a.get("lineno")) == (b["type"], b["message"], b.get("lineno"))


def _error(cluster, cell: CellResult, traces: dict, restarted=None, failure=None) -> DistCellError:
    results = cell.results
    errors = [res.get("error") for res in results]
    lines: list[str] = []
    if failure is None and all(errors) and all(_same_error(e, errors[0]) for e in errors):
        e = errors[0]
        lines.append(f"{label(list(range(cluster.n)))} all raised {e['type']}: {e['message']}")
        lines.append(e["traceback"].rstrip())
        lines.append("Every rank failed the same way; no restart was needed: the ranks and their state are kept.")
        return DistCellError("\n".join(lines), root=e, result=cell)
    root = _root_cause(results)
    if failure and failure != RANK_FAILED:
        lines.append(f"%%mlx_dist: {failure}.")
    same = [root] if root is not None else []
    if root is not None:
        res = results[root]
        if res.get("lost"):
            t = traces.get(root) or {}
            seen = f", last seen at line {t['line']}" if t.get("line") else ""
            lines.append(f"Root cause: rank {root} was lost (its engine process died mid-cell{seen}).")
        elif res.get("interrupted"):
            e = res["error"]
            where = f" line {e['lineno']}: {e['line']}" if e.get("lineno") else " Python code"
            lines.append(
                f"Root cause: rank {root} had not reached the collective the others wait in: "
                f"it was running{where} when interrupted."
            )
        else:
            e = res["error"]
            # ranks that raised the very same error share the root-cause line
            same = [r for r, x in enumerate(results) if not x.get("interrupted") and _same_error(x.get("error"), e)]
            where = f", line {e['lineno']}: {e['line']}" if e.get("lineno") else ""
            who = f"rank {root}" if len(same) == 1 else f"ranks {_ranges(same)}"
            lines.append(f"Root cause: {who} raised {e['type']}: {e['message']}{where}")
            lines.append(e["traceback"].rstrip())
    for r, res in enumerate(results):
        if r not in same:
            lines.append(f"  rank {r}: {_describe_rank(res, traces.get(r))}")
    if isinstance(restarted, Exception):
        lines.append(
            f"Restarting the cluster failed: {restarted}\n"
            "The next cell tries again (or %mlx_cluster restart now)."
        )
    elif restarted is not None:
        took, replay = restarted
        lines.append(
            f"The group could not go on, so all {cluster.n} ranks were restarted ({took:.1f} s); "
            "the cluster is ready for the next cell."
        )
        if cluster.setup_cells:
            lines.append(_replayed(cluster, replay) + ".")
    else:
        lines.append("No restart was needed: the ranks and their state are kept.")
    return DistCellError("\n".join(lines), root=results[root] if root is not None else None, result=cell)
