"""mlx_nb on a CUDA machine: the demo, the benchmarks and sharded generation on one GPU, in one run.

    python benchmarks/gpu.py [--tokenizer .gpu/tokenizer] [--out DIR] [--budget 540] [--only ranks,demo]
    python benchmarks/gpu.py prepare    # here, before: the tokenizer and the wheels, in calls
    python benchmarks/gpu.py prepare --cpu  # the same with MLX's CPU build: serve.py on its CPU cores

On one machine with one NVIDIA GPU this runs, each stage in a process of its own and
under one time budget:

1. ``ranks``: what mlx_nb shows about a rank on CUDA. Preflight (``Cluster.check()``) of 2
   local ranks, and of a 2-rank NCCL hostfile on this host; the ``%mlx_cluster status``
   table (device and GPU name from ``mx.device_info``, memory in use and peak from MLX's
   CUDA allocator, held against ``nvidia-smi``'s per-process figure); a profiled cell
   (``%%mlx_dist --profile``) of float32 matmuls whose ``mx.eval`` time is held against a
   timer in the cell.
2. ``demo``: ``mlx-nb demo -n 4``, unchanged.
3. ``model``: a random-weight llama of about 3 billion parameters (bfloat16, 28 layers,
   hidden size 3072, the bundled SmolLM2's tokenizer), built on the machine in mlx-lm's
   format. Its replies are noise; its speed is that of a real model of that shape.
4. ``generate``: tensor-parallel generation with that model, 1 rank and 2 ranks sharing the
   GPU (ring backend): tok/s and time to first token through mlx_nb's generation
   (``mlx_nb.generate.load_model`` / ``generate``, what ``%mlx_generate`` calls) against a
   plain script with the same weights, prompt and tokens (``mlx.launch -n 2 --backend
   ring`` for 2 ranks; for 1 rank the script runs alone, as ``mlx.launch -n 1`` would).
5. ``dispatch``: ``benchmarks/dispatch.py -n 4 --cells 150``.
6. ``collectives``: ``benchmarks/collectives.py -n 4 --sizes 1KB-64MB --factor 8 --rounds 5``.

Each stage returns what it measured as small dataclasses, each of which gives its lines of the
table; the table at the end is built from those rows, every ratio against a baseline measured
in the same run. Each stage's whole output goes to ``DIR/gpu.log`` and the rows to ``DIR/gpu.json``.

The lent machine has no package registry. ``prepare`` (here, once) copies the bundled model's
tokenizer into ``.gpu/tokenizer`` and has ``scripts/carry-wheels.py`` download the wheels of
``benchmarks/gpu-wheels.txt`` into ``.whl/`` in calls that each carry less than the tool takes;
it prints what each call carries and runs, the last call ending in this script
(docs/carrying-wheels.md). ``prepare --cpu`` carries MLX's CPU build instead (cpu-wheels.txt,
into ``.whl/cpu/``), and its last call runs ``benchmarks/serve.py`` on the machine's 16 CPU
cores, quieter than a small VM's, with a random model of the bundled SmolLM2's shape in float32
(``benchmarks/random_llama.py``).

NCCL is not measured: it needs one GPU per rank (``mlx.launch`` gives rank r
``CUDA_VISIBLE_DEVICES=r``), and the ``ranks`` stage shows how mlx_nb refuses two ranks
on one GPU for it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from gpu_rows import (
    Collectives,
    Demo,
    Dispatch,
    Generation,
    Generations,
    HeldMemory,
    Model,
    NotMeasured,
    ProfiledCell,
    Ranks,
    as_json,
    spread,
    summary_table,
    title,
)
from random_llama import write_random_llama

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()
WHEELS = HERE.parent / "gpu-wheels.txt"  # what the lent machine lacks, at the versions measured
CPU_WHEELS = HERE.parent / "cpu-wheels.txt"  # the same with MLX's CPU build, for its CPU cores
# prepare --cpu's command: the serving benchmark on the machine's CPU cores (quiet, 16 of them), with
# a random model of the bundled SmolLM2's shape in float32 (what the bundled model's dense copy computes
# here; the bundled model is not there, and a call carries 64 MiB)
CPU_RUN = (
    "python3 benchmarks/random_llama.py --shape smollm2 --dtype float32 --tokenizer {tokenizer} "
    "/tmp/mlx_nb-random-smollm2 && python3 benchmarks/serve.py --model /tmp/mlx_nb-random-smollm2 "
    "--rounds 2 --system-words 1000 --steps > $OUT/serve.txt 2>&1; tail -c 8000 $OUT/serve.txt"
)
# where the lent machine's CUDA libraries are: libmlx.so looks in $ORIGIN/../../nvidia/*/lib
NVIDIA = "/opt/torch/.venv/lib/python3.12/site-packages/nvidia"

TOKENS = 128  # generated per measured reply
REPLIES = 3  # measured replies per configuration (after one warm-up): the table has their median
PROMPT = [
    {
        "role": "user",
        "content": "Here are my notes about the sea. "
        + " ".join(
            f"Note {i}: the tide rose over the rocks at dawn, the gulls turned over the harbour, and the boats "
            "came back with the morning light."
            for i in range(1, 25)
        )
        + " Write three sentences about them.",
    }
]


# ------------------------------------------------------------------ stage: ranks
PROFILE_CELL = """
import time
t0 = time.perf_counter()
x = mx.random.normal((4096, 4096))
mx.eval(x)
ys = [x @ (x + i) for i in range(16)]
mx.eval(ys)
in_cell = time.perf_counter() - t0
t1 = time.perf_counter()
mx.synchronize()
after = time.perf_counter() - t1
res = {"in_cell": in_cell, "sync_after": after, "flop": 16 * 2 * 4096 ** 3}
"""
HOLD_CELL = """
held = mx.zeros((256, 1024, 1024))  # 1 GiB of float32, kept
tmp = mx.ones((512, 1024, 1024))  # 2 GiB, freed before the cell ends
mx.eval(held, tmp)
del tmp
res = {"active": mx.get_active_memory(), "peak": mx.get_peak_memory()}
"""


def nvidia_smi_apps() -> dict[int, int]:
    """pid -> MiB of GPU memory, as nvidia-smi sees the processes."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    apps = {}
    for line in out.splitlines():
        f = [x.strip() for x in line.split(",")]
        if len(f) == 2 and f[0].isdigit() and f[1].isdigit():
            apps[int(f[0])] = int(f[1])
    return apps


