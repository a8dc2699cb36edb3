"""Serving: %mlx_serve against mlx_lm.server under mlx.launch, same ranks, layout, model and prompts.

    python benchmarks/serve.py [-n 2] [--tensor] [--tokens 32] [--levels 1,4,8,16] [--rounds 2]

The two servers take turns, one at a time on the machine (mlx_lm.server's idle ranks poll and
would take CPU from the other's): each round runs every concurrency level on one, then on the
other, in the other order the next round, so that drift in the machine's load falls on both. Per level: N streamed chat requests with N different prompts, sent at once
by the official openai client; aggregate tokens/s (completion tokens from each stream's usage,
over the wall time from the first request sent to the last token) and time to first content
token, median over the requests; the table keeps each level's best round. Greedy decoding, the
BLAS mlx_nb's ranks load (OpenBLAS on Linux where installed) in both: on such a CPU, the
bundled model's dense float32 copy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from mlx_nb.rank import blas

blas.use()  # as in the ranks, for the report of what ran

from mlx_nb import Cluster  # noqa: E402
from mlx_nb.display import Table  # noqa: E402
from mlx_nb.generate import load_model  # noqa: E402
from mlx_nb.models import resolve  # noqa: E402
from mlx_nb.serve import serve  # noqa: E402

TOPICS = [
    "the sea",
    "a lighthouse",
    "a mountain",
    "a city at night",
    "a forest",
    "the desert",
    "a river",
    "a library",
    "a train",
    "the moon",
    "a garden",
    "a storm",
    "a market",
    "an island",
    "a bridge",
    "winter",
]
PROMPTS = [[{"role": "user", "content": f"Write a long story about {t}."}] for t in TOPICS]

# mlx_lm.server on every rank, with the BLAS mlx_nb's ranks load
LAUNCHED = """
import sys
from mlx_nb.rank import blas
blas.use()
sys.argv = ["mlx_lm.server"] + sys.argv[1:]
from mlx_lm.server import main  # its classes must live in mlx_lm.server: ranks share requests pickled
main()
"""


def measure(base_url: str, model: str, n: int, tokens: int) -> dict:
    """``n`` concurrent streamed chat requests: aggregate tok/s and median first-token time."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="-", max_retries=0, timeout=1800)
    ttfts, counts, errors = [], [], []
    start = threading.Barrier(n + 1)

    def one(i: int) -> None:
        start.wait()
        t0 = time.perf_counter()
        first, used = None, 0
        try:
            stream = client.chat.completions.create(
                model=model,
                messages=PROMPTS[i % len(PROMPTS)],
                max_tokens=tokens,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
            )
            for c in stream:
                if first is None and c.choices and c.choices[0].delta.content:
                    first = time.perf_counter() - t0
                if c.usage is not None:
                    used = c.usage.completion_tokens
        except Exception as e:  # counted, and shown under the table
            errors.append(f"{type(e).__name__}: {e}")
        ttfts.append(first if first is not None else float("nan"))
        counts.append(used)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"tps": sum(counts) / wall, "ttft": statistics.median(ttfts), "tokens": sum(counts), "errors": errors}


def launch_mlx_lm(n: int, pipeline: bool, port: int) -> subprocess.Popen:
    hub = tempfile.mkdtemp(prefix="hf-hub-")  # its /v1/models lists a Hugging Face cache, which must exist
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(LAUNCHED)
    launcher = str(Path(sys.executable).parent / "mlx.launch")
    cmd = [
        launcher,
        "-n",
        str(n),
        "--backend",
        "ring",
        "--",
        sys.executable,
        f.name,
        "--model",
        resolve(None),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
    ] + (["--pipeline"] if pipeline else [])
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, blas.RANKS_ENV: str(n), "HF_HUB_CACHE": hub},
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlx_lm.server under mlx.launch exited: {proc.stderr.read()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlx_lm.server did not answer within 300 s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2)
    parser.add_argument(
        "--tensor",
        dest="pipeline",
        action="store_false",
        help="tensor parallel (default: a pipeline; the bundled model's 9 heads split over 1 or 3 ranks)",
    )
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--levels", default="1,4,8,16")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    best: dict[tuple[str, int], dict] = {}
    errors: list[str] = []

    def rounds_of(name: str, url: str, model: str) -> None:
        measure(url, model, 2, 4)  # warm
        for n in levels:
            r = measure(url, model, n, args.tokens)
            errors.extend(f"{name} at {n}: {e}" for e in r["errors"])
            if (name, n) not in best or r["tps"] > best[name, n]["tps"]:
                best[name, n] = r
            print(f"{name:6s} concurrency {n:2d}: {r['tps']:6.1f} tok/s, first token {r['ttft']:.2f} s", flush=True)

    with Cluster(n=args.n) as cluster:
        load_model(cluster, pipeline=args.pipeline, progress=False)
        for i in range(args.rounds):
            for name in ("mlx_nb", "mlx_lm") if i % 2 == 0 else ("mlx_lm", "mlx_nb"):
                if name == "mlx_nb":
                    server = serve(cluster, port=0)
                    try:
                        rounds_of(name, server.url, server.model.id)
                    finally:
                        server.stop()
                    continue
                port = free_port()
                theirs = launch_mlx_lm(args.n, args.pipeline, port)  # its idle ranks poll: never beside ours
                try:
                    rounds_of(name, f"http://127.0.0.1:{port}/v1", "default_model")
                finally:
                    os.killpg(theirs.pid, 15)
                    theirs.wait(30)

    base = {name: best[name, levels[0]]["tps"] for name in ("mlx_nb", "mlx_lm")}
    rows = []
    for n in levels:
        ours, ml = best["mlx_nb", n], best["mlx_lm", n]
        rows.append(
            [
                n,
                f"{ours['tps']:.1f}",
                f"{ml['tps']:.1f}",
                f"{ours['tps'] / ml['tps']:.2f}x",
                f"{ours['ttft']:.2f}",
                f"{ml['ttft']:.2f}",
                f"{ours['tps'] / base['mlx_nb']:.2f}x",
                f"{ml['tps'] / base['mlx_lm']:.2f}x",
            ]
        )
    layout = "pipeline" if args.pipeline else "tensor"
    title = (
        f"bundled SmolLM2 ({Path(resolve(None)).name}), {layout} parallel on {args.n} ranks, {args.tokens} tokens "
        f"per request, best of {args.rounds} rounds, {blas.current()}"
    )
    print(
        Table(
            [
                "concurrency",
                "mlx_nb tok/s",
                "mlx_lm.server tok/s",
                "mlx_nb / mlx_lm",
                "mlx_nb first token (s)",
                "mlx_lm first token (s)",
                f"mlx_nb vs {levels[0]}",
                f"mlx_lm vs {levels[0]}",
            ],
            rows,
            title,
        )
    )
    for e in errors:
        print("error:", e)


if __name__ == "__main__":
    main()
