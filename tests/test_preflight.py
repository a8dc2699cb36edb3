"""Preflight: findings from recorded command output, and the gather command run for real."""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_nb import hostfile as hf
from mlx_nb import preflight as pf

# Recorded on a Mac Studio (macOS 26.2) cabled to two others over Thunderbolt 5.
IBV_DEVICES = """\
    device          	   node GUID
    ------          	----------------
    rdma_en2        	8096a9d9edbaac05
    rdma_en3        	8196a9d9edbaac05
    rdma_en5        	8396a9d9edbaac05
"""
IBV_DEVICES_NONE = """\
    device          	   node GUID
    ------          	----------------
"""
SW_VERS = """\
ProductName:		macOS
ProductVersion:		26.2
BuildVersion:		25C56
"""
SW_VERS_OLD = SW_VERS.replace("26.2", "15.6.1").replace("25C56", "24G90")
IFCONFIG_MAC = """\
lo0: flags=8049<UP,LOOPBACK,RUNNING,MULTICAST> mtu 16384
	options=1203<RXCSUM,TXCSUM,TXSTATUS,SW_TIMESTAMP>
	inet 127.0.0.1 netmask 0xff000000
	inet6 ::1 prefixlen 128
	inet6 fe80::1%lo0 prefixlen 64 scopeid 0x1
	nd6 options=201<PERFORMNUD,DAD>
en0: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500
	options=50b<RXCSUM,TXCSUM,VLAN_HWTAGGING,AV,CHANNEL_IO>
	ether 5c:1b:f4:8a:21:0e
	inet6 fe80::10c2:6b1f:a3e4:5d21%en0 prefixlen 64 secured scopeid 0xb
	inet 192.168.1.11 netmask 0xffffff00 broadcast 192.168.1.255
	nd6 options=201<PERFORMNUD,DAD>
	media: autoselect (10Gbase-T <full-duplex>)
	status: active
en2: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500
	options=460<TSO4,TSO6,CHANNEL_IO>
	ether 36:9a:d1:c0:4d:00
	inet 192.168.0.1 netmask 0xfffffffc broadcast 192.168.0.3
	media: autoselect <full-duplex>
	status: active
en3: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500
	options=460<TSO4,TSO6,CHANNEL_IO>
	ether 36:9a:d1:c0:4d:04
	inet 192.168.0.5 netmask 0xfffffffc broadcast 192.168.0.7
	media: autoselect <full-duplex>
	status: active
en5: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500
	options=460<TSO4,TSO6,CHANNEL_IO>
	ether 36:9a:d1:c0:4d:0c
	media: autoselect <full-duplex>
	status: active
bridge0: flags=8822<BROADCAST,SMART,SIMPLEX,MULTICAST> mtu 1500
	options=63<RXCSUM,TXCSUM,TSO4,TSO6>
	ether 36:9a:d1:c0:4d:00
	Configuration:
		id 0:0:0:0:0:0 priority 0 hellotime 0 fwddelay 0
		maxage 0 holdcnt 0 proto stp maxaddr 100 timeout 1200
		root id 0:0:0:0:0:0 priority 0 ifcost 0 port 0
		ipfilter disabled flags 0x0
	member: en2 flags=3<LEARNING,DISCOVER>
	        ifmaxaddr 0 port 10 priority 0 path cost 0
	member: en3 flags=3<LEARNING,DISCOVER>
	        ifmaxaddr 0 port 11 priority 0 path cost 0
	nd6 options=201<PERFORMNUD,DAD>
	media: <unknown type>
	status: inactive
"""
BRIDGE_UP = IFCONFIG_MAC.replace("bridge0: flags=8822<BROADCAST", "bridge0: flags=8863<UP,BROADCAST").replace(
    "status: inactive", "status: active"
)
IFCONFIG_LINUX = """\
eth0: flags=4163<UP,BROADCAST,RUNNING,MULTICAST>  mtu 1500
        inet 10.1.0.1  netmask 255.255.0.0  broadcast 10.1.255.255
        ether 02:42:ac:11:00:02  txqueuelen 0  (Ethernet)

lo: flags=73<UP,LOOPBACK,RUNNING>  mtu 65536
        inet 127.0.0.1  netmask 255.0.0.0
        loop  txqueuelen 1000  (Local Loopback)
"""
IP_ADDR = """\
1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN group default qlen 1000
    inet 127.0.0.1/8 scope host lo
       valid_lft forever preferred_lft forever
2: eth0@if7: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP group default  link-netnsid 0
    inet 10.1.0.1/16 brd 10.1.255.255 scope global eth0
       valid_lft forever preferred_lft forever
"""
VERSIONS = """\
python 3.12.8
executable /Users/me/mlx/.venv/bin/python
mlx 0.32.4
mlx_nb 0.1.0
"""

