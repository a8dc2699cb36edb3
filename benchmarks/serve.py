"""Serving: %mlx_serve against mlx_lm.server, same model, ranks, prompts and BLAS, one server at a time.

    python benchmarks/serve.py [-n 1] [--model PATH] [--tokens 32] [--levels 1,8,32] [--requests 3]
                               [--system-words 3000] [--turns 6] [--chats 3] [--rounds 2]
                               [--only distinct,shared,chat] [--no-line] [--steps] [--phases] [--faults]
                               [--cache-limit 2GB] [--ours name=value,...]

Equal footing: by default both run on one rank (mlx_nb: a 1-rank cluster; mlx_lm.server: one
process), so that neither pays for the other's processes; ``-n N`` runs mlx_nb on N ranks and
mlx_lm.server under ``mlx.launch -n N`` (whose output threads busy-wait: use it only where each
rank has cores or a GPU of its own). Only one server runs at a time; rounds alternate which goes
first, so that drift in the machine's load falls on both; the table keeps each figure's best
round (first token: its lowest).

Scenarios, each with the official openai client (in a process of its own: mlx_nb's server runs
in this one, as in a notebook), streamed chat requests, greedy:

- ``distinct``: N clients at once, N in ``--levels``, each sending ``--requests`` different
  prompts one after another (its next as soon as its last reply ended; so N requests in flight):
  aggregate tokens/s (completion tokens of every stream over the wall time from the first
  request sent to the last token) and the median time to the first content token. One request
  alone swings by 1.3x on a 2-core machine: several make the level-1 figure a measurement.
- ``shared``: 8 clients whose requests share a system prompt of ``--system-words`` words, each
  with its own question, sent at once; then a second wave of 8 new questions after the same
  system prompt. Median first token of each wave: the second is where a prompt cache shows.
- ``chat``: one client's ``--turns``-turn conversation (a ~300-word system prompt), each turn
  sending the whole conversation so far, the next turn sent as soon as the reply ended;
  ``--chats`` such conversations one after the other (each its own system prompt): the median
  first token of each turn over them, at turn 1 and at the last turn (one request's time
  swings by 1.3x on a 2-core machine).

``--phases`` (with ``--steps``) times the parts of each prefilling step in both servers (the merge
of the new sequences' caches, the model's pass, the split into the decoding batch; steps.py), with
the page faults over each.

``--faults`` (Linux, one rank) counts the minor page faults and CPU seconds of each server's
generating process (mlx_nb's rank, mlx_lm.server's process) and of this one over each scenario:
on a CPU, MLX allocates with malloc, and a pass that finds no free room in the heap waits for
the kernel's new pages.

Before timing, each server runs every scenario once with other words of about the same lengths
(every kernel built, on a GPU every operation's first use paid), so that no timed request finds
the warm-up's prompts in a cache. Each round starts both anew (a new cluster, a new
mlx_lm.server process): on CUDA each new prompt shape pays 60-120 ms its first time in a
process, and the timed words' exact shapes are new to both alike. Both load the BLAS mlx_nb's ranks
load (OpenBLAS on Linux where installed); on such a CPU, the bundled model's dense float32 copy.
"""

from __future__ import annotations

import argparse
import ast
import multiprocessing
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from mlx_nb.rank import blas

blas.use()  # as in the ranks, for the report of what ran

from mlx_nb import Cluster  # noqa: E402
from mlx_nb.display import Table  # noqa: E402
from mlx_nb.generate import load_model  # noqa: E402
from mlx_nb.serve import FirstToken, serve  # noqa: E402

TOPICS = [
    "the sea", "a lighthouse", "a mountain", "a city at night", "a forest", "the desert", "a river",
    "a library", "a train", "the moon", "a garden", "a storm", "a market", "an island", "a bridge",
    "winter",
]  # fmt: skip
WORDS = (
    "lamp lens keeper storm ship harbour tide rock beacon signal light tower stair glass brass oil "
    "wick night fog horn wave coast reef cliff gull rope anchor mast sail chart compass star dawn dusk "
    "shift log watch bell engine spring winter summer island pier boat crew cargo wind rain salt"
).split()

