"""IPython magics, thin over the Python API: %mlx_cluster, %%mlx_dist, %mlx_push, %mlx_pull, %mlx_bench.

They parse, call the API and show; the magics for a model on the ranks are in model_magics.py.
Their state (the cluster they work on, the server, the last status panel) is the MLXMagics
instance's, one per IPython shell: ``current()`` and ``use()`` reach it.
"""

from __future__ import annotations

import contextlib
import functools
import shlex
import time
from collections.abc import Iterator
from typing import Optional

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from .bench import run_bench, sweep_arguments, sweep_values
from .cell import DistCellError
from .cluster import BACKENDS, Cluster, ClusterError
from .display import Table, clusters_table, findings_table, status_table
from .hostfile import HostfileError


def instance() -> Optional[MLXMagics]:
    """The magics of the running IPython shell (``%load_ext mlx_nb`` registers them), or None."""
    from IPython import get_ipython

    shell = get_ipython()
    return shell.magics_manager.registry.get(MLXMagics.__name__) if shell is not None else None


def current() -> Cluster:
    """The cluster the magics work on (started by %mlx_cluster start)."""
    magics = instance()
    if magics is None:
        raise UsageError("no MLX cluster is running: start one with %mlx_cluster start -n 4")
    return magics.current()


def use(cluster: Optional[Cluster]) -> None:
    """Make the magics work on ``cluster`` (a running Cluster made in Python), or on none."""
    magics = instance()
    if magics is None and cluster is not None:
        raise UsageError("mlx_nb's magics are not loaded: %load_ext mlx_nb first")
    if magics is not None:
        magics.cluster = cluster


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


def _env(pairs: Optional[list[str]]) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        name, eq, value = pair.partition("=")
        if not eq or not name:
            raise UsageError(f"--env takes NAME=value, got {pair!r}")
        out[name] = value
    return out


def unquoted(value: Optional[str]) -> Optional[str]:
    # magic_arguments keeps the quotes of --ssh 'ssh -F cfg' or --python '/my env/bin/python'
    # (a non-POSIX split on Windows-style rules); a path with an apostrophe stays as it is
    if value and len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _ssh(spec: Optional[str]) -> Optional[list[str]]:
    return shlex.split(unquoted(spec)) if spec else None