# mac1 of a 3-Mac mesh: needs rdma_en2 (to mac2) and rdma_en5 (to mac3)
MESH = hf.loads(
    json.dumps(
        {
            "backend": "jaccl",
            "hosts": [
                {"ssh": "mac1", "ips": ["192.168.1.11"], "rdma": [None, "rdma_en2", "rdma_en3"]},
                {"ssh": "mac2", "ips": ["192.168.1.12"], "rdma": ["rdma_en2", None, "rdma_en3"]},
                {"ssh": "mac3", "ips": ["192.168.1.13"], "rdma": ["rdma_en3", "rdma_en2", None]},
            ],
        }
    )
)


def gathered(**sections: str | tuple[str, int]) -> str:
    """Text in the form gather_command prints: NAME=output or NAME=(output, status)."""
    out = []
    for name, s in sections.items():
        text, rc = s if isinstance(s, tuple) else (s, 0)
        out.append(f"{pf.MARK} {name}\n{text}\n{pf.MARK} rc={rc}")
    return "\n".join(out) + "\n"


# what mlx_nb/rank/blas.py prints: on a Mac, on Linux with Debian's OpenBLAS and without one
BLAS_MAC = json.dumps(
    {
        "system": "Darwin",
        "cores": 24,
        "MLX_NB_BLAS": "",
        "name": "Accelerate (macOS)",
        "path": "",
        "threads": 0,
        "optimized": True,
        "note": "",
    }
)
BLAS_OPENBLAS = json.dumps(
    {
        "system": "Linux",
        "cores": 16,
        "MLX_NB_BLAS": "",
        "name": "OpenBLAS 0.3.21 (Haswell)",
        "path": "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r0.3.21.so",
        "threads": 0,
        "optimized": True,
        "note": "",
    }
)
BLAS_NONE = json.dumps(
    {
        "system": "Linux",
        "cores": 16,
        "MLX_NB_BLAS": "",
        "name": "reference BLAS (bundled with mlx)",
        "path": "",
        "threads": 0,
        "optimized": False,
        "note": "no OpenBLAS found: apt-get install libopenblas0-pthread",
    }
)

MAC = dict(
    uname="Darwin arm64",
    sw_vers=SW_VERS,
    ibv_devices=IBV_DEVICES,
    interfaces=IFCONFIG_MAC,
    versions=VERSIONS,
    blas=BLAS_MAC,
)


def by_check(findings: list[pf.Finding]) -> dict[str, pf.Finding]:
    return {f.check: f for f in findings}


# ------------------------------------------------------------- parsers
def test_parse_ibv_devices_lists_devices_under_the_header():
    assert pf.parse_ibv_devices(IBV_DEVICES) == ["rdma_en2", "rdma_en3", "rdma_en5"]
    assert pf.parse_ibv_devices(IBV_DEVICES_NONE) == []


def test_parse_interfaces_reads_macos_ifconfig():
    ifs = pf.parse_interfaces(IFCONFIG_MAC)
    assert list(ifs) == ["lo0", "en0", "en2", "en3", "en5", "bridge0"]
    assert ifs["en0"].ipv4 == ["192.168.1.11"] and ifs["en0"].up
    assert ifs["en5"].ipv4 == [] and ifs["en2"].ipv4 == ["192.168.0.1"]
    assert ifs["bridge0"].members == ["en2", "en3"] and not ifs["bridge0"].up
    assert pf.parse_interfaces(BRIDGE_UP)["bridge0"].up


