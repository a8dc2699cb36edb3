"""IPython magics, thin over the Python API: %mlx_cluster, %%mlx_dist, %mlx_push, %mlx_pull, %mlx_bench, %mlx_plan."""

from __future__ import annotations

import functools
import re
import shlex
import time
from typing import Optional

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from .bench import run_bench, sweep_arguments, sweep_values
from .cell import DistCellError
from .cluster import BACKENDS, Cluster, ClusterError
from .display import Table, human_bytes
from .hostfile import HostfileError
from .preflight import Severity

_current: Optional[Cluster] = None
_server = None  # the %mlx_serve server (mlx_nb.serve.Server)


def current() -> Cluster:
    """The cluster the magics work on (started by %mlx_cluster start)."""
    if _current is None or not _current.running:
        raise UsageError("no MLX cluster is running: start one with %mlx_cluster start -n 4")
    return _current


def use(cluster: Optional[Cluster]) -> None:
    """Make the magics work on ``cluster`` (a running Cluster made in Python), or on none."""
    global _current
    _current = cluster


def status_table(cluster: Cluster) -> Table:
    rows = [
        [
            r.rank,
            r.host,
            r.pid,
            device_label(r),
            memory_label(r),
            human_bytes(r.peak_memory),
            r.state,
            blas_label(r),
            budget_label(r),
        ]
        for r in cluster.status()
    ]
    title = f"{cluster.n} ranks, backend {cluster.backend}, {len(cluster.setup_cells)} setup cell(s)"
    if (job := cluster.running_job) is not None:
        title += f"; running: {job}"
    return Table(["rank", "host", "pid", "device", "memory", "peak", "state", "blas", "budget"], rows, title)


def budget_label(r) -> str:
    """A rank's memory budget for the status table: ``700.0 MB (given)`` where it was given
    (``--memory``), else what the rank measured."""
    if not r.memory_budget:
        return "-"
    return human_bytes(r.memory_budget) + (" (given)" if r.memory_given else "")


def device_label(r) -> str:
    """A rank's device for the status table: ``Device(gpu, 0) NVIDIA H200, 140.4 GB`` on a GPU
    (its name and memory from MLX's ``device_info``), ``Device(cpu, 0)`` on the CPU."""
    if not r.device_name:
        return r.device
    return f"{r.device} {r.device_name}" + (f", {human_bytes(r.device_memory)}" if r.device_memory else "")


def memory_label(r) -> str:
    """Memory in use, and the freed buffers MLX keeps for reuse where they pass 1 MB: the
    process holds both (on a GPU, ``nvidia-smi`` shows their sum plus the CUDA context)."""
    cached = getattr(r, "cache_memory", 0)
    return human_bytes(r.active_memory) + (f" (+{human_bytes(cached)} cached)" if cached >= 2**20 else "")


def blas_label(r) -> str:
    """A rank's BLAS for the status table; on a Linux GPU (CUDA) matmuls run in cuBLAS, and
    the CPU BLAS serves only work put on the CPU."""
    if r.blas is None:
        return "-"
    if "gpu" in r.device and r.blas.system == "Linux":
        return f"cuBLAS (GPU); on the CPU: {r.blas}"
    return str(r.blas)


def status_note(cluster: Cluster) -> Optional[str]:
    """A hint under the status table: MPI where it beat the ring for a local cluster."""
    if cluster.backend == "ring" and not cluster.remote and cluster.n > 1 and _mpi_here():
        return (
            "MPI is available here: `--backend mpi` was faster for large all_sums on this machine "
            "type (64 MB all_sum, 2 local ranks: 0.48 GB/s vs ring 0.24 GB/s)."
        )
    return None


@functools.lru_cache(maxsize=1)
def _mpi_here() -> bool:
    from .engines.launch import mpi_available

    return mpi_available()[0]


def findings_table(findings) -> Table:
    failed = sorted({f.host for f in findings if f.status is Severity.FAIL})
    title = f"preflight: {'problems on ' + ', '.join(failed) if failed else 'every host is ready'}"
    return Table(
        ["host", "check", "status", "message"], [[f.host, f.check, f.status, f.message] for f in findings], title
    )


def _env(pairs: Optional[list[str]]) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        name, eq, value = pair.partition("=")
        if not eq or not name:
            raise UsageError(f"--env takes NAME=value, got {pair!r}")
        out[name] = value
    return out