# mlx_lm.server with the BLAS mlx_nb's ranks load (alone, or on every rank under mlx.launch)
LAUNCHED = """
import os, sys
from mlx_nb.rank import blas
blas.use()
if os.environ.get("MLX_NB_STEPS"):  # --steps: its BatchGenerator's steps recorded, as on mlx_nb's ranks
    sys.path.insert(0, os.environ["MLX_NB_STEPS_FROM"])
    import steps
    rank, phases = int(os.environ.get("MLX_RANK", "0")), bool(os.environ.get("MLX_NB_PHASES"))
    steps.install(os.environ["MLX_NB_STEPS"], rank, phases)  # under mlx.launch, a file a rank
sys.argv = ["mlx_lm.server"] + sys.argv[1:]
from mlx_lm.server import main  # its classes must live in mlx_lm.server: ranks share requests pickled
main()
"""


def text(words: int, seed: int) -> str:
    """``words`` words of a handbook: sentences of the same vocabulary, different for each seed."""
    rng = random.Random(seed)
    out, n = [], 0
    while n < words:
        k = rng.randint(6, 14)
        out.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        n += k
    return " ".join(out)


def ask(client, model: str, messages: list[dict], tokens: int) -> dict:
    """One streamed chat request: its first-token time, completion tokens and reply."""
    t0 = time.perf_counter()
    first, used, parts = None, 0, []
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for c in stream:
        if c.choices and c.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - t0
            parts.append(c.choices[0].delta.content)
        if c.usage is not None:
            used = c.usage.completion_tokens
    return {"ttft": first if first is not None else float("nan"), "tokens": used, "text": "".join(parts)}


def at_once(client, model: str, prompts: list[list[list[dict]]], tokens: int) -> dict:
    """One client per entry of ``prompts``, all starting at once, each sending its prompts one
    after another (the next when the last reply ended): aggregate tok/s, median first token, errors."""
    results: list[dict] = []
    errors: list[str] = []
    start = threading.Barrier(len(prompts) + 1)

    def one(queue: list[list[dict]]) -> None:
        start.wait()
        for messages in queue:
            try:
                results.append(ask(client, model, messages, tokens))
            except Exception as e:  # counted, and shown under the table
                errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    start.wait()
    t0, began = time.perf_counter(), time.time()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts = [r["ttft"] for r in results] or [float("nan")]
    return {
        "tps": sum(r["tokens"] for r in results) / wall,
        "ttft": statistics.median(ttfts),
        "errors": errors,
        "window": (began, time.time()),
    }