@pytest.mark.parametrize("text", [IFCONFIG_LINUX, IP_ADDR], ids=["ifconfig", "ip addr"])
def test_parse_interfaces_reads_linux_output(text):
    ifs = pf.parse_interfaces(text)
    assert {n: (i.ipv4, i.up) for n, i in ifs.items()} == {
        "eth0": (["10.1.0.1"], True),
        "lo": (["127.0.0.1"], True),
    }


def test_parse_sw_vers_and_versions():
    assert pf.parse_sw_vers(SW_VERS) == {
        "ProductName": "macOS",
        "ProductVersion": "26.2",
        "BuildVersion": "25C56",
    }
    assert pf.parse_versions(VERSIONS)["executable"] == "/Users/me/mlx/.venv/bin/python"
    assert pf.rdma_interface("rdma_en5") == "en5"


# ----------------------------------------------------------- host checks
def test_healthy_mac_passes_every_check():
    f = by_check(pf.check_host(MESH, "mac1", gathered(**MAC)))
    assert {k: v.status for k, v in f.items()} == {
        "macos": "ok",
        "rdma": "ok",
        "interfaces": "ok",
        "versions": "ok",
        "blas": "ok",
    }
    assert "macOS 26.2 (25C56)" in f["macos"].message and "mlx 0.32.4" in f["versions"].message
    assert f["blas"].message == "Accelerate (macOS)"


def test_linux_blas_check_names_the_library_and_threads_per_rank_or_how_to_install_one():
    four = hf.from_hosts("box", 4)
    f = by_check(pf.check_host(four, "box", gathered(uname="Linux x86_64", blas=BLAS_OPENBLAS)))
    assert str(f["blas"]) == (
        "[ok] box blas: OpenBLAS 0.3.21 (Haswell) (/usr/lib/x86_64-linux-gnu/openblas-pthread/"
        "libopenblasp-r0.3.21.so): 4 threads per rank (16 cores, 4 ranks on this host)"
    )
    f = by_check(pf.check_host(four, "box", gathered(uname="Linux x86_64", blas=BLAS_NONE)))
    assert f["blas"].status == "warn"
    assert f["blas"].message.endswith("slower): no OpenBLAS found: apt-get install libopenblas0-pthread")
    f = by_check(
        pf.check_host(four, "box", gathered(uname="Linux x86_64", blas=("mlx_nb is not installed for /x/python", 1)))
    )
    assert (
        str(f["blas"])
        == "[skip] box blas: cannot tell which BLAS the ranks will run: mlx_nb is not installed for /x/python"
    )


# a one-GPU CUDA host as the H200 machine gathered it: nvidia-smi's query, mlx with mlx-cuda-13
NVIDIA_SMI = "0, NVIDIA H200, 143771, GPU-5c3b9a0e-1d2f-4e6a-8b7c-0d1e2f3a4b5c, 00000000:00:05.0"
VERSIONS_CUDA = VERSIONS + "mlx_backend mlx-cuda-13 0.32.4\n"
CUDA_HOST = dict(uname="Linux x86_64", versions=VERSIONS_CUDA, blas=BLAS_NONE, gpus=NVIDIA_SMI, cuda_visible=("", 1))


