"""A cluster across hosts: SSH test hosts in network namespaces (tests/testhosts.py), one
engine per hostfile entry over ssh, a ring group over the hosts' own addresses, and the
errors of a host that cannot take part: each bounded in time and naming the host."""

from __future__ import annotations

import json
import os
import shlex
import stat
import sys
import time
from pathlib import Path

import pytest
from IPython.core.error import UsageError

pytest.register_assert_rewrite("testhosts")
from conftest import magic_cluster, processes_left  # noqa: E402
from testhosts import TestHosts  # noqa: E402

from mlx_nb import Cluster, hostfile, magics, rank_env  # noqa: E402
from mlx_nb.cluster import ClusterError, controller_ip  # noqa: E402

pytest_plugins = ["testhosts"]
pytestmark = [pytest.mark.ssh, pytest.mark.cluster]
PY = sys.executable


def ring_hostfile(hosts: TestHosts, path=None, entries=None) -> str:
    """A ring hostfile of (ssh name, ip) entries, by default the test hosts'."""
    entries = [{"ssh": ssh, "ips": [ip]} for ssh, ip in entries or zip(hosts.names, hosts.ips)]
    path = path or hosts.dir / "cluster.json"
    path.write_text(json.dumps({"backend": "ring", "hosts": entries}))
    return str(path)


def on_engine(f):
    f.__module__ = "__main__"  # sent by value: the test module is not importable on the engines
    return f


@on_engine
def _mlx_env() -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k.startswith("MLX_") and not k.startswith("MLX_NB_")}
    if "MLX_HOSTFILE" in env:
        with open(env["MLX_HOSTFILE"]) as f:
            env["MLX_HOSTFILE"] = f.read()
    return env


@on_engine
def _env_var(name: str):
    import os

    return os.environ.get(name)


@pytest.fixture(scope="module")
def hosts(ssh_hosts):
    return ssh_hosts(2)


@pytest.fixture(scope="module")
def shell():
    from IPython.testing.globalipapp import get_ipython

    shell = get_ipython()
    shell.run_line_magic("load_ext", "mlx_nb")
    return shell


@pytest.fixture(scope="module")
def ip(hosts, shell):
    """The magics, with a cluster started by %mlx_cluster start --hostfile over the test hosts."""
    path = ring_hostfile(hosts)
    with magic_cluster(f"--hostfile {path} --ssh '{' '.join(hosts.ssh_cmd)}' --env MLXNB_CHECK=yes") as ip:
        yield ip


# ------------------------------------------------------------- across hosts
def test_controller_listens_on_the_hosts_subnet(hosts):
    hf = hostfile.load(ring_hostfile(hosts))
    assert controller_ip(hf, hosts.ssh_cmd) == hosts.bridge_ip
    assert controller_ip(hostfile.local(2)) == "127.0.0.1"


def test_hostfile_cluster_runs_cells_on_every_host(ip, hosts):
    cluster = magics.current()
    assert cluster.remote == {0, 1} and cluster.backend == "ring"
    assert cluster.group.controller_ip == hosts.bridge_ip
    ip.run_cell_magic("mlx_dist", "--ranks all --pull who", "import socket\nwho = (socket.gethostname(), rank)")
    who = ip.user_ns["who"]
    assert [r for _, r in who] == [0, 1]
    if hosts.mode == "netns":
        assert [h for h, _ in who] == hosts.names
    result = ip.run_cell_magic("mlx_dist", "", "mx.distributed.all_sum(mx.array([rank + 1.0]), group=world)")
    assert result.value["text/plain"] == "array([3], dtype=float32)"
    assert "idle" in repr(ip.run_line_magic("mlx_cluster", "status"))
    assert magics.status_note(cluster) is None  # the MPI hint is for local clusters


def test_a_controller_off_loopback_is_encrypted_so_a_stranger_reads_no_output(ip, hosts):
    import zmq

    cluster = magics.current()
    info = json.loads(Path(cluster.group.client_file).read_text())
    assert info["interface"] == f"tcp://{hosts.bridge_ip}" and info["curve_serverkey"]
    url = f"{info['interface']}:{info['iopub']}"
    ctx = zmq.Context()
    stranger, keyed = ctx.socket(zmq.SUB), ctx.socket(zmq.SUB)
    keyed.curve_publickey, keyed.curve_secretkey = zmq.curve_keypair()
    keyed.curve_serverkey = info["curve_serverkey"].encode()
    for s in (stranger, keyed):
        s.setsockopt(zmq.SUBSCRIBE, b"")
        s.connect(url)
    marker = f"rank output {os.getpid()}".encode()
    try:
        heard = False
        for _ in range(10):  # a subscription takes effect a moment after connecting
            ip.run_cell_magic("mlx_dist", "", f"print({marker.decode()!r})")
            while not heard and keyed.poll(2000):
                heard = any(marker in frame for frame in keyed.recv_multipart())
            if heard:
                break
        assert heard, "a subscriber with the controller's key should read the ranks' output"
        assert stranger.poll(1000) == 0, "a subscriber without the key read the ranks' output"
    finally:
        stranger.close(0)
        keyed.close(0)
        ctx.term()