def stage_ranks() -> Ranks:
    import mlx.core as mx

    from mlx_nb import Cluster

    info = mx.device_info()
    out = Ranks(mlx=mx.__version__, default_device=str(mx.default_device()), device_info=dict(info.items()))
    print(f"MLX {mx.__version__}, default device {mx.default_device()}, mx.device_info(): {info}")
    try:
        print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"nvidia-smi: {e}")
    preflight(out)
    with Cluster(n=2) as c:
        held_memory(c, out)
        profiled_cell(c, out)
    return out


def preflight(out: Ranks) -> None:
    """Preflight of 2 local ranks, and of 2 NCCL ranks on this one GPU (refused)."""
    from mlx_nb import Cluster, hostfile
    from mlx_nb.display import findings_table
    from mlx_nb.engines.hosts import check_hosts

    found = Cluster(n=2).check()
    print(findings_table(found))
    out.preflight = [str(f) for f in found]
    # NCCL: two ranks on this one host (mlx_nb's ranks of a nccl hostfile get one GPU each)
    two = hostfile.from_hosts("127.0.0.1", 2)
    found = check_hosts(two, "nccl")
    print(findings_table([f for f in found if f.check in ("gpu", "versions")]))
    out.preflight_nccl = [str(f) for f in found if f.check == "gpu"]
    try:
        Cluster(hostfile=two, backend="nccl")
        out.nccl_two_on_one = "accepted"
    except ValueError as e:
        out.nccl_two_on_one = str(e)
    print(f"\nCluster(hostfile=2 x 127.0.0.1, backend='nccl'): {out.nccl_two_on_one}\n")