def usage(pids: list[int]) -> tuple[int, float, float]:
    """Minor page faults (a page the kernel hands out or maps anew) and user and system CPU seconds
    of processes ``pids`` so far (Linux's /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = [0, 0.0, 0.0]
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total[0] += int(fields[7])
        total[1] += int(fields[11]) / tick
        total[2] += int(fields[12]) / tick
    return total[0], total[1], total[2]


def scenarios(
    clients: Clients, model: str, args, seed: int, server=None, requests: int = 1, pids: list[int] = ()
) -> dict:
    """Every scenario once; ``seed`` picks the words (the warm-up uses others of the same lengths).
    ``requests``: each distinct-prompt client's, one after another. With mlx_nb's ``server``,
    each result has its requests' first token in parts ("parts"). With the server's ``pids``, each
    has their faults and CPU seconds over it ("usage"; a chat turn's summed over the chats), and
    this process's ("here": mlx_nb's server answers HTTP and talks to its ranks in it)."""
    out = Parted(server)

    def counted(ask, *a) -> dict:
        before = (usage(pids), usage([os.getpid()])) if pids else None
        r = ask(*a)
        if pids:
            r["usage"] = tuple(x - y for x, y in zip(usage(pids), before[0]))
            r["here"] = tuple(x - y for x, y in zip(usage([os.getpid()]), before[1]))
        return r

    if "distinct" in args.only:
        for n in args.levels:
            story = "Write a long story about {} ({}-{}-{})."
            prompts = [
                [
                    [{"role": "user", "content": story.format(TOPICS[i % len(TOPICS)], seed, i, k)}]
                    for k in range(requests)
                ]
                for i in range(n)
            ]
            out["distinct", n] = counted(clients.at_once, model, prompts, args.tokens)
    if "shared" in args.only:
        system = {"role": "system", "content": text(args.system_words, seed)}
        for wave in (1, 2):
            prompts = [
                [system, {"role": "user", "content": f"Question {wave}.{i}: what does the {WORDS[i + 8 * wave]} do?"}]
                for i in range(8)
            ]
            out["shared", wave] = counted(clients.at_once, model, [[p] for p in prompts], args.tokens)
    if "chat" in args.only:
        turns: dict[int, list] = {turn: [] for turn in range(1, args.turns + 1)}
        for c in range(args.chats):
            messages = [{"role": "system", "content": text(300, seed + 1 + 100 * c)}]
            for turn in turns:
                messages.append({"role": "user", "content": f"Tell me about the {WORDS[turn + seed % 7]} ({turn})."})
                r = counted(clients.ask, model, messages, args.tokens)
                messages.append({"role": "assistant", "content": r["text"]})
                first = server.first_tokens[-1] if server is not None else None
                turns[turn].append((r["ttft"], first, (r.get("usage"), r.get("here"))))
        for turn, got in turns.items():
            ttft, parts = statistics.median(t for t, _, _ in got), [p for _, p, _ in got if p is not None]
            out["chat", turn] = {"tps": float("nan"), "ttft": ttft, "errors": [], "parts": FirstToken.median(parts)}
            if pids:
                out["chat", turn]["usage"] = tuple(map(sum, zip(*(u[0] for _, _, u in got))))
                out["chat", turn]["here"] = tuple(map(sum, zip(*(u[1] for _, _, u in got))))
    return dict(out)


class Parted(dict):
    """Scenario results; with mlx_nb's server, each with the median parts of the first tokens of
    the requests since the one before (``Server.first_tokens``)."""

    def __init__(self, server) -> None:
        super().__init__()
        self.server = server
        if server is not None:
            server.first_tokens.clear()

    def __setitem__(self, key, result: dict) -> None:
        if self.server is not None and "parts" not in result:
            result["parts"] = FirstToken.median(list(self.server.first_tokens))
            self.server.first_tokens.clear()
        super().__setitem__(key, result)


def launch_mlx_lm(
    n: int, model: str, pipeline: bool, port: int, steps_to: str = "", phases: bool = False
) -> subprocess.Popen:
    hub = tempfile.mkdtemp(prefix="hf-hub-")  # its /v1/models lists a Hugging Face cache, which must exist
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(LAUNCHED)
    server = [sys.executable, f.name, "--model", model, "--port", str(port), "--host", "127.0.0.1"]
    if n > 1:
        launcher = str(Path(sys.executable).parent / "mlx.launch")
        server = [launcher, "-n", str(n), "--backend", "ring", "--", *server] + (["--pipeline"] if pipeline else [])
    # its log to a file: a pipe no one reads fills (64 KB of progress lines) and blocks its handlers
    log = tempfile.NamedTemporaryFile("w+", prefix="mlx_lm-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        server,
        stdout=subprocess.DEVNULL,
        stderr=log,
        text=True,
        start_new_session=True,
        env={
            **os.environ,
            blas.RANKS_ENV: str(n),
            "HF_HUB_CACHE": hub,
            "MLX_NB_STEPS": steps_to,
            "MLX_NB_STEPS_FROM": str(Path(__file__).parent),
            "MLX_NB_PHASES": "1" if phases else "",
        },
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlx_lm.server exited: {Path(log.name).read_text()[-2000:]} (whole log: {log.name})")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlx_lm.server did not answer within 600 s")


class Clients:
    """The load: the openai clients, in a process of their own whichever server they ask.

    mlx_nb's server runs in this process (as in a notebook), mlx_lm.server in its own: clients
    here would share this process's interpreter lock with mlx_nb's HTTP threads and direct line
    (32 streams parsed in Python at the top level), and with no thread of mlx_lm.server."""

    def __init__(self) -> None:
        self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        self.url = ""

    def at_once(self, model: str, prompts: list[list[list[dict]]], tokens: int) -> dict:
        return self.pool.submit(_in_clients, at_once, self.url, model, prompts, tokens).result()

    def ask(self, model: str, messages: list[dict], tokens: int) -> dict:
        return self.pool.submit(_in_clients, ask, self.url, model, messages, tokens).result()

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown()


_openai: dict = {}  # in the clients' process: base URL -> client


def _in_clients(load, url: str, *args):
    """``load(client, *args)`` (``at_once`` or ``ask``) in the clients' process."""
    from openai import OpenAI

    if url not in _openai:
        _openai[url] = OpenAI(base_url=url, api_key="-", max_retries=0, timeout=3600)
    return load(_openai[url], *args)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1, help="ranks of each (default 1: one rank against one process)")
    parser.add_argument("--model", default=None, help="an mlx-lm model folder (default: the bundled SmolLM2)")
    parser.add_argument("--tensor", dest="pipeline", action="store_false", help="with -n: tensor parallel")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per reply")
    parser.add_argument("--levels", default="1,8,32", help="concurrent distinct requests")
    parser.add_argument(
        "--requests",
        type=int,
        default=3,
        help="requests each distinct-prompt client sends, one after another (a timed round's)",
    )
    parser.add_argument("--system-words", type=int, default=3000, help="the shared system prompt's words")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--chats", type=int, default=3, help="conversations, one after the other (median of each turn)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default="distinct,shared,chat", help="scenarios to run")
    parser.add_argument(
        "--steps",
        action="store_true",
        help="record both servers' generator steps (benchmarks/steps.py) and print each scenario's",
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="with --steps: time the parts of each prefilling step in both servers (steps.py), each "
        "evaluated where it happens, which costs a little",
    )
    parser.add_argument(
        "--faults",
        action="store_true",
        help="count each server's minor page faults and CPU seconds over each scenario (Linux; one rank)",
    )
    parser.add_argument(
        "--cache-limit",
        default=None,
        help="mlx_nb's prompt cache per rank, as load_model takes it (say 700MB; default: its own)",
    )
    parser.add_argument(
        "--ours",
        default="",
        help="options for mlx_nb's serve(), as name=value,... (say, prefill_batch=16)",
    )
    parser.add_argument(
        "--no-line",
        dest="line",
        action="store_false",
        help="mlx_nb through ipyparallel's channels, not its direct line",
    )
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    args.only = set(args.only.split(","))
    if args.faults and (args.n != 1 or not Path("/proc/self/stat").exists()):
        parser.error("--faults counts one process's page faults through Linux's /proc: one rank (-n 1), on Linux")
    if any("=" not in o or o.startswith("line=") for o in args.ours.split(",") if o):
        parser.error(f"--ours takes serve() options as name=value,... (line: --no-line), got {args.ours!r}")
    options = {k: ast.literal_eval(v) for k, v in (o.split("=", 1) for o in args.ours.split(",") if o)}
    args.steps = args.steps or args.phases
    records = tempfile.mkdtemp(prefix="serve-steps-") if args.steps else ""
    clients = Clients()
    # killed (timeout, kill PID), the finally blocks below still stop mlx_lm.server, which runs
    # in a session of its own and would otherwise keep its port and cores
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    best: dict = {}
    errors: list[str] = []

    def run(name: str, url: str, served: str, nth: int, server=None, pids: list[int] = ()) -> None:
        # both servers of a round get the same words (a random-weight model's first tokens with
        # text come after as many steps as its prompt makes); each round and warm-up others
        clients.url = url
        t0 = time.perf_counter()
        scenarios(clients, served, args, seed=1000 + nth)  # warm-up: other words, same shapes
        print(f"{name}: warmed up in {time.perf_counter() - t0:.0f} s", flush=True)
        pids = pids if args.faults else ()
        timed = scenarios(clients, served, args, seed=nth, server=server, requests=args.requests, pids=pids)
        for key, r in timed.items():
            errors.extend(f"{name} {key}: {e}" for e in r["errors"])
            have = best.get((name, *key))
            if have is None:
                best[(name, *key)] = r
            else:
                have["tps"] = max(have["tps"], r["tps"])
                if r["ttft"] < have["ttft"]:
                    have["ttft"], have["parts"] = r["ttft"], r.get("parts")
            print(f"{name:6s} {key}: {r['tps']:7.1f} tok/s, first token {r['ttft']:.3f} s", flush=True)
        if records:
            print(steps_table(name, nth, records, timed), flush=True)
        if args.phases:
            print(phases_table(name, nth, records, timed), flush=True)
        if pids:
            print(usage_table(name, nth, timed), flush=True)

    with clients:
        model = None  # the folder mlx_nb's ranks load (the bundled model: its copy for this BLAS) is mlx_lm's too
        for i in range(args.rounds):
            for name in ("mlx_nb", "mlx_lm") if i % 2 == 0 else ("mlx_lm", "mlx_nb"):
                if name == "mlx_nb":
                    # a new cluster each round, as mlx_lm.server is a new process: on CUDA a process
                    # keeps what it built for each prompt shape, which a kept rank would carry over
                    with Cluster(n=args.n) as cluster:
                        pipeline = args.pipeline and args.n > 1
                        model = load_model(
                            cluster, args.model, pipeline=pipeline, progress=False, cache_limit=args.cache_limit
                        )
                        model = model["model"]
                        if records:
                            where, to = str(Path(__file__).parent), f"{records}/{name}-{i}"
                            cluster.call(_record_steps, where, to, args.phases)
                        pids = cluster.call(os.getpid)  # before serving: a serving cluster takes no calls
                        server = serve(cluster, port=0, line=args.line, **options)
                        try:
                            run(name, server.url, server.model.id, i, server, pids)
                        finally:
                            server.stop()
                    continue
                port = free_port()
                steps_to = f"{records}/{name}-{i}" if records else ""
                theirs = launch_mlx_lm(args.n, model, args.pipeline, port, steps_to, args.phases)  # never beside ours
                try:
                    run(name, f"http://127.0.0.1:{port}/v1", "default_model", i, pids=[theirs.pid])
                finally:
                    os.killpg(theirs.pid, 15)
                    theirs.wait(30)

    rows = []
    for key in sorted({k[1:] for k in best}, key=lambda k: (["distinct", "shared", "chat"].index(k[0]), k[1])):
        ours, theirs = best[("mlx_nb", *key)], best[("mlx_lm", *key)]
        label = {
            "distinct": "distinct prompts, concurrency",
            "shared": "shared system prompt, wave",
            "chat": "chat, turn",
        }
        if key[0] == "chat" and key[1] not in (1, args.turns):
            continue
        tps = key[0] == "distinct"
        rows.append(
            [
                f"{label[key[0]]} {key[1]}",
                f"{ours['tps']:.1f}" if tps else "-",
                f"{theirs['tps']:.1f}" if tps else "-",
                f"{ours['tps'] / theirs['tps']:.2f}x" if tps else "-",
                f"{ours['ttft']:.3f}",
                f"{theirs['ttft']:.3f}",
                f"{ours['ttft'] / theirs['ttft']:.2f}x",
            ]
        )
    layout = ("pipeline" if args.pipeline else "tensor") + f" parallel on {args.n} ranks" if args.n > 1 else "1 rank"
    title = (
        f"{Path(model).name}, {layout}; {args.tokens} tokens per reply, {args.requests} after another "
        f"from each distinct-prompt client, shared system prompt of "
        f"{args.system_words} words; best of {args.rounds} rounds; {blas.what_computes()}"
        + ("" if args.line else "; mlx_nb through ipyparallel's channels (--no-line)")
        + (f"; mlx_nb with {args.ours}" if options else "")
        + (f"; mlx_nb's prompt cache {args.cache_limit} a rank" if args.cache_limit is not None else "")
    )
    header = ["scenario", "mlx_nb tok/s", "mlx_lm.server tok/s", "tok/s ratio", "mlx_nb first token (s)"]
    print(Table(header + ["mlx_lm first token (s)", "first token ratio"], rows, title))
    print()
    print(parts_table(best, args))
    for e in errors:
        print("error:", e)