def test_engines_get_the_environment_mlx_launch_would_give_them(ip, hosts):
    cluster = magics.current()
    got = cluster.view.apply_sync(_mlx_env)
    ports = [int(a.split(":")[1]) for a in cluster.group.addresses]
    want = rank_env.rank_launch(cluster.hostfile, "ring", ports=ports, env={"MLXNB_CHECK": "yes"})
    assert got == [
        {**{k: v for k, v in w.env.items() if k.startswith("MLX_")}, **{k: v + "\n" for k, v in w.files.items()}}
        for w in want
    ]
    assert cluster.view.apply_sync(_env_var, "MLXNB_CHECK") == ["yes", "yes"]


def test_restart_brings_back_ranks_on_their_hosts(ip, hosts):
    cluster = magics.current()
    t = time.monotonic()
    ip.run_line_magic("mlx_cluster", "restart")
    print(f"\nrestart across 2 ssh hosts: {time.monotonic() - t:.1f} s")
    result = ip.run_cell_magic("mlx_dist", "", "mx.distributed.all_sum(mx.array([rank + 1.0]), group=world)")
    assert result.value["text/plain"] == "array([3], dtype=float32)"
    assert cluster.status()[1].state == "idle"


def test_stop_leaves_nothing_on_the_hosts_not_even_what_the_ranks_started(ip, hosts):
    profile = magics.current().group.state.folder  # the engines' IPython profile on the hosts
    try:
        engines = hosts.processes()
        ip.run_cell_magic("mlx_dist", "", "import subprocess\nsleeper = subprocess.Popen(['sleep', '1000'])")
        sleepers = hosts.named("sleep")
    finally:  # stopped whatever happened, so that the tests after this one find quiet hosts
        t = time.monotonic()
        ip.run_line_magic("mlx_cluster", "stop")
        print(f"\nstop of the 2-host cluster: {time.monotonic() - t:.1f} s")
    assert engines, "expected engines on the hosts while the cluster runs"
    assert len(sleepers) == 2
    assert processes_left(find=hosts.processes) == []
    assert hosts.ssh(0, f"ls -d {profile} 2>/dev/null || true").stdout.strip() == ""


# ------------------------------------------------------------------ preflight
def test_check_reports_every_host(shell, hosts):
    table = shell.run_line_magic(
        "mlx_cluster", f"check --hostfile {ring_hostfile(hosts)} --ssh '{' '.join(hosts.ssh_cmd)}'"
    )
    assert {row[0] for row in table.rows} == set(hosts.names)
    assert all(row[2] in ("ok", "skip") for row in table.rows if row[1] != "macos"), repr(table)
    assert "every host is ready" in table.title


def _start_fails(hosts, path, **kwargs) -> tuple[str, float]:
    t = time.monotonic()
    with pytest.raises(ClusterError) as info:
        Cluster(hostfile=path, ssh_cmd=hosts.ssh_cmd, **kwargs).start()
    return str(info.value), time.monotonic() - t


def test_unreachable_host_is_named_fast_and_nothing_starts(hosts):
    ghost = hosts.ips[0].rsplit(".", 1)[0] + ".99"  # in the subnet, no host there
    path = ring_hostfile(hosts, hosts.dir / "ghost.json", [(hosts.names[0], hosts.ips[0]), (ghost, ghost)])
    text, took = _start_fails(hosts, path)
    assert ghost in text and "cannot reach" in text and "nothing was started" in text
    assert took < 20
    assert processes_left(find=hosts.processes) == []


def test_wrong_python_path_is_named(hosts):
    text, took = _start_fails(hosts, ring_hostfile(hosts), python="/opt/nowhere/bin/python3")
    assert "/opt/nowhere/bin/python3" in text and hosts.names[0] in text and took < 20
    assert processes_left(find=hosts.processes) == []