def test_gpu_check_says_which_gpu_each_rank_gets():
    two = hf.from_hosts("gpu1", 2)
    f = by_check(pf.check_host(two, "gpu1", gathered(**CUDA_HOST), "ring"))
    assert str(f["gpu"]) == (
        "[ok] gpu1 gpu: ranks 0, 1 on GPU 0 NVIDIA H200 (140 GiB), shared by 2 ranks (mlx-cuda-13 0.32.4)"
    )
    # the reference BLAS serves only CPU work there: no warning
    assert f["blas"].status == "ok" and f["blas"].message.startswith("matmuls run on the GPU (cuBLAS)")
    # what the launch sets per rank wins over the host's own CUDA_VISIBLE_DEVICES
    nccl = {0: {"CUDA_VISIBLE_DEVICES": "0"}, 1: {"CUDA_VISIBLE_DEVICES": "1"}}
    f = by_check(pf.check_host(two, "gpu1", gathered(**CUDA_HOST | {"cuda_visible": "0"}), "nccl", nccl))
    assert f["gpu"].status == "fail"
    assert f["gpu"].message == (
        "rank 1: CUDA_VISIBLE_DEVICES=1 but the host has GPU 0 only; rank 0 on GPU 0 NVIDIA H200 (140 GiB): "
        "NCCL needs one GPU per rank"
    )
    two_gpus = NVIDIA_SMI + "\n" + NVIDIA_SMI.replace("0, ", "1, ", 1).replace("GPU-5c", "GPU-7d")
    f = by_check(pf.check_host(two, "gpu1", gathered(**CUDA_HOST | {"gpus": two_gpus}), "nccl", nccl))
    assert str(f["gpu"]) == (
        "[ok] gpu1 gpu: rank 0 on GPU 0 NVIDIA H200 (140 GiB); rank 1 on GPU 1 NVIDIA H200 (140 GiB) "
        "(mlx-cuda-13 0.32.4)"
    )


def test_gpu_check_names_a_cpu_only_mlx_on_a_gpu_host_and_says_nothing_elsewhere():
    one = hf.from_hosts("gpu1", 1)
    cpu = CUDA_HOST | {"versions": VERSIONS + "mlx_backend mlx-cpu 0.32.4\n"}
    f = by_check(pf.check_host(one, "gpu1", gathered(**cpu)))
    assert (
        f["gpu"].status == "warn" and "no CUDA backend (mlx-cpu 0.32.4): the ranks run on the CPU" in f["gpu"].message
    )
    assert f["blas"].status == "warn"  # a CPU rank does run the reference BLAS
    no_smi = CUDA_HOST | {"gpus": ("sh: 1: nvidia-smi: not found", 127)}
    f = by_check(pf.check_host(one, "gpu1", gathered(**no_smi)))
    assert f["gpu"].status == "warn" and "nvidia-smi is not installed" in f["gpu"].message
    f = by_check(pf.check_host(one, "gpu1", gathered(**cpu | {"gpus": ("sh: 1: nvidia-smi: not found", 127)})))
    assert "gpu" not in f


def test_missing_rdma_device_and_interface_without_ip_fail():
    hosts = json.loads(json.dumps(MESH.to_json()))
    hosts["hosts"][0]["rdma"] = [None, "rdma_en4", "rdma_en5"]
    f = by_check(pf.check_host(hf.loads(json.dumps(hosts)), "mac1", gathered(**MAC)))
    assert f["rdma"].status == "fail"
    assert f["rdma"].message.startswith(
        'rdma_en4 from "rdma" of rank 0 not present; ibv_devices lists rdma_en2, rdma_en3, rdma_en5'
    )
    assert f["interfaces"].status == "fail"
    assert "interface en4 (of rdma_en4) does not exist" in f["interfaces"].message
    assert "interface en5 (of rdma_en5) has no IPv4 address" in f["interfaces"].message


def test_rdma_not_enabled_says_how_to_enable_it():
    f = by_check(pf.check_host(MESH, "mac1", gathered(**MAC | {"ibv_devices": IBV_DEVICES_NONE})))
    assert f["rdma"].status == "fail" and "rdma_ctl enable" in f["rdma"].message


def test_jaccl_on_old_macos_fails():
    f = by_check(pf.check_host(MESH, "mac1", gathered(**MAC | {"sw_vers": SW_VERS_OLD})))
    assert f["macos"].status == "fail" and "macOS 15.6.1" in f["macos"].message and "26.2" in f["macos"].message


def test_ip_not_on_the_host_fails_naming_ips():
    ring = hf.loads('[{"ssh": "mac1", "ips": ["192.168.1.99", "mac1.local"]}, {"ssh": "mac2", "ips": ["mac2.local"]}]')
    f = by_check(pf.check_host(ring, "mac1", gathered(**MAC)))
    assert "rdma" not in f  # a ring hostfile names no RDMA device
    assert f["interfaces"].status == "fail"
    assert f["interfaces"].message.startswith('IP 192.168.1.99 from "ips" of rank 0 is on no interface')
    assert "mac1.local" not in f["interfaces"].message  # MLX's ring resolves names: nothing to look for


