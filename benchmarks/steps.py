"""Where a server's steps go: a recorder of mlx-lm's ``BatchGenerator`` steps, the same in both servers.

Both mlx_nb's ranks and mlx_lm.server generate with mlx-lm's ``BatchGenerator``; ``install(path)``
wraps its step (``_next``) in this process so that each step appends one line to ``path``: when
it began (time.time), the sequences decoding after it, the prompt tokens it prefilled, the
tokens it returned and the seconds the call took. ``summary(read(path), start, end)`` reads
them back for a scenario's time window: how many steps, how often a step also prefilled, the
time from one step's start to the next (everything the server does between steps included),
with and without a prefill, and the server's own time between steps. One step goes unrecorded
in mlx_nb: the last of a batch whose sequences all end at ``max_tokens``, which it takes
without the generator's call (``mlx_nb.rank.batch._last_tokens``).

    python benchmarks/serve.py --steps ...   installs it in both servers and prints the table

``install(path, phases=True)`` (``serve.py --phases``) also times the parts of a prefilling step,
each evaluated where it happens (MLX is lazy: otherwise each part's work lands in the next one's
evaluation), with the process's minor page faults over each, to ``path.phases``: the merge of the
new sequences' caches into one batch cache (``merge``), that batch joined to the prompt batch
(``join prompts``), the model's pass over the prompt tokens (``prefill pass``), the prefilled
sequences split off (``split``) and joined to the decoding batch (``join decoding``). Subclasses
loaded by then that override one of these (mlx_nb's rank: ``mlx_nb.rank.batch``) are timed as
the part too, counted once with the mlx-lm method they call. The extra evaluations cost a little:
time a server's steps without them.
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

IDLE = 0.5  # seconds between two steps past which the server was waiting for work, not stepping


def install(path: str, rank: int = 0, phases: bool = False) -> None:
    """Record every ``BatchGenerator`` step of this process to ``path`` (appended, a line each;
    a rank other than 0 to ``path.rankN``); ``phases``: the parts of a prefilling step too."""
    from mlx_lm.generate import BatchGenerator

    out = open(path if rank == 0 else f"{path}.rank{rank}", "a", buffering=1)  # noqa: SIM115 (open for the process's life)
    step = getattr(BatchGenerator._next, "__wrapped__", BatchGenerator._next)

    def _next(self):
        t = time.time()
        before = self._counters.prompt_tokens
        prompts, tokens = step(self)
        prefilled = self._counters.prompt_tokens - before
        out.write(f"{t:.6f} {len(self._generation_batch)} {prefilled} {len(tokens)} {time.time() - t:.6f}\n")
        return prompts, tokens

    _next.__wrapped__ = step
    BatchGenerator._next = _next
    if phases:
        _install_phases(open(f"{out.name}.phases", "a", buffering=1))  # noqa: SIM115


PHASES = {  # (class, method) of mlx-lm's generate module -> the part of a step it is
    ("PromptProcessingBatch", "__init__"): "merge",
    ("PromptProcessingBatch", "extend"): "join prompts",
    ("PromptProcessingBatch", "prompt"): "prefill pass",
    ("PromptProcessingBatch", "split"): "split",
    ("GenerationBatch", "extend"): "join decoding",
}


def _install_phases(out) -> None:
    import importlib
    import threading

    import mlx.core as mx

    generate = importlib.import_module("mlx_lm.generate")  # the module (``mlx_lm.generate`` is also a function)
    inside = threading.local()  # a part that calls another (an override calling mlx-lm's) counts once

    def timed(method, name: str):
        def call(self, *args, **kwargs):
            if getattr(inside, "part", None):
                return method(self, *args, **kwargs)
            inside.part = name
            try:
                t, f = time.time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                got = method(self, *args, **kwargs)
                caches = [self, got] if name == "split" else [self]  # split: both halves
                mx.eval([c.state for b in caches for c in b.prompt_cache if not c.empty()])
            finally:
                inside.part = None
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f
            out.write(f"{t:.6f} {name.replace(' ', '_')} {time.time() - t:.6f} {faults}\n")
            return got

        call.__wrapped__ = method
        return call

    def overriding(klass: type, method: str):
        """``klass`` and those of its subclasses loaded so far that define ``method`` themselves
        (mlx_nb's rank overrides some: ``mlx_nb.rank.batch``)."""
        if method in vars(klass):
            yield klass
        for sub in klass.__subclasses__():
            yield from overriding(sub, method)

    for (cls, method), name in PHASES.items():
        for klass in overriding(getattr(generate, cls), method):
            real = vars(klass)[method]
            setattr(klass, method, timed(getattr(real, "__wrapped__", real), name))


def read_phases(path: str, start: float, end: float) -> dict[str, tuple[int, float, int]]:
    """Each part's calls, seconds and page faults over the steps begun in [start, end)."""
    got: dict[str, tuple[int, float, int]] = {}
    if not Path(path).exists():
        return got
    for line in Path(path).read_text().splitlines():
        t, name, took, faults = line.split()
        if start <= float(t) < end:
            n, s, f = got.get(name.replace("_", " "), (0, 0.0, 0))
            got[name.replace("_", " ")] = (n + 1, s + float(took), f + int(faults))
    return got


def read(path: str) -> list[tuple[float, int, int, int, float]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        t, batch, prefilled, tokens, inside = line.split()
        rows.append((float(t), int(batch), int(prefilled), int(tokens), float(inside)))
    return rows


def summary(rows: list[tuple[float, int, int, int, float]], start: float, end: float) -> dict:
    """The steps begun in [start, end): counts, and the median time from each to the next."""
    inside = [r for r in rows if start <= r[0] < end]
    gaps = [(b[0] - a[0], a) for a, b in zip(inside, inside[1:]) if b[0] - a[0] < IDLE]
    prefilling = [g for g, r in gaps if r[2] > 0]
    decoding = [g for g, r in gaps if r[2] == 0]
    med = lambda xs: statistics.median(xs) * 1000 if xs else float("nan")
    return {
        "steps": len(inside),
        "prefilling": len([r for r in inside if r[2] > 0]),
        "prompt tokens": sum(r[2] for r in inside),
        "tokens": sum(r[3] for r in inside),
        "batch": statistics.mean(r[1] for r in inside) if inside else float("nan"),
        "step ms": med([g for g, _ in gaps]),
        "decode-only ms": med(decoding),
        "with prefill ms": med(prefilling),
        # a step that prefilled, the generator's call alone: a long prefill (past IDLE) counts here
        "prefill call ms": med([r[4] for r in inside if r[2] > 0]),
        # the server's own time between two steps (its loop, its threads): the step's start to the
        # next's, less the time inside the generator's call (which waits for the step before)
        "between ms": med([g - r[4] for g, r in gaps]),
        "stepping s": sum(g for g, _ in gaps),
    }