def _fake_mlx_python(hosts, version: str) -> str:
    """A python whose mlx is a fake of another version (or missing, for version None)."""
    root = hosts.dir / f"fake-mlx-{version}"
    dist = root / f"mlx-{version}.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: mlx\nVersion: {version}\n")
    script = hosts.dir / f"python-mlx-{version}"
    script.write_text(f'#!/bin/sh\nPYTHONPATH={root} exec {PY} "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_another_mlx_version_is_refused_with_each_hosts_versions(hosts):
    text, took = _start_fails(hosts, ring_hostfile(hosts), python=_fake_mlx_python(hosts, "0.1.0"))
    assert "mlx differs" in text and "0.1.0" in text and took < 20
    for name in hosts.names:
        assert name in text
    assert processes_left(find=hosts.processes) == []


def test_a_host_with_a_known_bad_mlx_is_refused_and_checked_naming_the_version_to_install(shell, hosts):
    python = _fake_mlx_python(hosts, "0.32.1")
    text, took = _start_fails(hosts, ring_hostfile(hosts), python=python)
    assert "mlx 0.32.1 is known bad" in text and "pip install -U 'mlx>=0.32.2'" in text and took < 20
    table = shell.run_line_magic(
        "mlx_cluster", f"check --hostfile {ring_hostfile(hosts)} --ssh '{' '.join(hosts.ssh_cmd)}' --python {python}"
    )
    bad = [row for row in table.rows if row[1] == "versions" and row[2] == "fail"]
    assert {row[0] for row in bad} == set(hosts.names) and "install 0.32.2 or later" in bad[0][3]
    assert processes_left(find=hosts.processes) == []


def test_missing_mlx_is_named(hosts):
    text, _ = _start_fails(hosts, ring_hostfile(hosts), python="/usr/bin/python3")
    assert "mlx is not installed" in text or "cannot run" in text
    assert processes_left(find=hosts.processes) == []


def test_a_python_path_with_a_space_works_in_check_and_start(shell, hosts):
    spaced = hosts.dir / "my env" / "python"
    spaced.parent.mkdir(exist_ok=True)
    # this Python as the tests run it (their PYTHONPATH too), at a path with a space
    pythonpath = shlex.quote(os.environ.get("PYTHONPATH", ""))
    spaced.write_text(f'#!/bin/sh\nPYTHONPATH={pythonpath} exec {PY} "$@"\n')
    spaced.chmod(spaced.stat().st_mode | stat.S_IEXEC)
    path = ring_hostfile(hosts)
    table = shell.run_line_magic(
        "mlx_cluster", f"check --hostfile {path} --ssh '{' '.join(hosts.ssh_cmd)}' --python '{spaced}'"
    )
    assert "every host is ready" in table.title, repr(table)
    with Cluster(hostfile=path, ssh_cmd=hosts.ssh_cmd, python=str(spaced), spares=False) as c:
        total = c.run("mx.distributed.all_sum(mx.array([rank + 1.0]), group=world)").value["text/plain"]
        assert total == "array([3], dtype=float32)"
    assert processes_left(find=hosts.processes) == []


def test_bad_hostfile_is_a_one_line_usage_error(shell, hosts):
    bad = hosts.dir / "bad.json"
    bad.write_text(json.dumps({"backend": "ring", "hosts": [{"ssh": "a", "ips": []}, {"ssh": "b"}]}))
    with pytest.raises(UsageError) as info:
        shell.run_line_magic("mlx_cluster", f"start --hostfile {bad}")
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="doesn't exist"):
        shell.run_line_magic("mlx_cluster", "start --hostfile /nonexistent/hosts.json")


# ------------------------------------------------------------------ tutorial
def test_multi_mac_tutorial_runs_on_local_addresses(execute_notebook):
    path = Path(__file__).resolve().parent.parent / "notebooks" / "03_multi_mac_cluster.ipynb"
    assert "MLX_NB_HOSTFILE" not in os.environ  # else the notebook uses that hostfile
    nb = execute_notebook(path)
    text = "\n".join(
        o.get("text", "") or o.get("data", {}).get("text/plain", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert "running against a hostfile of local addresses" in text
    assert "preflight: every host is ready" in text
    assert "rank 1 of 2 on" in text and "all_sum = 3" in text
    assert "Cluster stopped." in text


@pytest.mark.kernel
def test_a_killed_kernel_takes_its_ranks_on_the_other_hosts_with_it(hosts):
    import uuid

    from conftest import Kernel, project_processes

    mark = uuid.uuid4().hex
    k = Kernel(mark)
    try:
        path = ring_hostfile(hosts)
        out, err = k.run(f"%load_ext mlx_nb\n%mlx_cluster start --hostfile {path} --ssh '{' '.join(hosts.ssh_cmd)}'")
        assert "Cluster ready" in out, err
        k.run("%%mlx_dist\nimport subprocess\nsleeper = subprocess.Popen(['sleep', '1000'])")
        assert len(hosts.named("sleep")) == 2
        k.kill()
        assert processes_left(find=hosts.processes) == []  # within 10 s, over ssh
        processes_left(mark)
        assert project_processes(mark) == []
    finally:
        k.close()
