"""Multi-host for real on one machine: SSH test hosts in network namespaces, MLX groups across
them, ipyparallel engines started over ssh and under mpirun, and the launcher helpers.

Timings are printed (run with -s to see them).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import ipyparallel as ipp
import psutil
import pytest

pytest.register_assert_rewrite("testhosts")  # it is also a plugin (below), imported here first
from conftest import processes_left, wait_until  # noqa: E402
from lanes import starts  # noqa: E402
from testhosts import TestHosts, TestHostsError, purge, require_mpi  # noqa: E402

from mlx_nb.engines import launch as launchers  # noqa: E402

pytest_plugins = ["testhosts"]  # the ssh_hosts fixture, one per session for every module naming it
PY = sys.executable


RING = (
    "import mlx.core as mx; g = mx.distributed.init(strict=True, backend='ring'); "
    "print(mx.distributed.all_sum(mx.array([1.0]), group=g).item())"
)


# ------------------------------------------------------------------- hosts
def test_each_host_answers_ssh_by_alias_as_itself(ssh_hosts):
    hosts = ssh_hosts(2)
    for name in hosts.names:
        p = subprocess.run(
            [*hosts.ssh_cmd, name, "hostname; echo $MLXNB_TESTHOSTS"], capture_output=True, text=True, timeout=30
        )
        assert p.returncode == 0, p.stderr
        hostname, mark = p.stdout.split()
        assert mark == hosts.prefix
        if hosts.mode == "netns":
            assert hostname == name
    # the IP works too, with the same config
    assert hosts.ssh(hosts.ips[1], "true").returncode == 0


def test_host0_reaches_host1_and_the_bridge_over_tcp(ssh_hosts):
    hosts = ssh_hosts(2)
    on_bridge = socket.create_server((hosts.bridge_ip, 0))
    bridge_port = on_bridge.getsockname()[1]
    threading.Thread(target=lambda: on_bridge.accept()[0].sendall(b"bridge"), daemon=True).start()
    serve = (
        f"import socket; s = socket.create_server(('{hosts.ips[1]}', 23456)); print('up', flush=True); "
        "c, _ = s.accept(); c.sendall(b'host1'); c.close()"
    )
    server = subprocess.Popen(hosts.ssh_argv(1, f"{PY} -c {shlex.quote(serve)}"), stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "up"
        fetch = (
            "import socket, sys; "
            "print(*(socket.create_connection((h, int(p)), timeout=5).recv(16).decode() "
            "for h, p in zip(sys.argv[1::2], sys.argv[2::2])))"
        )
        p = hosts.ssh(0, f"{PY} -c {shlex.quote(fetch)} {hosts.ips[1]} 23456 {hosts.bridge_ip} {bridge_port}")
        assert (p.returncode, p.stdout.split()) == (0, ["host1", "bridge"]), p.stderr
        assert server.wait(timeout=10) == 0
    finally:
        server.kill()
        on_bridge.close()


def test_mlx_ring_group_spans_the_hosts(ssh_hosts):
    hosts = ssh_hosts(2)
    hostfile = hosts.dir / "ring.json"
    hostfile.write_text(json.dumps([[f"{ip}:32451"] for ip in hosts.ips]))
    ranks = [
        subprocess.Popen(
            hosts.ssh_argv(i, f"MLX_RANK={i} MLX_HOSTFILE={hostfile} {PY} -c {shlex.quote(RING)}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [r.communicate(timeout=60) for r in ranks]
    assert [o.strip() for o, _ in outs] == ["2.0", "2.0"], outs


def test_hosts_have_their_own_process_ids(ssh_hosts):
    hosts = ssh_hosts(2)
    if hosts.mode != "netns":
        pytest.skip("loopback test hosts share this machine's process ids")
    # as on another machine, a pid a host reports is not a local process: there, sshd is pid 1
    assert [hosts.ssh(i, "cat /proc/1/comm").stdout.strip() for i in range(2)] == ["sshd", "sshd"]


@pytest.mark.ssh
def test_loopback_fallback_still_gives_working_hosts_and_says_so(capsys):
    with pytest.warns(UserWarning, match="WITHOUT NETWORK NAMESPACES"):
        hosts = TestHosts(1, netns=False).start()
    try:
        assert "WITHOUT NETWORK NAMESPACES" in capsys.readouterr().out
        assert hosts.mode == "loopback" and hosts.ips[0].startswith("127.")
        assert hosts.ssh(0, "echo ok").stdout.strip() == "ok"
    finally:
        hosts.close()
    assert not any(hosts.dir.parent.glob(hosts.prefix + "-hosts-*"))


@pytest.mark.ssh
def test_purge_removes_what_a_crashed_session_left():
    crash = (
        f"import os, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from testhosts import TestHosts; "
        "h = TestHosts(1).start(); h.ssh(0, 'sleep 300 >/dev/null 2>&1 </dev/null &'); "
        "print(h.prefix, h.dir, *h.namespaces, flush=True); os._exit(9)"
    )
    p = subprocess.run([PY, "-c", crash], capture_output=True, text=True, timeout=60)
    prefix, tmp, *namespaces = p.stdout.split()
    assert any(prefix in " ".join(q.info["cmdline"] or []) for q in psutil.process_iter(["cmdline"]))
    purge(prefix)
    left = [q.pid for q in psutil.process_iter(["cmdline"]) if tmp in " ".join(q.info["cmdline"] or [])]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert not left and not any(ns in netns for ns in namespaces) and f"{prefix}-" not in links
    assert not os.path.exists(tmp)


# ------------------------------------------------------------------ ssh_run
def test_ssh_run_returns_exit_code_and_output(ssh_hosts):
    hosts = ssh_hosts(2)
    assert launchers.ssh_run(hosts.names[0], "echo hi; exit 3", hosts.ssh_cmd) == (3, "hi\n")
    assert launchers.ssh_run(hosts.names[0], "exit 255", hosts.ssh_cmd) == (255, "")


def test_ssh_run_is_bounded_on_unreachable_hosts_and_slow_commands(ssh_hosts):
    hosts = ssh_hosts(2)
    nobody = hosts.ips[0].rsplit(".", 1)[0] + ".99"  # on the test subnet, no host there
    t = time.monotonic()
    rc, out = launchers.ssh_run(nobody, "true", hosts.ssh_cmd)
    assert rc == 255 and f"cannot reach {nobody} over ssh" in out, out
    assert time.monotonic() - t < 10
    rc, out = launchers.ssh_run(hosts.names[0], "echo started; sleep 30", hosts.ssh_cmd, timeout=2)
    assert rc == 124 and out.startswith("started\n") and out.endswith("did not finish within 2 s"), out
    processes_left(find=lambda: hosts.processes(0), timeout=5)
    assert not hosts.processes(0), [p.cmdline() for p in hosts.processes(0)]


def test_scp_command_mirrors_the_ssh_command():
    assert launchers.scp_command(["ssh", "-F", "cfg", "-p", "2222", "-o", "A=b"]) == [
        "scp",
        "-F",
        "cfg",
        "-P",
        "2222",
        "-o",
        "A=b",
    ]


# ------------------------------------------------------ engines over ssh
def on_engine(f):
    """Send ``f`` by value: ipyparallel imports a function's module on the engine, and a test module is not importable there."""
    f.__module__ = "__main__"
    return f