def test_active_thunderbolt_bridge_warns():
    f = by_check(pf.check_host(MESH, "mac1", gathered(**MAC | {"interfaces": BRIDGE_UP})))
    assert f["interfaces"].status == "warn" and "bridge0 down" in f["interfaces"].message


def test_checks_that_cannot_run_say_so():
    out = gathered(
        uname="Linux x86_64",
        sw_vers=("sh: 1: sw_vers: not found", 127),
        ibv_devices=("sh: 1: ibv_devices: not found", 127),
        interfaces=("", 127),
        versions=("sh: 1: python3: not found", 127),
    )
    f = by_check(pf.check_host(MESH, "mac1", out))
    assert f["rdma"].status == "skip" and f["rdma"].message == "cannot check RDMA on this host: ibv_devices not found"
    assert f["macos"].message == "cannot check the macOS version on this host (Linux x86_64): sw_vers not found"
    assert f["interfaces"].status == "skip" and "neither ifconfig nor ip" in f["interfaces"].message
    assert f["versions"].status == "fail" and "python3: not found" in f["versions"].message


def test_mlx_missing_for_the_engine_python_fails():
    f = by_check(pf.check_host(MESH, "mac1", gathered(**MAC | {"versions": VERSIONS.replace("mlx 0.32.4", "mlx -")})))
    assert f["versions"].status == "fail" and "/Users/me/mlx/.venv/bin/python" in f["versions"].message


def test_check_cluster_flags_version_drift_and_silent_hosts():
    outs = {
        "mac1": gathered(**MAC),
        "mac2": gathered(**MAC | {"versions": VERSIONS.replace("0.32.4", "0.31.0")}),
    }
    found = pf.check_cluster(MESH, outs, local_versions={"python": "3.12.1", "mlx": "0.32.4", "mlx_nb": "0.1.0"})
    assert [str(f) for f in found if f.host == "mac3"] == [
        "[skip] mac3 gather: cannot check this host: no output was gathered from it"
    ]
    drift = [f for f in found if f.host == "*"]
    assert len(drift) == 1 and drift[0].status == "warn"
    assert "mlx differs across hosts ((notebook) 0.32.4, mac1 0.32.4, mac2 0.31.0)" in drift[0].message


def test_a_known_bad_mlx_fails_the_host_naming_the_version_to_install():
    fix = "install 0.32.2 or later, pip install -U 'mlx>=0.32.2'"
    assert pf.mlx_problem("0.32.1") == f"mlx 0.32.1 is known bad (its greedy generation degenerates): {fix}"
    assert pf.mlx_problem("0.32.2") is None and pf.mlx_problem(mx.__version__) is None  # this machine's
    f = by_check(pf.check_host(MESH, "mac1", gathered(**MAC | {"versions": VERSIONS.replace("0.32.4", "0.32.1")})))
    assert f["versions"].status == "fail" and f["versions"].message.startswith("mlx 0.32.1 is known bad")
    assert fix in f["versions"].message


def test_the_package_requires_an_mlx_that_is_not_known_bad():
    import tomllib
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    mlx = [Requirement(r) for r in pyproject["project"]["dependencies"] if Requirement(r).name == "mlx"]
    assert len(mlx) == 2  # Linux (with its CPU backend) and macOS
    for r in mlx:
        assert not r.specifier.contains("0.32.1") and r.specifier.contains("0.32.2"), str(r)