def _record_steps(where: str, path: str, phases: bool = False) -> None:
    """On each rank: its generator's steps recorded to ``path`` (``steps.install``)."""
    import sys

    import mlx_nb.rank.batch  # noqa: F401 (its overrides of mlx-lm's batches, timed by --phases too)
    from mlx_nb.rank.session import world

    sys.path.insert(0, where)
    import steps

    group = world()
    steps.install(path, group.rank() if group is not None else 0, phases)


def steps_table(name: str, nth: int, records: str, timed: dict) -> Table:
    """What the generator of ``name``'s rank 0 did in each of round ``nth``'s timed scenarios."""
    from steps import IDLE, read, summary

    rows = read(f"{records}/{name}-{nth}")
    fields = ["steps", "prefilling", "prompt tokens", "tokens", "batch", "step ms", "decode-only ms"]
    fields += ["with prefill ms", "prefill call ms", "between ms", "stepping s"]
    out = []
    for key, r in timed.items():
        if "window" in r:
            got = summary(rows, *r["window"])
            out.append(
                [
                    " ".join(map(str, key)),
                    *(f"{got[f]:.1f}" if isinstance(got[f], float) else str(got[f]) for f in fields),
                ]
            )
    title = (
        f"{name}'s generator steps, round {nth + 1} (rank 0): steps begun in each scenario, those that "
        f"also prefilled, the tokens prefilled and made, sequences decoding after a step (mean), the time "
        f"from a step's start to the next's (median; everything between steps included; a gap over "
        f"{IDLE} s is waiting, not stepping: left out), a prefilling step's own call (median; a long prefill "
        f"counts here), the time outside the generator's call (median: the server's own loop), and the seconds stepping"
    )
    return Table(["scenario", *fields], out, title)