def held_memory(c, out: Ranks) -> None:
    """The status table before and after a cell that keeps 1 GiB, against nvidia-smi."""
    from mlx_nb.display import human_bytes, status_table

    print(status_table(c))
    ranks = c.status()
    out.status_device = [f"{r.device} {r.device_name}" for r in ranks]
    out.status_device_memory = ranks[0].device_memory
    out.idle_active = [r.active_memory for r in ranks]
    held = c.run(HOLD_CELL, ranks="all", pull="res").pulled
    time.sleep(0.5)
    table = status_table(c)
    print("\nafter a cell that keeps 1 GiB and frees a 2 GiB temporary on each rank:")
    print(table)
    ranks = c.status()
    apps = nvidia_smi_apps()
    out.held = [
        HeldMemory(
            rank=r.rank,
            status_active=r.active_memory,
            status_peak=r.peak_memory,
            status_cache=r.cache_memory,
            cell_active=h["active"],
            cell_peak=h["peak"],
            nvidia_smi_mib=apps.get(r.pid),
        )
        for r, h in zip(ranks, held)
    ]
    for h in out.held:
        print(
            f"rank {h.rank}: status memory {human_bytes(h.status_active)}, cached {human_bytes(h.status_cache)}, "
            f"peak {human_bytes(h.status_peak)}; nvidia-smi says its process holds {h.nvidia_smi_mib} MiB"
        )


def profiled_cell(c, out: Ranks) -> None:
    """``%%mlx_dist --profile`` of float32 matmuls: its eval time against the cell's own timer."""
    from mlx_nb import last_profile

    res = c.run(PROFILE_CELL, ranks="all", pull="res", profile=True).pulled
    prof = last_profile()
    print("\n%%mlx_dist --profile of 16 float32 4096x4096 matmuls per rank (both ranks share the GPU):")
    print(prof.table())
    out.profile = [
        ProfiledCell(
            rank=p.rank,
            eval=p.eval_time,
            wall=p.wall,
            in_cell=r["in_cell"],
            sync_after=r["sync_after"],
            tflops_eval=r["flop"] / p.eval_time / 1e12 if p.eval_time else 0.0,
        )
        for p, r in zip(sorted(prof.ranks, key=lambda p: p.rank), res)
    ]
    for p in out.profile:
        print(
            f"rank {p.rank}: in mx.eval {p.eval * 1e3:.1f} ms, the cell's own timer {p.in_cell * 1e3:.1f} ms, "
            f"mx.synchronize() after it {p.sync_after * 1e3:.2f} ms: {p.tflops_eval:.1f} TFLOP/s"
        )


# ------------------------------------------------------------------ stage: generate
SCRIPT = """
import json, sys, time
import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.utils import sharded_load
path, tokens, prompt, n = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
group = mx.distributed.init(strict=True, backend="ring") if n > 1 else mx.distributed.init()
t0 = time.perf_counter()
model, tokenizer = sharded_load(path, tensor_group=group)
load = time.perf_counter() - t0

def reply(k):
    mx.reset_peak_memory()
    t0, ttft = time.perf_counter(), None  # from the chat messages, as mlx_nb's ttft is
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    for r in stream_generate(model, tokenizer, ids, max_tokens=k):
        ttft = ttft or time.perf_counter() - t0
    return r, ttft

reply(4)  # warm, as mlx_nb's side is warmed
rows = [reply(tokens) for _ in range(int(sys.argv[5]))]
if group.rank() == 0:
    r = rows[-1][0]
    print(json.dumps({"tps_all": [x.generation_tps for x, _ in rows], "ttft_all": [t for _, t in rows],
                      "tokens": r.generation_tokens, "prompt_tokens": r.prompt_tokens, "prompt_tps": r.prompt_tps,
                      "load": load, "peak": mx.get_peak_memory()}))
"""