@on_engine
def _whoami() -> tuple:
    import os
    import socket

    return socket.gethostname(), os.environ.get("MLX_RANK"), os.environ.get("MLXNB_CHECK"), os.getpid()


@on_engine
def _ring_all_sum(hostfile: str) -> float:
    import os

    import mlx.core as mx

    os.environ["MLX_HOSTFILE"] = hostfile
    g = mx.distributed.init(strict=True, backend="ring")
    return mx.distributed.all_sum(mx.array([g.rank() + 1.0]), group=g).item()


@pytest.fixture(scope="module")
@starts("cluster")
def ssh_engines(ssh_hosts):
    """Controller on the bridge, one engine per host over ssh, started as the Cluster would."""
    hosts = ssh_hosts(2)
    cluster = ipp.Cluster(n=0, controller_ip=hosts.bridge_ip, log_level=40)
    cluster.engine_launcher_class = "ssh"
    cluster.start_controller_sync()
    try:
        client = cluster.connect_client_sync()
        t = time.monotonic()
        for i, name in enumerate(hosts.names):
            env = {"MLX_RANK": str(i), "MLXNB_CHECK": f"env of rank {i}"}
            kwargs = launchers.ssh_engine_launcher_kwargs(name, PY, hosts.ssh_cmd, env)
            # a profile dir of the host's own, as on another machine: no connection file there,
            # and nothing written into this machine's ~/.ipython
            kwargs["remote_profile_dir"] = str(hosts.dir / f"profile-{name}")
            cluster.start_engines_sync(engine_set_id=f"rank{i}", **kwargs)
        launched = time.monotonic() - t
        client.wait_for_engines(2, timeout=60)
        print(f"\nssh engines: launched in {launched:.1f} s, registered after {time.monotonic() - t:.1f} s")
        yield hosts, cluster, client
    finally:
        if cluster.controller is not None:
            try:
                cluster.stop_cluster_sync()
            except Exception as e:  # a host's engine may be gone; the hosts' teardown kills the rest
                print(f"stop_cluster failed: {e!r}")


def test_ssh_engines_register_on_the_bridge_with_their_rank_environment(ssh_engines):
    hosts, _, client = ssh_engines
    found = sorted(client[:].apply_sync(_whoami), key=lambda w: w[1])
    assert [(r, check) for _, r, check, _ in found] == [("0", "env of rank 0"), ("1", "env of rank 1")]
    if hosts.mode == "netns":
        assert [h for h, *_ in found] == hosts.names


