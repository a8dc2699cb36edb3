"""Hostfiles: parsing, validation and per-rank environments, checked against mlx.launch itself."""

from __future__ import annotations

import doctest
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_nb import hostfile as hf
from mlx_nb import rank_env
from mlx_nb.hostfile import HostfileError

MLX_LAUNCH = str(Path(sys.executable).parent / "mlx.launch")

# Run by each rank under mlx.launch: dump the launch environment (and the files it points
# to); with DUMP_INIT set, also join the ring and all_sum the ranks.
DUMP = """
import json, os, sys
env = {k: v for k, v in os.environ.items()
       if k.startswith(("MLX_", "NCCL_")) or k == "CUDA_VISIBLE_DEVICES"}
files = {k: open(env[k]).read() for k in ("MLX_HOSTFILE", "MLX_IBV_DEVICES") if k in env}
out = {"env": env, "files": files}
if os.environ.get("DUMP_INIT"):
    import mlx.core as mx
    g = mx.distributed.init(backend="ring", strict=True)
    out["sum"] = mx.distributed.all_sum(mx.array([g.rank() + 1.0])).item()
with open(os.path.join(sys.argv[1], f"rank{env['MLX_RANK']}.json"), "w") as f:
    json.dump(out, f)
"""

# Stand-in for ssh: mlx.launch runs every host but 127.0.0.1 through `ssh [opts] HOST CMD`;
# this one logs HOST and runs CMD here, so hostnames like mac1 launch locally.
FAKE_SSH = """#!/bin/sh
while [ $# -gt 1 ]; do
  case "$1" in -o) shift 2 ;; -*) shift ;; *) echo "$1" >> "$SSH_LOG"; shift; break ;; esac
done
exec bash -c "$1"
"""

JACCL = {
    "backend": "jaccl",
    "envs": ["MLX_METAL_FAST_SYNCH=1"],
    "hosts": [
        {"ssh": "mac1", "ips": ["192.168.1.11"], "rdma": [None, "rdma_en3", ["rdma_en4", "rdma_en5"]]},
        {"ssh": "mac2", "ips": ["192.168.1.12"], "rdma": ["rdma_en3", None, "rdma_en5"]},
        {"ssh": "mac3", "ips": [], "rdma": [["rdma_en4", "rdma_en2"], "rdma_en3", None]},
    ],
}
JACCL_RING = {
    "backend": "jaccl-ring",
    "hosts": [
        {
            "ssh": f"mac{i}",
            "ips": [f"10.0.0.{i}"],
            "rdma": [None if j not in ((i - 1) % 4, (i + 1) % 4) else f"rdma_en{j + 2}" for j in range(4)],
        }
        for i in range(4)
    ],
}