def plain_script(path: str, n: int, tokens: int) -> Generation:
    import shutil

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(SCRIPT)
    args = [sys.executable, f.name, path, str(tokens), json.dumps(PROMPT), str(n), str(REPLIES)]
    if n > 1:
        launcher = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
        args = [launcher, "-n", str(n), "--backend", "ring", "--", *args]
    t0 = time.perf_counter()
    p = subprocess.run(args, capture_output=True, text=True, timeout=240)
    if p.returncode:
        raise RuntimeError(f"{' '.join(args[:6])} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    row = json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])
    return Generation("script", n, **row, wall=time.perf_counter() - t0)


def through_mlx_nb(path: str, n: int, tokens: int) -> Generation:
    from mlx_nb import Cluster
    from mlx_nb.generate import generate, load_model

    t0 = time.perf_counter()
    with Cluster(n=n, spares=False) as cluster:
        ready = time.perf_counter() - t0
        loaded = load_model(cluster, path, progress=False)
        generate(cluster, PROMPT, 4, quiet=True)  # warm, as the script's first reply is
        replies = [generate(cluster, PROMPT, tokens, quiet=True) for _ in range(REPLIES)]
    stats = replies[-1]
    delays = sorted(d for s in replies for d in s.delays) or [0.0]
    return Generation(
        "mlx_nb",
        n,
        tps_all=[s.generation_tps for s in replies],
        ttft_all=[s.ttft for s in replies],
        tokens=stats.generation_tokens,
        prompt_tokens=stats.prompt_tokens,
        prompt_tps=stats.prompt_tps,
        load=loaded["seconds"],
        peak=max(stats.peak_memory),
        ready=ready,
        delay_median=statistics.median(delays),
        wall=time.perf_counter() - t0,
    )


def stage_generate(path: str) -> Generations:
    out = Generations()
    for n in (1, 2):
        for side, fn in (("script", plain_script), ("mlx_nb", through_mlx_nb)):
            t0 = time.perf_counter()
            try:
                out.runs.append(r := fn(path, n, TOKENS))
                print(
                    f"{side}, {n} rank{'s' * (n > 1)}: {r.tps:.1f} tok/s {spread(r.tps_all)}, "
                    f"first token {r.ttft * 1e3:.0f} ms {spread(r.ttft_all, 1e3)} "
                    f"({r.prompt_tokens} prompt tokens at {r.prompt_tps:.0f} tok/s), {r.tokens} tokens, "
                    f"load {r.load:.1f} s, peak {r.peak / 2**30:.2f} GiB per rank "
                    f"({time.perf_counter() - t0:.0f} s in all)",
                    flush=True,
                )
            except Exception as e:  # the other side still runs
                out.runs.append(Generation(side, n, error=f"{type(e).__name__}: {e}"))
                print(f"{side}, {n} ranks FAILED: {e}", flush=True)
    return out


# ------------------------------------------------------------------ stages that run other scripts
def run_script(args: list[str], timeout: float) -> tuple[float, str]:
    """Seconds it took, and what it printed."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    print(p.stdout)
    if p.returncode:
        print(p.stderr[-3000:])
        raise RuntimeError(f"{' '.join(args)} exited {p.returncode}")
    return time.perf_counter() - t0, p.stdout


def stage_demo() -> Demo:
    seconds, stdout = run_script(["-m", "mlx_nb.cli", "demo", "-n", "4"], 55)
    ready = next((line for line in stdout.splitlines() if line.startswith("Ready in")), "")
    return Demo(
        seconds=seconds,
        ready=float(ready.split()[2]) if ready else None,
        all_reduce_ok="expected 6): ok" in stdout,
        sharded_ok="max error vs unsharded" in stdout,
    )


def script_summary(name: str, extra: list[str], timeout: float) -> dict:
    """The seconds benchmarks/NAME.py took, and the numbers its ``--summary`` wrote."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        summary = f.name
    seconds, _ = run_script([str(ROOT / "benchmarks" / f"{name}.py"), *extra, "--summary", summary], timeout)
    return {"seconds": seconds, **json.loads(Path(summary).read_text())}


def stage_dispatch() -> Dispatch:
    return Dispatch(**script_summary("dispatch", ["-n", "4", "--cells", "150"], 110))


def stage_collectives() -> Collectives:
    extra = ["-n", "4", "--sizes", "1KB-64MB", "--factor", "8", "--rounds", "5"]
    return Collectives(**script_summary("collectives", extra, 170))


# ------------------------------------------------------------------ the run
@dataclass
class Stage:
    """A stage: at most how long it may take, what it returns, and how it runs (in ``args``)."""

    seconds: float
    result: type
    run: Callable[[argparse.Namespace], object]  # the parsed arguments -> its result

    def read(self, data: dict):
        """Its result, from what the stage's process wrote."""
        return self.result.from_json(data) if hasattr(self.result, "from_json") else self.result(**data)


STAGES = {  # in the order they run
    "ranks": Stage(120, Ranks, lambda args: stage_ranks()),
    "demo": Stage(60, Demo, lambda args: stage_demo()),
    "model": Stage(120, Model, lambda args: write_random_llama(args.model, args.tokenizer)),
    "generate": Stage(300, Generations, lambda args: stage_generate(str(args.model))),
    "dispatch": Stage(120, Dispatch, lambda args: stage_dispatch()),
    "collectives": Stage(180, Collectives, lambda args: stage_collectives()),
}


def run_stage(name: str, args, log, deadline: float):
    """Stage ``name`` in a process of its own, within its time and the run's: its result, or
    NotMeasured."""
    left = deadline - time.monotonic()
    limit = min(STAGES[name].seconds, left - 5)
    if limit < 20:
        print(f"== {name}: not run (time budget spent)", flush=True)
        return NotMeasured("time budget")
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    cmd = [sys.executable, str(HERE), "stage", name, "--json", result]
    cmd += ["--tokenizer", str(args.tokenizer), "--model", str(args.model)]
    print(f"== {name} (at most {limit:.0f} s)", flush=True)
    log.write(f"\n{'=' * 30} {name}\n")
    log.flush()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = p.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the stage and every rank it started
        p.wait()
        rc = "timeout"
    took = time.perf_counter() - t0
    print(f"   {name}: {'ok' if rc == 0 else 'FAILED (' + str(rc) + ')'} in {took:.0f} s", flush=True)
    if rc != 0:
        return NotMeasured(f"exit {rc}")
    try:
        return STAGES[name].read(json.loads(Path(result).read_text()))
    except (OSError, ValueError, TypeError) as e:
        return NotMeasured(f"its result could not be read: {e}")


# ------------------------------------------------------------------ prepare (here)
def prepare(wheels: Path, tokenizer: Path, cpu: bool = False) -> int:
    """Here, once: the bundled model's tokenizer into ``tokenizer``, and scripts/carry-wheels.py
    for the wheels of gpu-wheels.txt (it says what each call carries and runs). ``cpu``: those
    of cpu-wheels.txt (MLX's CPU build) into ``wheels/cpu``, for CPU_RUN."""
    from mlx_nb.models import bundled_model

    tokenizer.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tokenizer / name).write_bytes((bundled_model() / name).read_bytes())
    print(f"{tokenizer}: the bundled model's tokenizer")
    here = lambda p: os.path.relpath(p, ROOT)  # the calls run in the tree's root
    tok = here(tokenizer)
    if cpu:
        reqs, out, link, run = CPU_WHEELS, wheels / "cpu", [], CPU_RUN.format(tokenizer=tok)
    else:
        reqs, out, link = WHEELS, wheels, ["--link", f"nvidia={NVIDIA}"]
        run = f"python3 benchmarks/gpu.py --tokenizer {tok} --out $OUT"
    cmd = [sys.executable, str(ROOT / "scripts" / "carry-wheels.py"), "-r", here(reqs), "--python", "3.12"]
    cmd += ["--out", here(out), "--also", here(tokenizer.parent), *link, "--then", run]
    return subprocess.run(cmd, cwd=ROOT).returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", nargs="?", default="run", choices=["run", "prepare", "stage"])
    p.add_argument("stage", nargs="?", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=ROOT / ".gpu" / "tokenizer",
        help="a folder with tokenizer.json and tokenizer_config.json (prepare copies the bundled model's)",
    )
    p.add_argument(
        "--model",
        type=Path,
        default=Path(tempfile.gettempdir()) / "mlx_nb-random-llama-3b",
        help="where the random model is written",
    )
    p.add_argument("--out", type=Path, default=Path("."), help="where gpu.log and gpu.json go")
    p.add_argument("--budget", type=float, default=540, help="seconds for all stages together (default 540)")
    p.add_argument("--only", default=None, help="comma-separated stages to run (default all)")
    p.add_argument("--wheels", type=Path, default=ROOT / ".whl", help=argparse.SUPPRESS)
    p.add_argument(
        "--cpu", action="store_true", help="prepare: MLX's CPU build and the serving benchmark on the CPU cores"
    )
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.command == "prepare":
        return prepare(args.wheels, args.tokenizer, args.cpu)
    if args.command == "stage":
        Path(args.json).write_text(json.dumps(asdict(STAGES[args.stage].run(args)), default=str))
        return 0

    deadline = time.monotonic() + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    with open(args.out / "gpu.log", "a") as log:
        for name in args.only.split(",") if args.only else list(STAGES):
            results[name] = run_stage(name, args, log, deadline)
            (args.out / "gpu.json").write_text(as_json(results))
    table = summary_table(results)
    table.title = title(results, TOKENS, REPLIES)
    print(table)
    (args.out / "gpu-table.txt").write_text(repr(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