def _unquoted(value: Optional[str]) -> Optional[str]:
    # magic_arguments keeps the quotes of --ssh 'ssh -F cfg' or --python '/my env/bin/python'
    # (a non-POSIX split on Windows-style rules); a path with an apostrophe stays as it is
    if value and len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _ssh(spec: Optional[str]) -> Optional[list[str]]:
    return shlex.split(_unquoted(spec)) if spec else None


def _cluster_from_args(args) -> Cluster:
    """The Cluster that %mlx_cluster start / check arguments describe (not started)."""
    try:
        return Cluster(
            n=args.n,
            backend=args.backend,
            grace=args.grace,
            hostfile=_unquoted(args.hostfile),
            hosts=args.hosts,
            python=_unquoted(args.python),
            ssh_cmd=_ssh(args.ssh),
            env=_env(args.env),
            name=args.name,
            keep=args.keep,
            idle=args.idle,
            memory=args.memory,
        )
    except HostfileError as e:
        raise UsageError(" ".join(str(e).split())) from None
    except ValueError as e:
        raise UsageError(str(e)) from None


# a %mlx_generate line whose prompt ends in "?" (the text before it is more than question marks)
_QUESTION = re.compile(r"^(\s*)%mlx_generate\s+(.*[^\s?].*\?)\s*$")


def keep_prompt_question_marks(lines: list[str]) -> list[str]:
    """An IPython input transformer: a ``%mlx_generate`` prompt ending in ``?`` stays the prompt.

    IPython reads a line's trailing ``?`` as a help request before any magic sees the line
    (``Object `France` not found.``); this turns such a line into the magic's own call first.
    ``%mlx_generate?`` alone still shows the help; a cell magic's body is left as it is.

    >>> keep_prompt_question_marks(["%mlx_generate Why is the sky blue?\\n"])
    ["get_ipython().run_line_magic('mlx_generate', 'Why is the sky blue?')\\n"]
    """
    if lines and lines[0].lstrip().startswith("%%"):
        return lines
    out = []
    for line in lines:
        m = _QUESTION.match(line)
        if m:
            indent, text = m.groups()
            line = f"{indent}get_ipython().run_line_magic('mlx_generate', {text!r})" + "\n" * line.endswith("\n")
        out.append(line)
    return out


def _start(args) -> Cluster:
    cluster = _cluster_from_args(args)
    where = f" on {len({h.ssh_hostname for h in cluster.hostfile.hosts})} host(s)" if cluster.remote else ""
    print(f"Starting {cluster.n} MLX ranks ({cluster.backend}){where}...", flush=True)
    t0 = time.perf_counter()
    try:
        cluster.start()
    except ClusterError as e:
        raise UsageError(f"the cluster did not start: {e}") from None
    kept = f" and kept as {args.name!r} (it outlives this kernel: %mlx_cluster attach {args.name})" if args.keep else ""
    print(f"Cluster ready in {time.perf_counter() - t0:.1f} s{kept}.")
    return cluster


def _attach(args) -> Cluster:
    if not args.cluster_name:
        raise UsageError("%mlx_cluster attach NAME: which kept cluster (%mlx_cluster list shows them)")
    try:
        cluster = Cluster.attach(args.cluster_name, take=args.take)
    except (ClusterError, ValueError) as e:
        raise UsageError(" ".join(str(e).split())) from None
    setup = f"; {len(cluster.setup_cells)} setup cell(s) kept" if cluster.setup_cells else ""
    print(f"Attached {args.cluster_name!r}: {cluster.n} ranks, the same processes and their state{setup}.")
    return cluster


def clusters_table() -> Table:
    """The kept clusters here (``mlx_nb.clusters()``), one row each."""
    from .cluster import clusters

    def ago(seconds: float) -> str:
        return (
            f"{seconds / 3600:.1f} h"
            if seconds >= 3600
            else f"{seconds / 60:.0f} min"
            if seconds >= 60
            else f"{seconds:.0f} s"
        )

    rows = [
        [
            c["name"],
            c["ranks"],
            ", ".join(c["hosts"]),
            c["backend"],
            ago(c["age"]),
            ago(c["idle"]) + (f" (stops at {ago(c['idle_limit'])})" if c["idle_limit"] else ""),
            human_bytes(c["memory"]),
            f"pid {c['holder']['pid']}" if c["holder"] else "no",
        ]
        for c in clusters()
    ]
    title = f"{len(rows)} kept cluster(s)" if rows else "no kept cluster here"
    return Table(["name", "ranks", "hosts", "backend", "age", "idle", "memory", "attached"], rows, title)