def test_ssh_engines_form_an_mlx_ring_group(ssh_engines):
    hosts, _, client = ssh_engines
    hostfile = hosts.dir / "engines-ring.json"
    hostfile.write_text(json.dumps([[f"{ip}:32461"] for ip in hosts.ips]))
    assert client[:].apply_sync(_ring_all_sum, str(hostfile)) == [3.0, 3.0]


def test_remote_engine_death_is_noticed_by_the_controller_within_seconds(ssh_engines):
    hosts, cluster, client = ssh_engines
    rank1 = next(eid for eid, (_, r, _, _) in zip(client.ids, client[:].apply_sync(_whoami)) if r == "1")
    pid = client[rank1].apply_sync(_whoami)[3]
    t = time.monotonic()
    assert hosts.ssh(1, f"kill -9 {pid}").returncode == 0
    wait_until(lambda: rank1 not in client.ids, 20, every=0.05)
    noticed = time.monotonic() - t
    print(f"\nssh engine killed: the controller dropped it after {noticed:.1f} s")
    assert rank1 not in client.ids
    assert noticed < 10


def test_stopping_the_ssh_cluster_leaves_nothing_on_the_hosts(ssh_engines):
    hosts, cluster, _ = ssh_engines
    t = time.monotonic()
    cluster.stop_cluster_sync()  # one engine is already dead (previous test)
    print(f"\nstop_cluster with ssh engines: {time.monotonic() - t:.1f} s")
    processes_left(find=hosts.processes)
    assert not hosts.processes(), [p.cmdline() for p in hosts.processes()]


# ---------------------------------------------------------------------- MPI
@on_engine
def _mpi_group() -> tuple:
    import os

    import mlx.core as mx

    g = mx.distributed.init(strict=True, backend="mpi")
    total = mx.distributed.all_sum(mx.array([g.rank() + 1.0]), group=g).item()
    env = os.environ
    return env["MLX_RANK"], env["OMPI_COMM_WORLD_RANK"], env.get("MLXNB_CHECK"), g.rank(), g.size(), total


def test_mpi_available_says_why_not(monkeypatch):
    monkeypatch.setattr(launchers.shutil, "which", lambda name: None)
    assert launchers.mpi_available() == (
        False,
        "mpirun not found: install Open MPI (apt-get install openmpi-bin, brew install open-mpi)",
    )


@pytest.mark.cluster
def test_mpi_ranks_load_versioned_libmpi_without_the_dev_package(monkeypatch):
    try:
        require_mpi()
    except TestHostsError as e:
        pytest.fail(str(e), pytrace=False)
    monkeypatch.delenv("MLX_MPI_LIBNAME", raising=False)
    assert "MLX_MPI_LIBNAME" not in launchers.mpi_engine_launcher_kwargs(2, PY, {})["environment"]
    real = launchers._loads
    monkeypatch.setattr(launchers, "_loads", lambda name: name != "libmpi.so" and real(name))
    env = launchers.mpi_engine_launcher_kwargs(2, PY, {})["environment"]
    assert env == {"MLX_MPI_LIBNAME": "libmpi.so.40"}
    check = "import mlx.core as mx; print(mx.distributed.is_available('mpi'))"
    p = subprocess.run([PY, "-c", check], env={**os.environ, **env}, capture_output=True, text=True)
    assert p.stdout.strip() == "True", p.stderr


@pytest.mark.cluster
def test_mpi_engines_form_an_mlx_mpi_group():
    try:
        require_mpi()
    except TestHostsError as e:
        pytest.fail(str(e), pytrace=False)
    cluster = ipp.Cluster(n=0, controller_ip="127.0.0.1", log_level=40)
    cluster.engine_launcher_class = "mpi"
    cluster.start_controller_sync()
    try:
        client = cluster.connect_client_sync()
        t = time.monotonic()
        cluster.start_engines_sync(
            engine_set_id="mpi", **launchers.mpi_engine_launcher_kwargs(2, PY, {"MLXNB_CHECK": "env"})
        )
        client.wait_for_engines(2, timeout=60)
        print(f"\nmpi engines registered after {time.monotonic() - t:.1f} s")
        got = sorted(client[:].apply_sync(_mpi_group))
        assert got == [("0", "0", "env", 0, 2, 3.0), ("1", "1", "env", 1, 2, 3.0)]
        # one dead rank ends the whole mpirun job
        mpirun = psutil.Process(cluster.engines["mpi"].pid)
        ranks = [c for c in mpirun.children(recursive=True) if "ipyparallel.engine" in " ".join(c.cmdline())]
        ranks[0].kill()
        t = time.monotonic()
        gone, _ = psutil.wait_procs([mpirun], timeout=20)
        print(f"mpi rank killed: mpirun exited after {time.monotonic() - t:.1f} s")
        assert gone
    finally:
        cluster.stop_cluster_sync()