@pytest.mark.kernel
def test_a_notebook_whose_mlx_is_known_bad_starts_no_rank(tmp_path):
    import uuid

    from conftest import Kernel, project_processes

    # this Python, its mlx reported as 0.32.1: the package's metadata first on the path
    dist = tmp_path / "mlx-0.32.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mlx\nVersion: 0.32.1\n")
    mark, path = uuid.uuid4().hex, os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), path]))
    try:
        k = Kernel(mark)
    finally:
        os.environ.pop("PYTHONPATH") if path is None else os.environ.update(PYTHONPATH=path)
    try:
        _, err = k.run("%load_ext mlx_nb\n%mlx_cluster start -n 2")
        assert "UsageError: the cluster did not start: mlx 0.32.1 is known bad" in err
        assert "pip install -U 'mlx>=0.32.2'; nothing was started" in err
        assert project_processes(mark) == []
    finally:
        k.close()


# ------------------------------------------------ the gather command, for real
def run_gather(path_prefix: Path | None = None) -> str:
    env = dict(os.environ)
    if path_prefix:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    r = subprocess.run(
        pf.gather_command(sys.executable), shell=True, env=env, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_gather_command_runs_here_and_reports_what_it_cannot_check():
    out = run_gather()
    assert set(pf.parse_gathered(out)) == {
        "uname",
        "sw_vers",
        "ibv_devices",
        "interfaces",
        "versions",
        "blas",
        "gpus",
        "cuda_visible",
    }
    f = by_check(
        pf.check_host(
            hf.loads('[{"ssh": "127.0.0.1", "ips": ["127.0.0.1"], "rdma": [null]}]'),
            "127.0.0.1",
            out,
            "jaccl",
        )
    )
    assert f["rdma"].message == "cannot check RDMA on this host: ibv_devices not found"
    assert f["macos"].status == "skip" and f["interfaces"].status == "ok"
    assert f["versions"].status == "ok" and f"mlx {mx.__version__}" in f["versions"].message


def test_gather_command_on_a_recorded_mac(tmp_path):
    for name, text in (("ibv_devices", IBV_DEVICES), ("sw_vers", SW_VERS), ("ifconfig", IFCONFIG_MAC)):
        p = tmp_path / name
        p.write_text(f"#!/bin/sh\ncat <<'EOF'\n{text}EOF\n")
        p.chmod(0o755)
    out = run_gather(tmp_path)
    s = pf.parse_gathered(out)
    assert s["ibv_devices"].output == IBV_DEVICES.rstrip("\n") and s["sw_vers"].rc == 0
    f = by_check(pf.check_host(MESH, "mac1", out))
    assert {k: v.status for k, v in f.items() if k != "blas"} == {  # blas: this machine's own (Linux)
        "macos": "ok",
        "rdma": "ok",
        "interfaces": "ok",
        "versions": "ok",
    }


def test_gather_command_reports_the_blas_the_ranks_would_load_here():
    local = hf.local(2)

    def blas_finding(setting):
        out = subprocess.run(
            pf.gather_command(sys.executable, setting), shell=True, capture_output=True, text=True, timeout=30
        ).stdout
        return by_check(pf.check_host(local, "localhost", out))["blas"]

    assert str(blas_finding("off")) == "[ok] localhost blas: reference BLAS (bundled with mlx) (MLX_NB_BLAS=off)"
    missing = blas_finding("/nonexistent/libblas.so.3")
    assert missing.status == "warn" and "MLX_NB_BLAS=/nonexistent/libblas.so.3 could not be loaded" in missing.message
    found = blas_finding(None)  # this machine's own: OpenBLAS where installed (CI installs it)
    assert (found.status, "OpenBLAS" in found.message) in (("ok", True), ("warn", False))
    assert found.status == "ok" or "apt-get install libopenblas0-pthread" in found.message


# ------------------------------------------------------- lessons
def test_warnings_from_the_hostfile_alone():
    h = hf.loads(json.dumps({"envs": ["MLX_METAL_FAST_SYNCH=1", "MLX_RANK=0"], "hosts": MESH.to_json()["hosts"]}))
    notes = pf.warnings(h)
    assert any("MLX_METAL_FAST_SYNCH=1" in n and "unset" in n for n in notes)
    assert any("MLX_RANK" in n and "overrides" in n for n in notes)
    assert pf.warnings(hf.local(2)) == []


def test_docstring_examples_run():
    assert doctest.testmod(pf).failed == 0