def _names(spec: Optional[str]) -> list[str]:
    return [x.strip() for x in (spec or "").replace(" ", ",").split(",") if x.strip()]


@magics_class
class MLXMagics(Magics):
    def __init__(self, shell=None):
        super().__init__(shell)
        self.panel = None  # the last status --watch panel: the next one replaces it (its thread ends)

    def _ns_values(self, names: list[str]) -> dict:
        missing = [n for n in names if n not in self.shell.user_ns]
        if missing:
            raise UsageError(f"not defined in the notebook: {', '.join(missing)}")
        return {n: self.shell.user_ns[n] for n in names}

    @magic_arguments()
    @argument(
        "action",
        choices=["start", "stop", "restart", "status", "forget-setup", "check", "attach", "list", "cache"],
        help="start a cluster, stop it, restart its ranks (replaying setup cells), "
        "show each rank's state, forget the registered --setup cells, check the hosts "
        "of --hostfile / --hosts over ssh without starting anything, attach a kept cluster "
        "by name, list the kept clusters, or show (--clear, --limit) the ranks' prompt cache",
    )
    @argument("cluster_name", nargs="?", default=None, metavar="NAME", help="with attach: the kept cluster's name")
    @argument("--name", default=None, help="with start: a name for the cluster (to attach it by)")
    @argument("--keep", action="store_true", help="with start (and --name): keep the cluster running after this kernel")
    @argument("--idle", default=None, help="with --keep: stop the kept cluster once unused this long (2h, 30m, 90s)")
    @argument("--take", action="store_true", help="with attach: take the cluster over from the kernel that holds it")
    @argument(
        "-n", type=int, default=None, help="number of local ranks (default 4); with --hosts, ranks per host (default 1)"
    )
    @argument(
        "--backend",
        default=None,
        choices=BACKENDS,
        help="mx.distributed backend (default: the hostfile's, else ring; mpi: local ranks under mpirun)",
    )
    @argument(
        "--hostfile",
        default=None,
        help="an MLX hostfile (mlx.distributed_config --output-hostfile): one rank per entry",
    )
    @argument("--hosts", default=None, help="h1,h2: ranks on these hosts, as mlx.launch --hosts")
    @argument("--python", default=None, help="the Python of the engines on the hosts (default: this one's path)")
    @argument("--ssh", default=None, help="the ssh command, e.g. 'ssh -F ~/.ssh/cluster_config' (default ssh)")
    @argument("--env", action="append", metavar="NAME=value", help="set in every rank (repeatable)")
    @argument("--grace", type=float, default=3.0, help="seconds a failing cell's other ranks get before recovery")
    @argument(
        "--memory",
        default=None,
        help="with start: each rank's memory budget, one for all (700MB) or one per rank (700MB,260MB,260MB), "
        "in place of what each measures; %%mlx_plan and loads keep to it",
    )
    @argument(
        "--watch", action="store_true", help="with status: a panel that refreshes itself (live memory while cells run)"
    )
    @argument("--clear", action="store_true", help="with cache: empty the ranks' prompt cache")
    @argument("--limit", default=None, help="with cache: bytes each rank's prompt cache may hold (2GB, 0: off, auto)")
    @line_magic
    def mlx_cluster(self, line: str):
        """Manage the MLX cluster behind %%mlx_dist.

        %mlx_cluster start -n 4      4 local ranks over the ring backend on 127.0.0.1
        %mlx_cluster start --hostfile hosts.json     one rank per host entry, over ssh
        %mlx_cluster start -n 2 --backend mpi        2 local ranks under mpirun
        %mlx_cluster start -n 3 --memory 700MB,260MB,260MB    a mixed cluster on one machine
        %mlx_cluster check --hostfile hosts.json     ssh, Python, MLX, RDMA, IPs on each host
        %mlx_cluster status          rank, host, pid, device, memory, state, BLAS, memory budget
        %mlx_cluster restart         new rank processes; --setup cells are replayed
        %mlx_cluster stop            nothing is left running
        %mlx_cluster start -n 2 --name llm --keep --idle 2h    outlives this kernel
        %mlx_cluster attach llm      the kept cluster, from this (or a new) kernel
        %mlx_cluster list            the kept clusters here
        %mlx_cluster cache           the prompt cache per rank; --clear empties it, --limit 1GB
        """
        global _current
        args = parse_argstring(self.mlx_cluster, line)
        if args.action == "check":
            if not (args.hostfile or args.hosts):
                if _current is None or not _current.running:
                    raise UsageError("%mlx_cluster check needs --hostfile F or --hosts h1,h2 (or a running cluster)")
                return findings_table(_current.check())
            return findings_table(_cluster_from_args(args).check())
        if args.action == "list":
            return clusters_table()
        if args.action in ("start", "attach"):
            if _current is not None and _current.running:
                raise UsageError("a cluster is already running: %mlx_cluster stop (or restart) first")
            _current = _start(args) if args.action == "start" else _attach(args)
            return status_table(_current)
        cluster = current()
        if args.action == "stop":
            _stop_server()
            cluster.stop()
            _current = None
            print("Cluster stopped.")
            if cluster.group.keep:
                print(f"(It was kept as {cluster.group.name!r}: it is gone now.)")
        elif args.action == "restart":
            t0 = time.perf_counter()
            replay = cluster.restart()
            print(f"Restarted {cluster.n} ranks in {time.perf_counter() - t0:.1f} s", end="")
            print(
                f"; replayed {len(cluster.setup_cells)} setup cell(s) in {replay:.1f} s."
                if cluster.setup_cells
                else "."
            )
            return status_table(cluster)
        elif args.action == "status" and args.watch:
            from .widgets import StatusWidget

            if self.panel is not None:
                self.panel.end("replaced by a newer panel (%mlx_cluster status --watch)")
            self.panel = StatusWidget(cluster)
            return self.panel
        elif args.action == "status":
            cluster.heal()
            note = status_note(cluster)
            if note:
                print(note)
            return status_table(cluster)
        elif args.action == "forget-setup":
            print(f"Forgot {cluster.forget_setup()} setup cell(s).")
        elif args.action == "cache":
            from .generate import prompt_cache

            try:
                report = prompt_cache(cluster, clear=args.clear, limit=args.limit)
            except ValueError as e:
                raise UsageError(str(e)) from None
            except DistCellError as e:
                if e.root is None or e.root.error is None:
                    raise
                raise UsageError(e.root.error.message) from None
            if args.clear:
                print("Emptied the prompt cache on every rank.")
            return report

    @magic_arguments()
    @argument("--ranks", default="0", help="whose output to show: 0 (default), all, or a list like 0,2")
    @argument(
        "--timeout", type=float, default=None, help="seconds before the cell is stopped and the cluster recovered"
    )
    @argument("--push", default=None, help="notebook variables to send to every rank first, e.g. a,b")
    @argument(
        "--pull",
        default=None,
        help="a rank variable to bring back into the notebook (rank 0's; a list per rank with --ranks all)",
    )
    @argument("--setup", action="store_true", help="remember this cell and replay it on new ranks after any restart")
    @argument(
        "--profile",
        action="store_true",
        help="time each rank (wall, mx.eval, collectives) and its memory; "
        "show a timeline and a memory chart under the output (mlx_nb.last_profile() has the data)",
    )
    @cell_magic
    def mlx_dist(self, line: str, cell: str):
        """Run the cell SPMD on every rank of the MLX cluster.

        Each rank has mx, nn, world, rank and size. Rank 0's output streams live;
        the value of the last expression on rank 0 is the cell's result.

        %%mlx_dist --ranks all --timeout 30
        x = mx.distributed.all_sum(mx.array([rank]))
        print(x)
        """
        args = parse_argstring(self.mlx_dist, line)
        cluster = current()
        push = self._ns_values(_names(args.push)) if args.push else None
        options = dict(timeout=args.timeout, push=push, pull=args.pull, setup=args.setup, profile=args.profile)
        try:
            result = cluster.run(cell, ranks=args.ranks, **options)
        except ValueError as e:  # a bad --timeout or --ranks, or a value that cannot travel: before any rank runs
            raise UsageError(str(e)) from None
        if args.profile:
            from IPython.display import display

            from .display import show_figure

            display(result.profile.table())
            show_figure(result.profile.figure())
        if args.pull:
            self.shell.user_ns[args.pull] = result.pulled
        return result if result.value is not None else None

    @line_magic
    def mlx_push(self, line: str):
        """%mlx_push a b: send notebook variables a and b to every rank."""
        names = _names(line)
        if not names:
            raise UsageError("usage: %mlx_push NAME [NAME ...]")
        try:
            current().push(self._ns_values(names))
        except ValueError as e:  # a value that cannot travel, named
            raise UsageError(str(e)) from None

    @magic_arguments()
    @argument("name", help="the rank variable to bring back")
    @argument("--ranks", default="0", help="0 (default), all, or a list like 0,2: a list comes back per rank")
    @line_magic
    def mlx_pull(self, line: str):
        """%mlx_pull x [--ranks all]: return a rank variable (rank 0's, or a list per rank)."""
        args = parse_argstring(self.mlx_pull, line)
        ranks = int(args.ranks) if args.ranks.strip().isdigit() else args.ranks  # one rank: its value alone
        try:
            return current().pull(args.name, ranks)
        except ValueError as e:
            raise UsageError(str(e)) from None
        except DistCellError as e:
            if e.root is None or e.root.error is None:
                raise
            raise UsageError(e.root.error.message) from None

    @magic_arguments()
    @sweep_arguments
    @argument("--out", default=None, help="also save the plot to this file (PNG)")
    @argument("--no-plot", action="store_true", help="show no plot, only return the rows")
    @line_magic
    def mlx_bench(self, line: str):
        """Benchmark all_sum, all_gather and send/recv between rank pairs on the cluster.

        Each iteration starts after a barrier and counts the slowest rank; every size
        is checked. Shows the log-log latency and bandwidth plot and returns a
        BenchResult (a table; .rows, .plot(), .reading()).

        %mlx_bench --sizes 1KB-256MB --factor 4 --reference tb5
        res = %mlx_bench --ops all_sum --dtypes float32,bfloat16 --iters 50
        """
        from IPython.display import display

        args = parse_argstring(self.mlx_bench, line)
        cluster = current()
        try:
            result = run_bench(cluster, **sweep_values(args))
        except ValueError as e:  # checked before the sweep starts
            raise UsageError(str(e)) from None
        if args.out or not args.no_plot:
            fig = result.plot(args.out)
            if not args.no_plot:
                display(fig)
        return result

    @magic_arguments()
    @argument("prompt", nargs="*", help="the user message (a chat-templated turn)")
    @argument(
        "--load",
        metavar="MODEL",
        default=None,
        help="load MODEL on every rank first: 'bundled' (SmolLM2, offline), an mlx-lm path or repo id",
    )
    @argument("--pipeline", action="store_true", help="with --load: pipeline parallel instead of tensor parallel")
    @argument(
        "--split",
        default=None,
        help="with --load --pipeline: layers per rank, rank 0 first (20,5,5), or auto: split by the ranks' memory",
    )
    @argument("--context", type=int, default=4096, help="with --load: tokens the load must leave room for (4096)")
    @argument(
        "--adapter",
        default=None,
        help="with --load: LoRA adapters (a finetune folder), fused into the weights, then split",
    )
    @argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    @line_magic
    def mlx_generate(self, line: str):
        """Generate with a model sharded over the ranks; tokens stream in as rank 0 makes them.

        %mlx_generate --load bundled --pipeline            load SmolLM2, split as a pipeline
        %mlx_generate What is the capital of France?      one chat turn, greedy
        Interrupt stops every rank at the same token.
        """
        from .generate import check_max_tokens, generate, load_model

        args = parse_argstring(self.mlx_generate, line)
        cluster = current()
        try:
            if args.prompt:  # a bad --max-tokens is refused before a model loads
                check_max_tokens(args.max_tokens)
            if args.load is not None:
                model = None if args.load == "bundled" else args.load
                loaded = load_model(
                    cluster,
                    model,
                    pipeline=args.pipeline,
                    split=_split(args.split),
                    context=args.context,
                    adapter_path=args.adapter,
                )
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(str(e)) from None
        if args.load is not None:
            how = "pipeline" if args.pipeline else "tensor parallel"
            mem = ", ".join(human_bytes(m) for m in loaded.active_memory)
            print(f"Loaded {args.load} ({how}) on {cluster.n} ranks in {loaded.seconds:.1f} s; memory per rank: {mem}")
        if args.prompt:
            stats = generate(cluster, [{"role": "user", "content": " ".join(args.prompt)}], args.max_tokens)
            print(stats.summary())
            return None

    @magic_arguments()
    @argument("model", nargs="?", default=None, help="'bundled' (SmolLM2, the default), an mlx-lm path or a repo id")
    @argument("--context", type=int, default=4096, help="tokens of KV cache to leave room for (default 4096)")
    @line_magic
    def mlx_plan(self, line: str):
        """Which layouts MODEL allows over the cluster, with each rank's memory, before any load.

        Reads only config.json and the safetensors headers. Lists tensor parallel, an even
        pipeline and a pipeline split by the ranks' memory budgets (%mlx_cluster start --memory),
        each rank's memory (weights, KV cache for --context tokens, activations), whether it
        fits, and the one to load (load_model(cluster, pipeline=True, split="auto")).

        %mlx_plan                            the bundled model, 4096 tokens of context
        %mlx_plan mlx-community/Qwen3-8B-4bit --context 32768
        """
        from .generate import plan

        args = parse_argstring(self.mlx_plan, line)
        model = None if args.model in (None, "bundled") else _unquoted(args.model)
        try:
            return plan(current(), model, args.context)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(str(e)) from None

    @magic_arguments()
    @argument("--max-tokens", type=int, default=256, help="most tokens per reply (default 256)")
    @argument("--system", default=None, help="a system prompt for the conversation")
    @line_magic
    def mlx_chat(self, line: str):
        """A chat box for the model loaded on the ranks (%mlx_generate --load first)."""
        from .widgets import ChatWidget

        args = parse_argstring(self.mlx_chat, line)
        try:
            return ChatWidget(current(), max_tokens=args.max_tokens, system=args.system)
        except ValueError as e:
            raise UsageError(str(e)) from None

    @magic_arguments()
    @argument(
        "action",
        nargs="?",
        default="start",
        choices=["start", "status", "stop"],
        help="start serving (default), show what the server does, or stop it",
    )
    @argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free one)")
    @argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    @argument(
        "--api-key",
        default=None,
        help="a key every request must send (Authorization: Bearer KEY); "
        "required for a --host other machines can reach",
    )
    @argument("--name", default=None, help="the model's id in the API (default: the model's name)")
    @argument("--max-batch", type=int, default=32, help="most sequences decoded together (default 32)")
    @line_magic
    def mlx_serve(self, line: str):
        """Serve the model loaded on the ranks as an OpenAI-compatible API, batching requests.

        server = %mlx_serve --port 8000    GET /v1/models, POST /v1/chat/completions, /v1/completions
        %mlx_serve status            requests running and queued, tokens/s, time to first token
        %mlx_serve stop              close the port; the ranks are free again
        Load a model first (%mlx_generate --load bundled --pipeline); the notebook stays free.
        """
        from .serve import ServeError, Server

        global _server
        args = parse_argstring(self.mlx_serve, line)
        if args.action != "start":
            if _server is None:
                raise UsageError("no server is running: start one with %mlx_serve --port 8000")
            if args.action == "stop":
                url = _server.url
                _stop_server()
                print(f"Stopped serving at {url}.")
                return None
            return _server.status()
        if _server is not None and _server.serving:
            raise UsageError(f"already serving at {_server.url}: %mlx_serve stop first")
        try:
            server = Server(
                current(),
                _unquoted(args.host),
                args.port,
                _unquoted(args.api_key),
                model_name=_unquoted(args.name),
                max_batch=args.max_batch,
            )
            _server = server.start()
        except (ValueError, ServeError) as e:
            raise UsageError(str(e)) from None
        print(f"Serving {server.model.id} at {server.url} (OpenAI API; %mlx_serve status, %mlx_serve stop).")
        return server

    @magic_arguments()
    @argument("--max-tokens", type=int, default=256, help="most tokens per reply (default 256)")
    @argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    @argument("--seed", type=int, default=None, help="makes sampled replies repeatable")
    @cell_magic
    def mlx_batch(self, line: str, cell: str):
        """Generate one reply per line of the cell, as one batch over the ranks (chat turns).

        %%mlx_batch --max-tokens 32
        What is the capital of France?
        Name three colours.
        """
        from .batch import generate_batch

        args = parse_argstring(self.mlx_batch, line)
        prompts = [p.strip() for p in cell.splitlines() if p.strip()]
        if not prompts:
            raise UsageError("%%mlx_batch takes one prompt per line of the cell, and the cell is empty")
        chats = [[{"role": "user", "content": p}] for p in prompts]
        try:
            return generate_batch(current(), chats, args.max_tokens, temperature=args.temperature, seed=args.seed)
        except ValueError as e:  # checked before any rank runs
            raise UsageError(str(e)) from None


def _split(text: Optional[str]):
    """--split: None, "auto" or layers per rank ("20,5,5"); the API checks the numbers."""
    if text is None or text == "auto":
        return text
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--split takes layers per rank like 20,5,5 (rank 0 first) or auto, got {text!r}") from None


def _stop_server() -> None:
    global _server
    if _server is not None:
        _server.stop()
        _server = None
