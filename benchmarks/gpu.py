"""mlx_nb on a CUDA machine: the demo, the benchmarks and sharded generation on one GPU, in one run.

    python benchmarks/gpu.py [--tokenizer .gpu/tokenizer] [--out DIR] [--budget 540]

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

It prints one table at the end, every ratio against a baseline measured in the same run;
each stage's whole output goes to ``DIR/gpu.log`` and the numbers to ``DIR/gpu.json``.

How to run it on the lent ``nvidia-h200`` machine (Python 3.12 with PyTorch's CUDA 13
libraries, NCCL and numpy, but no mlx, ipyparallel, Jupyter or mlx-lm, and no package
registry in reach):

1. Here, once, in the checkout the device tool sends (``.whl/`` is ignored by git; add
   ``/.gpu/`` to ``.git/info/exclude``)::

       python benchmarks/gpu.py prepare

   It downloads the wheels of ``WHEELS`` (for cp312, manylinux x86-64) into ``.whl/rest/``,
   ``mlx-cuda-13`` into ``.whl/cuda/`` split in two parts (``part-aa``, 40 MiB, and
   ``part-ab``: the 90 MB wheel is more than one call carries), and copies the bundled model's tokenizer
   into ``.gpu/tokenizer/``. (From another worktree, copy the tree into ``.gpu/tree/`` and
   run from there.)
2. Call 1 carries ``.whl/rest``, ``.whl/cuda/part-aa`` and ``.whl/cuda/NAME`` and only
   stages them (installing part of the wheels now would leave a ``/tmp/site/bin`` that the
   second install does not add ``mlx.launch`` to)::

       mkdir -p /tmp/w && cp .whl/rest/*.whl .whl/cuda/part-aa .whl/cuda/NAME /tmp/w/

3. Call 2, while the machine is still warm (it keeps files 30 s after a call), carries
   ``.whl/cuda/part-ab``, ``.whl/serve`` (the openai client, for ``benchmarks/serve.py``) and
   ``.gpu``, joins the wheel, installs everything in one go, links
   the image's CUDA libraries where ``libmlx.so`` looks for them (its RPATH is
   ``$ORIGIN/../../nvidia/*/lib``, i.e. ``/tmp/site/nvidia``) and runs::

       cat /tmp/w/part-aa .whl/cuda/part-ab > /tmp/w/$(cat /tmp/w/NAME) && rm /tmp/w/part-aa &&
       python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/w/*.whl .whl/serve/*.whl &&
       ln -sfn /opt/torch/.venv/lib/python3.12/site-packages/nvidia /tmp/site/nvidia &&
       export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 &&
       python3 benchmarks/gpu.py --tokenizer .gpu/tokenizer --out $OUT

   (``--target`` puts the console scripts in ``/tmp/site/bin``: ``mlx.launch`` must be on
   ``PATH``. The whole run takes about 5 minutes.)

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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()

# what the machine lacks, at the versions measured (mlx_nb's own dependencies and theirs)
WHEELS = [
    "mlx==0.32.4",
    "mlx-lm==0.32.2",
    "ipyparallel==9.2.0",
    "pyzmq==27.3.0",
    "ipykernel==7.4.0",
    "ipython==9.18.1",
    "jupyter_client==8.10.0",
    "jupyter_core==5.9.1",
    "tornado==6.6.1",
    "traitlets==5.16.1",
    "ipywidgets==8.1.9",
    "comm==0.2.3",
    "debugpy==1.8.22",
    "decorator==5.3.1",
    "jedi==0.20.1",
    "parso==0.8.7",
    "matplotlib-inline==0.2.2",
    "nest-asyncio2==1.7.4",
    "pexpect==4.9.0",
    "ptyprocess==0.7.0",
    "prompt_toolkit==3.0.53",
    "wcwidth==0.9.4",
    "stack-data==0.6.3",
    "asttokens==3.0.2",
    "executing==2.3.0",
    "pure_eval==0.2.4",
    "ipython_pygments_lexers==1.1.1",
    "platformdirs==4.14.9",
    "widgetsnbextension==4.0.16",
    "jupyterlab_widgets==3.0.17",
]
# the official openai client, for benchmarks/serve.py (the machine has httpx, h11, anyio, idna,
# certifi): in .whl/serve/, carried by the second call (the first is full)
SERVE_WHEELS = [
    "openai==3.63.0",
    "httpx2==2.17.0",
    "httpcore2==2.17.0",
    "truststore==0.10.5",
    "jiter==0.19.0",
    "pydantic==2.14.4",
    "pydantic_core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "typing_extensions==4.16.0",
    "sniffio==1.3.1",
]
CUDA_WHEEL = "mlx-cuda-13==0.32.4"
FIRST_PART = 40 * 2**20  # bytes of that 90 MB wheel in its first part: each call stays under 64 MiB
PLATFORMS = [
    "manylinux_2_35_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux_2_31_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]

# the random llama: about 3.0e9 parameters (Llama-3.2-3B's shape with SmolLM2's vocabulary)
MODEL = dict(
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=24,
    num_key_value_heads=8,
    head_dim=128,
)
LAYERS_PER_FILE = 4
SPECIAL_TOKENS = 17  # SmolLM2's ids 0-16: their embeddings are zero, so greedy decoding never stops early
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

STAGES = {  # name: seconds it may take at most, in the order they run
    "ranks": 120,
    "demo": 60,
    "model": 120,
    "generate": 300,
    "dispatch": 120,
    "collectives": 180,
}


# ------------------------------------------------------------------ prepare (here)
def prepare(wheels: Path, gpu: Path) -> int:
    """Download the wheels, split mlx-cuda-13 in two, copy the tokenizer: what the calls carry."""
    common = ["--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    common += [x for p in PLATFORMS for x in ("--platform", p)]
    pip = [sys.executable, "-m", "pip", "download", "-q", *common]
    for sub in ("rest", "serve", "cuda"):
        (wheels / sub).mkdir(parents=True, exist_ok=True)
    subprocess.run([*pip, "-d", str(wheels / "rest"), *WHEELS], check=True)
    subprocess.run([*pip, "-d", str(wheels / "serve"), *SERVE_WHEELS], check=True)
    subprocess.run([*pip, "-d", str(wheels / "cuda"), CUDA_WHEEL], check=True)
    whl = next((wheels / "cuda").glob("mlx_cuda_13-*.whl"))
    data = whl.read_bytes()
    half = FIRST_PART  # call 1 carries it with the rest, call 2 the remainder with the tree
    (wheels / "cuda" / "part-aa").write_bytes(data[:half])
    (wheels / "cuda" / "part-ab").write_bytes(data[half:])
    (wheels / "cuda" / "NAME").write_text(whl.name + "\n")
    whl.unlink()  # the parts travel; the whole would only be sent by mistake
    from mlx_nb.models import bundled_model

    (gpu / "tokenizer").mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (gpu / "tokenizer" / name).write_bytes((bundled_model() / name).read_bytes())
    sizes = {
        p: sum(f.stat().st_size for f in p.glob("*")) for p in (wheels / "rest", wheels / "serve", gpu / "tokenizer")
    }
    for p, n in sizes.items():
        print(f"{p}: {n / 2**20:.1f} MiB")
    print(
        f"{wheels / 'cuda'}: part-aa {half / 2**20:.1f} MiB, part-ab {(len(data) - half) / 2**20:.1f} MiB ({whl.name})"
    )
    return 0


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


def stage_ranks() -> dict:
    import mlx.core as mx

    from mlx_nb import Cluster, hostfile, last_profile
    from mlx_nb.display import findings_table, human_bytes, status_table
    from mlx_nb.engines.hosts import check_hosts

    out: dict = {"mlx": mx.__version__, "default_device": str(mx.default_device())}
    info = mx.device_info()
    out["device_info"] = {k: v for k, v in info.items()}
    print(f"MLX {mx.__version__}, default device {mx.default_device()}, mx.device_info(): {info}")
    try:
        print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"nvidia-smi: {e}")

    found = Cluster(n=2).check()
    print(findings_table(found))
    out["preflight"] = [str(f) for f in found]
    # NCCL: two ranks on this one host (mlx_nb's ranks of a nccl hostfile get one GPU each)
    two = hostfile.from_hosts("127.0.0.1", 2)
    found = check_hosts(two, "nccl")
    print(findings_table([f for f in found if f.check in ("gpu", "versions")]))
    out["preflight_nccl"] = [str(f) for f in found if f.check == "gpu"]
    try:
        Cluster(hostfile=two, backend="nccl")
        out["nccl_two_on_one"] = "accepted"
    except ValueError as e:
        out["nccl_two_on_one"] = str(e)
    print(f"\nCluster(hostfile=2 x 127.0.0.1, backend='nccl'): {out['nccl_two_on_one']}\n")

    with Cluster(n=2) as c:
        print(status_table(c))
        ranks = c.status()
        out["status_device"] = [f"{r.device} {r.device_name}" for r in ranks]
        out["status_device_memory"] = ranks[0].device_memory
        out["idle_active"] = [r.active_memory for r in ranks]
        held = c.run(HOLD_CELL, ranks="all", pull="res").pulled
        time.sleep(0.5)
        table = status_table(c)
        print("\nafter a cell that keeps 1 GiB and frees a 2 GiB temporary on each rank:")
        print(table)
        ranks = c.status()
        apps = nvidia_smi_apps()
        out["held"] = [
            {
                "rank": r.rank,
                "status_active": r.active_memory,
                "status_peak": r.peak_memory,
                "status_cache": r.cache_memory,
                "cell_active": h["active"],
                "cell_peak": h["peak"],
                "nvidia_smi_mib": apps.get(r.pid),
            }
            for r, h in zip(ranks, held)
        ]
        for h in out["held"]:
            print(
                f"rank {h['rank']}: status memory {human_bytes(h['status_active'])}, cached {human_bytes(h['status_cache'])}, "
                f"peak {human_bytes(h['status_peak'])}; nvidia-smi says its process holds {h['nvidia_smi_mib']} MiB"
            )
        res = c.run(PROFILE_CELL, ranks="all", pull="res", profile=True).pulled
        prof = last_profile()
        print("\n%%mlx_dist --profile of 16 float32 4096x4096 matmuls per rank (both ranks share the GPU):")
        print(prof.table())
        out["profile"] = [
            {
                "rank": p.rank,
                "eval": p.eval_time,
                "wall": p.wall,
                "in_cell": r["in_cell"],
                "sync_after": r["sync_after"],
                "tflops_eval": r["flop"] / p.eval_time / 1e12 if p.eval_time else 0.0,
            }
            for p, r in zip(sorted(prof.ranks, key=lambda p: p.rank), res)
        ]
        for p in out["profile"]:
            print(
                f"rank {p['rank']}: in mx.eval {p['eval'] * 1e3:.1f} ms, the cell's own timer {p['in_cell'] * 1e3:.1f} ms, "
                f"mx.synchronize() after it {p['sync_after'] * 1e3:.2f} ms: {p['tflops_eval']:.1f} TFLOP/s"
            )
    return out


# ------------------------------------------------------------------ stage: model
def stage_model(folder: Path, tokenizer: Path) -> dict:
    import mlx.core as mx
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tokenizer / name).read_bytes())
    vocab = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).get_vocab_size()
    vocab = -(-vocab // 64) * 64
    h, f, layers = MODEL["hidden_size"], MODEL["intermediate_size"], MODEL["num_hidden_layers"]
    kv = MODEL["num_key_value_heads"] * MODEL["head_dim"]
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        **MODEL,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    mx.random.seed(0)

    def normal(*shape):
        return mx.random.normal(shape, dtype=mx.bfloat16, scale=0.02)

    files = [list(range(i, min(i + LAYERS_PER_FILE, layers))) for i in range(0, layers, LAYERS_PER_FILE)]
    total, weight_map, params = len(files) + 1, {}, 0
    for k, ids in enumerate([None, *files], 1):
        name = f"model-{k:05d}-of-{total:05d}.safetensors"
        w = {}
        if ids is None:
            emb = normal(vocab, h)
            w["model.embed_tokens.weight"] = mx.concatenate(
                [mx.zeros((SPECIAL_TOKENS, h), mx.bfloat16), emb[SPECIAL_TOKENS:]]
            )
            w["model.norm.weight"] = mx.ones((h,), mx.bfloat16)
        for i in ids or []:
            p = f"model.layers.{i}."
            w[p + "self_attn.q_proj.weight"] = normal(h, h)
            w[p + "self_attn.k_proj.weight"] = normal(kv, h)
            w[p + "self_attn.v_proj.weight"] = normal(kv, h)
            w[p + "self_attn.o_proj.weight"] = normal(h, h)
            w[p + "mlp.gate_proj.weight"] = normal(f, h)
            w[p + "mlp.up_proj.weight"] = normal(f, h)
            w[p + "mlp.down_proj.weight"] = normal(h, f)
            w[p + "input_layernorm.weight"] = mx.ones((h,), mx.bfloat16)
            w[p + "post_attention_layernorm.weight"] = mx.ones((h,), mx.bfloat16)
        mx.eval(w)
        mx.save_safetensors(str(folder / name), w, metadata={"format": "mlx"})
        params += sum(a.size for a in w.values())
        weight_map.update(dict.fromkeys(w, name))
        del w
        mx.clear_cache()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 2 * params}, "weight_map": weight_map}, indent=2)
    )
    took = time.perf_counter() - t0
    print(
        f"random-weight llama: {params / 1e9:.2f}e9 parameters, bfloat16, {layers} layers, hidden {h}, "
        f"vocab {vocab}, {2 * params / 2**30:.1f} GiB in {total} files, written in {took:.1f} s to {folder}"
    )
    return {"params": params, "bytes": 2 * params, "seconds": took, "folder": str(folder), "vocab": vocab}


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


def plain_script(path: str, n: int, tokens: int) -> dict:
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
    row["wall"] = time.perf_counter() - t0
    return medians(row)


def medians(row: dict) -> dict:
    """tps and ttft: the medians of the measured replies (their lists stay beside them)."""
    return {**row, "tps": statistics.median(row["tps_all"]), "ttft": statistics.median(row["ttft_all"])}


def through_mlx_nb(path: str, n: int, tokens: int) -> dict:
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
    return medians(
        {
            "tps_all": [s.generation_tps for s in replies],
            "ttft_all": [s.ttft for s in replies],
            "tokens": stats.generation_tokens,
            "prompt_tokens": stats.prompt_tokens,
            "prompt_tps": stats.prompt_tps,
            "load": loaded["seconds"],
            "peak": max(stats.peak_memory),
            "ready": ready,
            "delay_median": statistics.median(delays),
            "wall": time.perf_counter() - t0,
        }
    )


def spread(values: list[float], scale: float = 1.0) -> str:
    return f"({min(values) * scale:.1f}-{max(values) * scale:.1f})"


def stage_generate(path: str) -> dict:
    out = {}
    for n in (1, 2):
        for side, fn in (("script", plain_script), ("mlx_nb", through_mlx_nb)):
            t0 = time.perf_counter()
            try:
                out[f"{side}_{n}"] = r = fn(path, n, TOKENS)
                print(
                    f"{side}, {n} rank{'s' * (n > 1)}: {r['tps']:.1f} tok/s {spread(r['tps_all'])}, "
                    f"first token {r['ttft'] * 1e3:.0f} ms {spread(r['ttft_all'], 1e3)} "
                    f"({r['prompt_tokens']} prompt tokens at {r['prompt_tps']:.0f} tok/s), {r['tokens']} tokens, "
                    f"load {r['load']:.1f} s, peak {r['peak'] / 2**30:.2f} GiB per rank "
                    f"({time.perf_counter() - t0:.0f} s in all)",
                    flush=True,
                )
            except Exception as e:  # the other side still runs
                out[f"{side}_{n}"] = {"error": f"{type(e).__name__}: {e}"}
                print(f"{side}, {n} ranks FAILED: {e}", flush=True)
    return out


# ------------------------------------------------------------------ stages that run other scripts
def run_script(args: list[str], timeout: float) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    print(p.stdout)
    if p.returncode:
        print(p.stderr[-3000:])
        raise RuntimeError(f"{' '.join(args)} exited {p.returncode}")
    return {"seconds": time.perf_counter() - t0, "stdout": p.stdout}


def stage_demo() -> dict:
    r = run_script(["-m", "mlx_nb.cli", "demo", "-n", "4"], 55)
    ready = next((line for line in r["stdout"].splitlines() if line.startswith("Ready in")), "")
    return {
        "seconds": r["seconds"],
        "ready": float(ready.split()[2]) if ready else None,
        "all_reduce_ok": "expected 6): ok" in r["stdout"],
        "sharded_ok": "max error vs unsharded" in r["stdout"],
    }


def stage_script(name: str, extra: list[str], timeout: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        summary = f.name
    r = run_script([str(ROOT / "benchmarks" / f"{name}.py"), *extra, "--summary", summary], timeout)
    return {"seconds": r["seconds"], **json.loads(Path(summary).read_text())}


# ------------------------------------------------------------------ the run
def run_stage(name: str, args, log, deadline: float) -> dict:
    left = deadline - time.monotonic()
    limit = min(STAGES[name], left - 5)
    if limit < 20:
        print(f"== {name}: not run (time budget spent)", flush=True)
        return {"skipped": "time budget"}
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    cmd = [
        sys.executable,
        str(HERE),
        "stage",
        name,
        "--json",
        result,
        "--tokenizer",
        str(args.tokenizer),
        "--model",
        str(args.model),
    ]
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
    try:
        out = json.loads(Path(result).read_text())
    except (OSError, ValueError):
        out = {}
    if rc != 0:
        out.setdefault("error", f"exit {rc}")
    print(f"   {name}: {'ok' if rc == 0 else 'FAILED (' + str(rc) + ')'} in {took:.0f} s", flush=True)
    return out


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def median_cell(row: dict, key: str, scale: float = 1.0) -> str:
    """'median (min-max)' of the replies measured."""
    if key not in row:
        return "-"
    return f"{row[key] * scale:.1f} {spread(row[key + '_all'], scale)}"


def summary_table(r: dict):
    from mlx_nb.display import Table

    rows = []
    g = r.get("generate", {})
    for n in (1, 2):
        nb, sc = g.get(f"mlx_nb_{n}", {}), g.get(f"script_{n}", {})
        base = "script alone (= mlx.launch -n 1)" if n == 1 else "mlx.launch -n 2 --backend ring script"
        if "tps" in nb or "tps" in sc:
            rows.append(
                [
                    f"generation tok/s, {n} rank{'s' * (n > 1)}",
                    median_cell(nb, "tps"),
                    base,
                    median_cell(sc, "tps"),
                    ratio(nb.get("tps"), sc.get("tps")),
                ]
            )
            rows.append(
                [
                    f"time to first token (ms), {n} rank{'s' * (n > 1)}",
                    median_cell(nb, "ttft", 1e3),
                    base,
                    median_cell(sc, "ttft", 1e3),
                    ratio(nb.get("ttft"), sc.get("ttft")),
                ]
            )
        for side in (nb, sc):
            if "error" in side:
                rows.append([f"generation, {n} ranks", "FAILED", "", side["error"][:80], ""])
    one, two = g.get("mlx_nb_1", {}), g.get("mlx_nb_2", {})
    if "tps" in one and "tps" in two:
        rows.append(
            [
                "generation tok/s, mlx_nb 2 ranks / 1 rank",
                f"{two['tps']:.1f}",
                "mlx_nb, 1 rank",
                f"{one['tps']:.1f}",
                ratio(two["tps"], one["tps"]),
            ]
        )
        rows.append(
            [
                "token -> notebook delay, median (ms), mlx_nb 1 / 2 ranks",
                f"{one['delay_median'] * 1e3:.1f} / {two['delay_median'] * 1e3:.1f}",
                "-",
                "-",
                "-",
            ]
        )
        rows.append(
            [
                "peak GPU memory per rank (GiB), mlx_nb",
                f"{two['peak'] / 2**30:.2f} (2 ranks)",
                "mlx_nb, 1 rank",
                f"{one['peak'] / 2**30:.2f}",
                ratio(two["peak"], one["peak"]),
            ]
        )
    k = r.get("ranks", {})
    for p in k.get("profile", []):
        rows.append(
            [
                f"profiled cell, rank {p['rank']}: in mx.eval (ms)",
                f"{p['eval'] * 1e3:.1f}",
                "the cell's own timer",
                f"{p['in_cell'] * 1e3:.1f}",
                f"{ratio(p['eval'], p['in_cell'])} ({p['tflops_eval']:.1f} TFLOP/s)",
            ]
        )
    for h in k.get("held", []):
        if h.get("nvidia_smi_mib"):
            held = (h["status_active"] + h.get("status_cache", 0)) / 2**20
            rows.append(
                [
                    f"rank {h['rank']}: memory + cached in the status table (MiB)",
                    f"{held:.0f}",
                    "nvidia-smi, the rank's process",
                    f"{h['nvidia_smi_mib']}",
                    f"{ratio(held, h['nvidia_smi_mib'])} (the rest: its CUDA context)",
                ]
            )
    d = r.get("demo", {})
    if "ready" in d:
        rows.append(
            [
                "mlx-nb demo -n 4: ready (s)",
                f"{d['ready']}",
                "all-reduce / sharded Linear",
                f"{'ok' if d['all_reduce_ok'] else 'WRONG'} / {'ok' if d['sharded_ok'] else 'WRONG'}",
                "-",
            ]
        )
    s = r.get("dispatch", {})
    if "cell_ms" in s:
        rows.append(
            [
                "empty cell round trip (ms), 4 ranks",
                f"{s['cell_ms']:.2f}",
                "DirectView.execute, same engines",
                f"{s['same_raw_ms']:.2f}",
                ratio(s["cell_ms"], s["same_raw_ms"]),
            ]
        )
        rows.append(
            [
                "start to ready (s), 4 ranks",
                f"{s['start']:.2f}",
                "raw ipp.Cluster + manual init",
                f"{s['raw_start']:.2f}",
                ratio(s["start"], s["raw_start"]),
            ]
        )
        rows.append(
            [
                "start to ready (s), 4 ranks",
                f"{s['start']:.2f}",
                "mlx.launch -n 4 all-reduce script",
                f"{s['launch_start']:.2f}",
                ratio(s["start"], s["launch_start"]),
            ]
        )
    c = r.get("collectives", {})
    if "ratio" in c:
        op, size, a, b = c["largest"]
        rows.append(
            [
                f"collective sweep, 4 ranks, sum of medians (ms); {c['rounds']} rounds",
                f"{c['total_nb'] * 1e3:.2f}",
                "plain mlx.launch script",
                f"{c['total_launch'] * 1e3:.2f}",
                f"{c['ratio']:.3f}x (spread {c['spread']['mlx_nb']:.2f} / {c['spread']['mlx.launch']:.2f})",
            ]
        )
        rows.append(
            [
                f"{op} {size / 2**20:.0f} MB, 4 ranks (ms)",
                f"{a * 1e3:.1f}",
                "plain mlx.launch script",
                f"{b * 1e3:.1f}",
                ratio(a, b),
            ]
        )
    for name, v in r.items():
        if isinstance(v, dict) and ("skipped" in v or ("error" in v and name != "generate")):
            rows.append([f"stage {name}", "not measured", "", v.get("skipped") or v.get("error"), ""])
    return Table(["measure", "mlx_nb", "baseline", "baseline value", "mlx_nb / baseline"], rows)


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
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.command == "prepare":
        return prepare(args.wheels, args.tokenizer.parent)
    if args.command == "stage":
        fns = {
            "ranks": stage_ranks,
            "model": lambda: stage_model(args.model, args.tokenizer),
            "generate": lambda: stage_generate(str(args.model)),
            "demo": stage_demo,
            "dispatch": lambda: stage_script("dispatch", ["-n", "4", "--cells", "150"], 110),
            "collectives": lambda: stage_script(
                "collectives", ["-n", "4", "--sizes", "1KB-64MB", "--factor", "8", "--rounds", "5"], 170
            ),
        }
        out = fns[args.stage]()
        Path(args.json).write_text(json.dumps(out, default=str))
        return 0

    deadline = time.monotonic() + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    stages = args.only.split(",") if args.only else list(STAGES)
    results = {}
    with open(args.out / "gpu.log", "a") as log:
        for name in stages:
            results[name] = run_stage(name, args, log, deadline)
            (args.out / "gpu.json").write_text(json.dumps(results, indent=1, default=str))
    title = "mlx_nb on one GPU, ratios against baselines measured in this run"
    gpu = results.get("ranks", {}).get("device_info", {}).get("device_name")
    if gpu:
        title += f" ({gpu}, MLX {results['ranks'].get('mlx')}, ring backend)"
    m = results.get("model", {})
    if "params" in m:
        title += (
            f"; generation: random-weight llama built on the machine, {m['params'] / 1e9:.2f}e9 params bf16, "
            f"tensor parallel, {TOKENS} tokens, median (range) of {REPLIES} replies"
        )
    table = summary_table(results)
    table.title = title
    print(table)
    (args.out / "gpu-table.txt").write_text(repr(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