@pytest.fixture
def launch(tmp_path):
    """Run mlx.launch with ARGS and the dump script; return (per-rank dumps, ssh hosts, result)."""
    (tmp_path / "bin").mkdir()
    ssh = tmp_path / "bin" / "ssh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(0o755)
    script = tmp_path / "dump.py"
    script.write_text(DUMP)

    def run(*args: str, init: bool = False, hostfile: dict | None = None):
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        log = tmp_path / "ssh.log"
        log.write_text("")
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MLX_", "NCCL_")) and k not in ("CUDA_VISIBLE_DEVICES", "COLUMNS")
        }
        env |= {"PATH": f"{tmp_path / 'bin'}:{env['PATH']}", "SSH_LOG": str(log), "TMPDIR": str(tmp_path)}
        if init:
            env["DUMP_INIT"] = "1"
        if hostfile is not None:
            (tmp_path / "hosts.json").write_text(json.dumps(hostfile))
            args = ("--hostfile", str(tmp_path / "hosts.json"), *args)
        r = subprocess.run(
            [MLX_LAUNCH, *args, "--python", sys.executable, "--", str(script), str(out)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        dumps = {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}
        return dumps, sorted(log.read_text().split()), r

    return run


def as_dumped(launches: list[rank_env.RankLaunch]) -> dict[int, dict]:
    """What the dump script would see for each RankLaunch (files as mlx.launch writes them)."""
    return {
        l.rank: {
            "env": {k: v for k, v in l.env.items() if k.startswith(("MLX_", "NCCL_")) or k == "CUDA_VISIBLE_DEVICES"},
            "files": {k: c + "\n" for k, c in l.files.items()},
        }
        for l in launches
    }


def normalised(dumps: dict[int, dict]) -> dict[int, dict]:
    """Dumps without the temp-file paths (their content is compared instead)."""
    return {
        r: {"env": {k: v for k, v in d["env"].items() if k not in d["files"]}, "files": d["files"]}
        for r, d in dumps.items()
    }


def free_run(n: int) -> int:
    """A port p with p .. p+n-1 all free now: mlx.launch counts ring ports up from one."""
    for p in rank_env.free_ports(20):
        socks = [socket.socket() for _ in range(n)]
        try:
            for i, sock in enumerate(socks):
                sock.bind(("127.0.0.1", p + i))
            return p
        except OSError:
            pass
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def write(tmp_path: Path, data) -> Path:
    p = tmp_path / "hosts.json"
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


# ------------------------------------------------------------ the oracle
def test_ring_env_from_hosts_matches_mlx_launch_and_connects(launch):
    port = free_run(3)
    dumps, ssh, r = launch(
        "--hosts",
        "127.0.0.1",
        "-n",
        "3",
        "-p",
        str(port),
        "--env",
        "MLX_TEST_X=a b",
        "--env",
        "MLX_TEST_EMPTY",
        init=True,
    )
    assert r.returncode == 0, r.stderr
    ours = rank_env.rank_launch(
        hf.from_hosts("127.0.0.1", 3),
        "ring",
        starting_port=port,
        env=["MLX_TEST_X=a b", "MLX_TEST_EMPTY"],
    )
    assert ssh == []  # 127.0.0.1 runs without ssh
    assert [d.pop("sum") for d in dumps.values()] == [6.0] * 3
    assert normalised(dumps) == as_dumped(ours)
    assert ours[1].files["MLX_HOSTFILE"] == json.dumps([[f"127.0.0.1:{port + i}"] for i in range(3)])


def test_ring_hostfile_with_connections_and_envs_matches_mlx_launch(launch):
    hosts = {
        "backend": "ring",
        "envs": ["MLX_TEST_ENV=1", "MLX_TEST_OVER=hostfile"],
        "hosts": [
            {"ssh": "mac1", "ips": ["10.0.0.1", "10.0.1.1"]},
            {"ssh": "mac2", "ips": ["10.0.0.2", "10.0.1.2"]},
        ],
    }
    dumps, ssh, r = launch("--connections-per-ip", "2", "--env", "MLX_TEST_OVER=cli", hostfile=hosts)
    assert r.returncode == 0, r.stderr
    ours = rank_env.rank_launch(hf.loads(json.dumps(hosts)), connections_per_ip=2, env={"MLX_TEST_OVER": "cli"})
    assert ssh == ["mac1", "mac2"] == [l.host for l in ours]
    assert normalised(dumps) == as_dumped(ours)
    assert ours[0].env["MLX_TEST_OVER"] == "cli"
    assert json.loads(ours[0].files["MLX_HOSTFILE"])[1] == [
        "10.0.0.2:32327",
        "10.0.0.2:32328",
        "10.0.1.2:32329",
        "10.0.1.2:32330",
    ]


def test_single_rank_ring_gets_an_empty_hostfile_like_mlx_launch(launch):
    dumps, _, r = launch()
    assert r.returncode == 0, r.stderr
    ours = rank_env.rank_launch(hf.from_hosts("127.0.0.1"), "ring")
    assert normalised(dumps) == as_dumped(ours) == {0: {"env": {"MLX_RANK": "0"}, "files": {"MLX_HOSTFILE": "\n"}}}


@pytest.mark.parametrize("hosts", [JACCL, JACCL_RING], ids=["jaccl", "jaccl-ring"])
def test_jaccl_env_matches_mlx_launch(launch, hosts):
    dumps, ssh, r = launch("-p", "40404", hostfile=hosts)
    assert r.returncode == 0, r.stderr
    ours = rank_env.rank_launch(hf.loads(json.dumps(hosts)), starting_port=40404)
    assert ssh == sorted(h["ssh"] for h in hosts["hosts"])
    assert normalised(dumps) == as_dumped(ours)
    assert ours[2].env["MLX_JACCL_COORDINATOR"] == f"{hosts['hosts'][0]['ips'][0]}:40404"
    assert ("MLX_JACCL_RING" in ours[0].env) == (hosts["backend"] == "jaccl-ring")


def test_nccl_env_with_repeated_hosts_matches_mlx_launch(launch):
    hosts = [{"ssh": "gpu1", "ips": ["10.1.0.1"]}] * 2 + [{"ssh": "gpu2"}] * 2
    dumps, ssh, r = launch("--backend", "nccl", "-n", "2", "--nccl-port", "23456", hostfile=hosts)
    assert r.returncode == 0, r.stderr
    ours = rank_env.rank_launch(hf.loads(json.dumps(hosts)), "nccl", repeat_hosts=2, nccl_port=23456)
    assert normalised(dumps) == as_dumped(ours)
    assert [l.env["CUDA_VISIBLE_DEVICES"] for l in ours] == ["0", "1", "0", "1"]
    assert ours[3].env | {"MLX_RANK": "0", "CUDA_VISIBLE_DEVICES": "0"} == {
        "MLX_RANK": "0",
        "NCCL_HOST_IP": "10.1.0.1",
        "NCCL_PORT": "23456",
        "MLX_WORLD_SIZE": "4",
        "CUDA_VISIBLE_DEVICES": "0",
    }


def test_docstring_examples_run():
    assert doctest.testmod(hf).failed == 0
    assert doctest.testmod(rank_env).failed == 0


def test_defaults_match_mlx_launch_argparse():
    import mlx._distributed_utils.launch as ml

    text = Path(ml.__file__).read_text()
    assert f"default={hf.STARTING_PORT}," in text and f"default={hf.NCCL_PORT}," in text
    ring = rank_env.rank_launch(hf.from_hosts("127.0.0.1", 2), "ring")
    assert ring[0].files["MLX_HOSTFILE"] == '[["127.0.0.1:32323"], ["127.0.0.1:32324"]]'


# ------------------------------------------- same verdict as mlx.launch
BAD = {
    "ring without ips": (
        {"backend": "ring", "hosts": [{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2"}]},
        ["mac2", '"ips"'],
    ),
    "jaccl rank 0 without ip": (
        {"backend": "jaccl", "hosts": [{"ssh": "mac1", "rdma": [None]}]},
        ["mac1", '"ips"'],
    ),
    "nccl rank 0 without ip": ({"backend": "nccl", "hosts": [{"ssh": "gpu1"}]}, ["gpu1", '"ips"']),
    "rdma length": (
        {
            "backend": "jaccl",
            "hosts": [
                {"ssh": "mac1", "ips": ["10.0.0.1"], "rdma": [None, "rdma_en3"]},
                {"ssh": "mac2", "rdma": ["rdma_en3"]},
            ],
        },
        ["mac2", '"rdma"'],
    ),
    "rdma self": (
        {
            "backend": "jaccl",
            "hosts": [
                {"ssh": "mac1", "ips": ["10.0.0.1"], "rdma": [None, "rdma_en3"]},
                {"ssh": "mac2", "rdma": ["rdma_en3", "rdma_en4"]},
            ],
        },
        ["mac2", '"rdma"[1]'],
    ),
    "rdma missing pairs": (
        {
            "backend": "jaccl",
            "hosts": [
                {
                    "ssh": f"mac{i}",
                    "ips": ["10.0.0.1"],
                    "rdma": [None if i == j or j == 3 or i == 3 else f"rdma_en{j}" for j in range(4)],
                }
                for i in range(4)
            ],
        },
        ["mac0", '"rdma"[3]'],
    ),
    "jaccl-ring missing neighbour": (
        {
            "backend": "jaccl-ring",
            "hosts": [
                {"ssh": "mac0", "ips": ["10.0.0.1"], "rdma": [None, "rdma_en1", None]},
                {"ssh": "mac1", "rdma": ["rdma_en0", None, "rdma_en2"]},
                {"ssh": "mac2", "rdma": ["rdma_en0", "rdma_en1", None]},
            ],
        },
        ["mac0", '"rdma"[2]'],
    ),
    "unknown backend": (
        {"backend": "jacl", "hosts": [{"ssh": "mac1", "ips": ["10.0.0.1"]}]},
        ['"backend"', "'jaccl'"],
    ),
    "missing ssh": ([{"ips": ["10.0.0.1"]}, {"ip": ["10.0.0.2"]}], ['"ssh"', "entry 0"]),
    "malformed json": ('[\n  {"ssh": "mac1", "ips": ["10.0.0.1"]},\n]\n', ["line 3, column 1"]),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_rejected_like_mlx_launch_naming_host_and_field(tmp_path, case):
    hosts, named = BAD[case]
    path = write(tmp_path, hosts)
    r = subprocess.run([MLX_LAUNCH, "--hostfile", str(path), "--", "true"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    theirs = r.stderr.strip().splitlines()[-1].split("error: ", 1)[1]
    with pytest.raises(HostfileError) as e:
        hf.validate(hf.load(path))
    ours = str(e.value)
    reason = theirs.split(" (")[0] if theirs.startswith("Failed to parse") else theirs
    assert ours.startswith(reason), (ours, theirs)
    for word in named:
        assert word in ours
    assert "\n" not in ours


def test_missing_file_and_empty_host_name_rejected_like_mlx_launch(tmp_path):
    for args, call in (
        (["--hostfile", str(tmp_path / "nope.json")], lambda: hf.load(tmp_path / "nope.json")),
        (["--hosts", "a,,b"], lambda: hf.from_hosts("a,,b")),
    ):
        r = subprocess.run([MLX_LAUNCH, *args, "--", "true"], capture_output=True, text=True, timeout=60)
        theirs = r.stderr.strip().splitlines()[-1].split("error: ", 1)[1]
        with pytest.raises(HostfileError, match="^" + theirs.replace(".", r"\.")):
            call()


@pytest.mark.parametrize("option", ["-oProxyCommand=touch {marker}", "-V"])
def test_a_host_name_beginning_with_a_dash_is_refused_and_never_an_ssh_option(tmp_path, option):
    from mlx_nb import Cluster
    from mlx_nb.engines.launch import ssh_run

    marker = tmp_path / "ran-locally"
    name = option.format(marker=marker)
    data = json.dumps([{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": name, "ips": ["10.0.0.2"]}])
    with pytest.raises(HostfileError) as info:
        hf.loads(data)
    reason = "Hostname cannot begin with '-' (ssh would read it as an option)"
    assert f'"ssh" of host entry 1 is {name!r}: {reason}' in str(info.value)
    with pytest.raises(HostfileError, match="^Hostname cannot begin with '-'"):
        hf.from_hosts(f"10.0.0.1,{name}")
    with pytest.raises(ValueError, match="^Hostname cannot begin with '-'"):
        Cluster(hosts=name)
    with pytest.raises(HostfileError, match="Hostname cannot contain whitespace"):
        hf.loads(json.dumps([{"ssh": "mac 1"}]))
    # where mlx_nb runs ssh itself, "--" keeps such a name a destination
    rc, out = ssh_run(name, "true", ["ssh"], timeout=20)
    assert rc == 255 and not marker.exists(), out


def test_accepted_like_mlx_launch(launch):
    """A file mlx.launch runs is accepted here too: distributed_config's output, with extra keys."""
    hosts = json.loads(json.dumps(JACCL_RING))
    hosts["hosts"][0]["comment"] = "head node"
    _, _, r = launch(hostfile=hosts)
    assert r.returncode == 0, r.stderr
    assert hf.validate(hf.loads(json.dumps(hosts))) == "jaccl-ring"


# ------------------------------------------------- what mlx.launch misses
def reject(data, backend=None, **kw) -> str:
    with pytest.raises(HostfileError) as e:
        hf.validate(hf.loads(data if isinstance(data, str) else json.dumps(data), "hosts.json"), backend, **kw)
    return str(e.value)


def test_malformed_json_names_line_and_column():
    msg = reject('{"hosts": [\n  {"ssh": "mac1" "ips": []}\n]}')
    assert "hosts.json" in msg and "line 2, column 18" in msg


def test_empty_host_list_rejected():
    assert "no hosts" in reject([])
    assert "no hosts" in reject({"backend": "ring", "hosts": []})


@pytest.mark.parametrize(
    "data, words",
    [
        ([{"ssh": 42}], ['"ssh"', "entry 0", "42"]),
        (["mac1", "mac2"], ["entry 0", "'mac1'", '{"ssh": "mac1"}']),
        ([{"ssh": "mac1", "ips": "10.0.0.1"}], ["'mac1'", '"ips"', "list"]),
        ([{"ssh": "mac1", "ips": [10]}], ["'mac1'", '"ips"']),
        ([{"ssh": "mac1", "rdma": [None, 3]}], ["'mac1'", '"rdma"']),
        ({"envs": [1], "hosts": [{"ssh": "mac1"}]}, ['"envs"', "1"]),
        ({"envs": ["BAD-NAME=1"], "hosts": [{"ssh": "mac1"}]}, ['"envs"', "BAD-NAME"]),
        ({"backend": 3, "hosts": [{"ssh": "mac1"}]}, ['"backend"', "3"]),
        ([{"ssh": "mac1", "ip": ["10.0.0.1"]}], ['"ip"', '"ips"', "entry 0"]),
        ({"host": [{"ssh": "mac1"}]}, ['"host"', '"hosts"']),
    ],
    ids=[
        "ssh int",
        "host as string",
        "ips string",
        "ip int",
        "rdma int",
        "env int",
        "env name",
        "backend int",
        "ips typo",
        "hosts typo",
    ],
)
def test_non_string_and_misspelt_entries_rejected(data, words):
    msg = reject(data)
    for w in words:
        assert w in msg, msg


def test_ring_ip_on_two_machines_rejected():
    msg = reject([{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2", "ips": ["10.0.0.1"]}], "ring")
    assert "'mac1'" in msg and "'mac2'" in msg and "10.0.0.1" in msg and '"ips"' in msg
    hf.validate(
        hf.loads('[{"ssh": "localhost", "ips": ["127.0.0.1"]}, {"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]'),
        "ring",
    )


def test_jaccl_same_mac_twice_rejected():
    hosts = json.loads(json.dumps(JACCL))
    hosts["hosts"][2]["ssh"] = "mac1"
    msg = reject(hosts)
    assert "'mac1'" in msg and "rank 0 and rank 2" in msg


def test_jaccl_device_for_two_peers_rejected():
    hosts = json.loads(json.dumps(JACCL))
    hosts["hosts"][1]["rdma"] = ["rdma_en3", None, "rdma_en3"]
    msg = reject(hosts)
    assert "'mac2'" in msg and "rdma_en3" in msg and '"rdma"' in msg


def test_jaccl_cable_count_mismatch_rejected():
    hosts = json.loads(json.dumps(JACCL))
    hosts["hosts"][2]["rdma"][0] = "rdma_en4"
    msg = reject(hosts)
    assert "'mac1'" in msg and '"rdma"[2]' in msg and "'mac3'" in msg


def test_nccl_ranks_sharing_a_gpu_rejected():
    hosts = [{"ssh": "gpu1", "ips": ["10.1.0.1"]}] * 2
    msg = reject(hosts, "nccl")
    assert "'gpu1'" in msg and "repeat_hosts=2" in msg
    hf.validate(hf.loads(json.dumps(hosts)), "nccl", repeat_hosts=2)


def test_from_hosts_mirrors_mlx_launch_hosts_and_n():
    h = hf.from_hosts("10.0.0.1, mac2", 2)
    assert [(x.rank, x.ssh_hostname, x.ips) for x in h.hosts] == [
        (0, "10.0.0.1", ["10.0.0.1"]),
        (1, "10.0.0.1", ["10.0.0.1"]),
        (2, "mac2", []),
        (3, "mac2", []),
    ]
    with pytest.raises(HostfileError, match="positive"):
        hf.from_hosts("mac1", 0)
    assert "'mac2' (rank 2)" in reject(json.dumps(h.to_json()), "ring")


# ------------------------------------------------------------ launches
def test_ring_launch_puts_each_port_in_the_hostfile():
    ls = rank_env.rank_launch(hf.local(2), "ring", ports=[5001, 5002], env={"A": "1"})
    assert [(l.rank, l.host, l.env) for l in ls] == [
        (0, "localhost", {"A": "1", "MLX_RANK": "0"}),
        (1, "localhost", {"A": "1", "MLX_RANK": "1"}),
    ]
    assert ls[0].files == {"MLX_HOSTFILE": '[["127.0.0.1:5001"], ["127.0.0.1:5002"]]'}
    with pytest.raises(HostfileError, match="needs 2"):
        rank_env.rank_launch(hf.local(2), "ring", ports=[5001])


def test_launch_vars_override_user_env_as_mlx_launch_does():
    ls = rank_env.rank_launch(
        hf.loads(json.dumps(JACCL)), env={"MLX_RANK": "9", "MLX_IBV_DEVICES": "x", "MLX_TEST": "1"}
    )
    assert ls[1].env["MLX_RANK"] == "1" and "MLX_IBV_DEVICES" not in ls[1].env
    assert ls[1].env["MLX_METAL_FAST_SYNCH"] == "1" and ls[1].env["MLX_TEST"] == "1"
    assert json.loads(ls[0].files["MLX_IBV_DEVICES"]) == [h["rdma"] for h in JACCL["hosts"]]


def test_mpi_ranks_follow_mpirun_slots():
    h = hf.loads(json.dumps({"envs": ["MLX_TEST=1"], "hosts": [{"ssh": "a"}, {"ssh": "b"}, {"ssh": "a"}]}))
    assert rank_env.mpirun_hostfile(h) == "a slots=2\nb slots=1\n"
    assert "ranks as mpirun numbers them: 0 a, 1 a, 2 b" in rank_env.describe(h, "mpi")
    ls = rank_env.rank_launch(h, "mpi")
    assert [(l.rank, l.host) for l in ls] == [(0, "a"), (1, "a"), (2, "b")]
    assert all(l.env == {"MLX_TEST": "1"} and not l.files for l in ls)


# -------------------------------------------------------------- describe
def test_describe_shows_ranks_ring_order_and_links():
    ring = rank_env.describe(hf.from_hosts("127.0.0.1", 2), "ring")
    assert ring.splitlines()[0] == "2 ranks on 1 host, backend ring"
    assert "ring order: 127.0.0.1 (127.0.0.1:32323) -> 127.0.0.1 (127.0.0.1:32324) -> 127.0.0.1" in ring
    jaccl = rank_env.describe(hf.loads(json.dumps(JACCL)))
    assert "backend jaccl (from the hostfile)" in jaccl
    assert "mac1 rdma_en4,rdma_en5 <-> rdma_en4,rdma_en2 mac3" in jaccl
    assert "coordinator: 192.168.1.11:32323" in jaccl and "envs: MLX_METAL_FAST_SYNCH=1" in jaccl
    jring = rank_env.describe(hf.loads(json.dumps(JACCL_RING)))
    assert (
        "ring order: mac0 -> mac1 -> mac2 -> mac3 -> mac0" in jring and "mac0 rdma_en3 <-> rdma_en2 mac2" not in jring
    )
    nccl = rank_env.describe(hf.loads('[{"ssh": "gpu1", "ips": ["10.1.0.1"]}, {"ssh": "gpu2"}]'), "nccl")
    assert "rank 1 CUDA_VISIBLE_DEVICES=0" in nccl


def test_hostfile_check_command_prints_description_or_error(tmp_path, capsys):
    from mlx_nb.cli import main

    assert main(["hostfile", "check", str(write(tmp_path, JACCL))]) == 0
    out = capsys.readouterr().out
    assert "3 ranks on 3 hosts" in out and "warning: " in out and "MLX_METAL_FAST_SYNCH" in out
    assert main(["hostfile", "check", str(write(tmp_path, JACCL)), "--backend", "ring"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The ring backend requires IPs") and "'mac3'" in err