def phases_table(name: str, nth: int, records: str, timed: dict) -> Table:
    """The parts of the prefilling steps of ``name``'s rank 0 in each of round ``nth``'s scenarios."""
    from steps import PHASES, read_phases

    names = list(PHASES.values())
    out = []
    for key, r in timed.items():
        if "window" in r:
            got = read_phases(f"{records}/{name}-{nth}.phases", *r["window"])
            cells = [f"{got[p][1] * 1000:.0f} ({got[p][2]})" if p in got else "-" for p in names]
            out.append([" ".join(map(str, key)), *cells])
    title = (
        f"{name}'s prefilling steps in parts, round {nth + 1} (rank 0; steps.py --phases): each part's "
        f"milliseconds over the scenario, summed, each evaluated where it happens (the process's minor "
        f"page faults over it)"
    )
    return Table(["scenario", *names], out, title)


def usage_table(name: str, nth: int, timed: dict) -> Table:
    """The serving process's page faults and CPU seconds over each of round ``nth``'s scenarios."""
    rows = [
        [" ".join(map(str, key)), str(r["usage"][0]), f"{r['usage'][1]:.2f}", f"{r['usage'][2]:.2f}"]
        + [f"{r['here'][1]:.2f}", f"{r['here'][2]:.2f}"]
        for key, r in timed.items()
        if "usage" in r
    ]
    title = (
        f"{name}'s generating process ({'its rank' if name == 'mlx_nb' else 'mlx_lm.server'}), round {nth + 1}: "
        f"minor page faults (each a page the kernel handed out or mapped anew) and CPU seconds, user and "
        f"system, over each scenario (a chat turn's: summed over the chats); and the CPU seconds of this "
        f"benchmark's process, where mlx_nb's server answers HTTP (mlx_lm.server answers in its own)"
    )
    header = ["scenario", "minor faults", "user s", "system s", "here: user s", "system s"]
    return Table(header, rows, title)


def parts_table(best: dict, args) -> Table:
    """Where mlx_nb's first token went in each scenario (its best round): the server's parts."""
    rows = []
    for key in sorted(
        {k[1:] for k in best if k[0] == "mlx_nb"}, key=lambda k: (["distinct", "shared", "chat"].index(k[0]), k[1])
    ):
        if key[0] == "chat" and key[1] not in (1, args.turns):
            continue
        r = best[("mlx_nb", *key)]
        p = r.get("parts")
        ms = lambda x: f"{x * 1000:.1f}"
        cells = [ms(p.read), ms(p.to_ranks), ms(p.prefill), ms(p.back), ms(r["ttft"] - p.total)] if p else ["-"] * 5
        rows.append([" ".join(map(str, key)), ms(r["ttft"]), *cells])
    header = ["scenario", "first token (ms)", "read", "to the ranks", "prefill", "back", "rest (HTTP, client)"]
    title = (
        "mlx_nb's first token in parts, median over the scenario's requests (ms): read and tokenize; to rank 0 "
        "taking it in; prefill and a step; the report back; the rest the client's (its median against theirs)"
    )
    return Table(header, rows, title)


if __name__ == "__main__":
    main()