def _cluster_from_args(args) -> Cluster:
    """The Cluster that %mlx_cluster start / check arguments describe (not started)."""
    try:
        return Cluster(
            n=args.n,
            backend=args.backend,
            grace=args.grace,
            hostfile=unquoted(args.hostfile),
            hosts=args.hosts,
            python=unquoted(args.python),
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


@contextlib.contextmanager
def refused(*more: type[Exception], rank_errors: bool = False) -> Iterator[None]:
    """What the API refuses (a ValueError, or one of ``more``) as the magic's one-line UsageError;
    with ``rank_errors``, a rank's own error too (the failed job's root cause)."""
    try:
        yield
    except (ValueError, *more) as e:
        raise UsageError(str(e)) from None
    except DistCellError as e:
        if not rank_errors or e.root is None or e.root.error is None:
            raise
        raise UsageError(e.root.error.message) from None


def _names(spec: Optional[str]) -> list[str]:
    return [x.strip() for x in (spec or "").replace(" ", ",").split(",") if x.strip()]


@magics_class
class MLXMagics(Magics):
    """The magics: they parse, call the API and show. Their state is this instance's, one per
    IPython shell: the cluster they work on, the server and the last status panel."""

    def __init__(self, shell=None):
        super().__init__(shell)
        self.cluster: Optional[Cluster] = None  # the cluster the magics work on
        self.server = None  # the %mlx_serve server (mlx_nb.serve.Server)
        self.panel = None  # the last status --watch panel: the next one replaces it (its thread ends)

    def current(self) -> Cluster:
        """The cluster the magics work on (started by %mlx_cluster start)."""
        if self.cluster is None or not self.cluster.running:
            raise UsageError("no MLX cluster is running: start one with %mlx_cluster start -n 4")
        return self.cluster

    def stop_server(self) -> None:
        """Stop the %mlx_serve server, if one runs."""
        if self.server is not None:
            self.server.stop()
            self.server = None

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
        args = parse_argstring(self.mlx_cluster, line)
        return getattr(self, "_" + args.action.replace("-", "_"))(args)

    def _check(self, args) -> Table:
        if args.hostfile or args.hosts:
            return findings_table(_cluster_from_args(args).check())
        if self.cluster is None or not self.cluster.running:
            raise UsageError("%mlx_cluster check needs --hostfile F or --hosts h1,h2 (or a running cluster)")
        return findings_table(self.cluster.check())

    def _list(self, args) -> Table:
        from .cluster import clusters

        return clusters_table(clusters())

    def _start(self, args) -> Table:
        self._none_running()
        cluster = _cluster_from_args(args)
        where = f" on {len({h.ssh_hostname for h in cluster.hostfile.hosts})} host(s)" if cluster.remote else ""
        print(f"Starting {cluster.n} MLX ranks ({cluster.backend}){where}...", flush=True)
        t0 = time.perf_counter()
        try:
            cluster.start()
        except ClusterError as e:
            raise UsageError(f"the cluster did not start: {e}") from None
        self.cluster = cluster
        kept = f" and kept as {args.name!r} (it outlives this kernel: %mlx_cluster attach {args.name})"
        print(f"Cluster ready in {time.perf_counter() - t0:.1f} s{kept if args.keep else ''}.")
        return status_table(cluster)

    def _attach(self, args) -> Table:
        self._none_running()
        if not args.cluster_name:
            raise UsageError("%mlx_cluster attach NAME: which kept cluster (%mlx_cluster list shows them)")
        try:
            cluster = Cluster.attach(args.cluster_name, take=args.take)
        except (ClusterError, ValueError) as e:
            raise UsageError(" ".join(str(e).split())) from None
        self.cluster = cluster
        setup = f"; {len(cluster.setup_cells)} setup cell(s) kept" if cluster.setup_cells else ""
        print(f"Attached {args.cluster_name!r}: {cluster.n} ranks, the same processes and their state{setup}.")
        return status_table(cluster)

    def _none_running(self) -> None:
        if self.cluster is not None and self.cluster.running:
            raise UsageError("a cluster is already running: %mlx_cluster stop (or restart) first")

    def _stop(self, args) -> None:
        cluster = self.current()
        self.stop_server()
        cluster.stop()
        self.cluster = None
        print("Cluster stopped.")
        if cluster.kept_as is not None:
            print(f"(It was kept as {cluster.kept_as!r}: it is gone now.)")

    def _restart(self, args) -> Table:
        cluster = self.current()
        cluster.restart(tell=True)
        return status_table(cluster)

    def _status(self, args):
        cluster = self.current()
        if args.watch:
            from .widgets import StatusWidget

            if self.panel is not None:
                self.panel.end("replaced by a newer panel (%mlx_cluster status --watch)")
            self.panel = StatusWidget(cluster)
            return self.panel
        cluster.heal()
        note = status_note(cluster)
        if note:
            print(note)
        return status_table(cluster)

    def _forget_setup(self, args) -> None:
        print(f"Forgot {self.current().forget_setup()} setup cell(s).")

    def _cache(self, args):
        from .generate import prompt_cache

        with refused(rank_errors=True):
            report = prompt_cache(self.current(), clear=args.clear, limit=args.limit)
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
        cluster = self.current()
        push = self._ns_values(_names(args.push)) if args.push else None
        options = dict(timeout=args.timeout, push=push, pull=args.pull, setup=args.setup, profile=args.profile)
        with refused():  # a bad --timeout or --ranks, or a value that cannot travel: before any rank runs
            result = cluster.run(cell, ranks=args.ranks, **options)
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
        with refused():  # a value that cannot travel, named
            self.current().push(self._ns_values(names))

    @magic_arguments()
    @argument("name", help="the rank variable to bring back")
    @argument("--ranks", default="0", help="0 (default), all, or a list like 0,2: a list comes back per rank")
    @line_magic
    def mlx_pull(self, line: str):
        """%mlx_pull x [--ranks all]: return a rank variable (rank 0's, or a list per rank)."""
        args = parse_argstring(self.mlx_pull, line)
        ranks = int(args.ranks) if args.ranks.strip().isdigit() else args.ranks  # one rank: its value alone
        with refused(rank_errors=True):
            return self.current().pull(args.name, ranks)

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
        cluster = self.current()
        with refused():  # checked before the sweep starts
            result = run_bench(cluster, **sweep_values(args))
        if args.out or not args.no_plot:
            fig = result.plot(args.out)
            if not args.no_plot:
                display(fig)
        return result
