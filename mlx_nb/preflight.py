"""Preflight: turn what a host's commands printed into findings about the cluster.

Pure: the commands run elsewhere (``gather_command`` is one ``sh -c`` string to run on
each host over SSH); these functions only read their output.

    out = {h: ssh(h, gather_command()) for h in hosts}
    for f in check_cluster(hostfile, out, "jaccl"):
        print(f)
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from .hostfile import Hostfile, rdma_devices, resolve_backend
from .rank.blas import ENV, threads_per_rank

MARK = "@@mlx_nb"
NOT_FOUND = 127  # the shell's status for a command it cannot find
JACCL_MACOS = (26, 2)  # RDMA over Thunderbolt arrived in macOS 26.2
# set per rank by the launch, overriding the hostfile's "envs"
LAUNCH_VARS = {"MLX_RANK", "MLX_HOSTFILE", "MLX_IBV_DEVICES", "MLX_JACCL_COORDINATOR", "MLX_JACCL_RING"}
LAUNCH_VARS |= {"MLX_WORLD_SIZE", "NCCL_HOST_IP", "NCCL_PORT", "CUDA_VISIBLE_DEVICES"}
RDMA_ENABLE = "start the Mac in recovery mode, run `rdma_ctl enable` in Terminal and reboot"
# MLX releases that give wrong results: what goes wrong, and the release that fixed it
KNOWN_BAD_MLX = {"0.32.1": ("its greedy generation degenerates", "0.32.2")}
_VERSIONS_PY = """import platform, sys
from importlib import metadata
print('python', platform.python_version())
print('executable', sys.executable)
try:
    print('mlx', metadata.version('mlx'))
except metadata.PackageNotFoundError:
    print('mlx', '-')
try:  # as the notebook reads its own: a checkout on PYTHONPATH counts
    import mlx_nb
    print('mlx_nb', mlx_nb.__version__)
except ImportError:
    print('mlx_nb', '-')
found = []
for name in ('mlx-cuda-13', 'mlx-cuda-12', 'mlx-cpu', 'mlx-metal'):
    try:
        found.append(name + ' ' + metadata.version(name))
    except metadata.PackageNotFoundError:
        pass
print('mlx_backend', ', '.join(found) or '-')
"""
# the host's NVIDIA GPUs, one CSV line each (nvidia-smi ships with the driver)
GPU_QUERY = "index,name,memory.total,uuid,pci.bus_id"
# rank/blas.py run by path (importing mlx_nb would cost a second): which BLAS a rank would load
_BLAS_PY = """import importlib.util, os, runpy, sys
spec = importlib.util.find_spec('mlx_nb')
if spec is None:
    sys.exit('mlx_nb is not installed for ' + sys.executable)
runpy.run_path(os.path.join(os.path.dirname(spec.origin), 'rank', 'blas.py'), run_name='__main__')
"""


class Severity(str, Enum):
    """How a check came out (a ``str``: it reads as its text)."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"  # the check could not run

    def __str__(self) -> str:
        return self.value


@dataclass
class Finding:
    """One result of a check on one host; ``status`` is ok, warn, fail or skip (could not run).
    ``refuses_start``: starting a cluster is refused on it, though only a warning here (the
    notebook's and the hosts' mlx or mlx_nb differ)."""

    host: str
    check: str
    status: Severity
    message: str
    refuses_start: bool = False

    def __str__(self) -> str:
        return f"[{self.status}] {self.host} {self.check}: {self.message}"


@dataclass
class Section:
    """What one gathered command printed (stdout and stderr) and its exit status."""

    output: str
    rc: int


@dataclass
class Gpu:
    """One NVIDIA GPU of a host, as ``nvidia-smi --query-gpu`` lists it."""

    index: int
    name: str
    memory_mib: int
    uuid: str = ""
    pci_bus_id: str = ""

    def __str__(self) -> str:
        return f"GPU {self.index} {self.name} ({self.memory_mib / 1024:.0f} GiB)"


@dataclass
class Interface:
    """A network interface: its IPv4 addresses, whether it is up, and its bridge members."""

    ipv4: list[str] = field(default_factory=list)
    up: bool = False
    members: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ gather
def gather_command(python: str = "python3", blas: Optional[str] = None) -> str:
    """One ``sh -c`` command gathering everything ``check_host`` reads, in one SSH round trip.

    Each section is ``@@mlx_nb NAME``, the command's output, then ``@@mlx_nb rc=STATUS``;
    ``python`` is the interpreter the engines will run (its versions are reported);
    ``blas``, the ranks' ``MLX_NB_BLAS`` where it is set for them.

    >>> gather_command().startswith("sh -c ")
    True
    """
    blas_env = f"env {ENV}={shlex.quote(blas)} " if blas is not None else ""
    script = "\n".join(
        [
            f'm() {{ printf "{MARK} %s\\n" "$1"; shift; "$@" 2>&1; r=$?; printf "\\n{MARK} rc=%s\\n" $r; }}',
            "ifs() { if command -v ifconfig >/dev/null 2>&1; then ifconfig -a; else ip -4 addr; fi; }",
            "m uname uname -sm",
            "m sw_vers sw_vers",
            "m ibv_devices ibv_devices",
            "m interfaces ifs",
            f'm versions {shlex.quote(python)} -c "{_VERSIONS_PY}"',
            f'm blas {blas_env}{shlex.quote(python)} -c "{_BLAS_PY}"',
            f"m gpus nvidia-smi --query-gpu={GPU_QUERY} --format=csv,noheader,nounits",
            "m cuda_visible printenv CUDA_VISIBLE_DEVICES",
        ]
    )
    return "sh -c " + shlex.quote(script)


def parse_gathered(text: str) -> dict[str, Section]:
    """Split the output of ``gather_command`` into its sections."""
    sections: dict[str, Section] = {}
    name, lines = None, []
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.startswith(MARK + " rc=") and name is not None:
            sections[name] = Section("\n".join(lines).strip("\n"), int(line.split("=", 1)[1] or 0))
            name, lines = None, []
        elif line.startswith(MARK + " "):
            name, lines = line[len(MARK) + 1 :].strip(), []
        elif name is not None:
            lines.append(line)
    return sections


# ------------------------------------------------------------------ parsers
def parse_ibv_devices(text: str) -> list[str]:
    """Device names listed by ``ibv_devices`` (the first column under the dashes)."""
    lines = text.splitlines()
    start = next((i + 1 for i, l in enumerate(lines) if l.strip().startswith("---")), len(lines))
    return [l.split()[0] for l in lines[start:] if l.strip()]


def parse_interfaces(text: str) -> dict[str, Interface]:
    """Interfaces from ``ifconfig`` (macOS or Linux) or ``ip -4 addr`` output."""
    out: dict[str, Interface] = {}
    cur: Optional[Interface] = None
    for line in text.splitlines():
        head = re.match(r"^(?:\d+:\s+)?([^\s:]+?)(?:@\S+)?:?\s+(?:flags=\S*<([^>]*)>|<([^>]*)>|Link encap)", line)
        if head and not line[0].isspace():
            cur = out.setdefault(head.group(1), Interface())
            flags = (head.group(2) or head.group(3) or "").split(",")
            cur.up = "UP" in flags or "Link encap" in line
            continue
        if cur is None:
            continue
        words = line.split()
        if words[:1] == ["inet"] and len(words) > 1:
            cur.ipv4.append(words[1].removeprefix("addr:").split("/")[0])
        elif words[:1] == ["member:"] and len(words) > 1:
            cur.members.append(words[1])
        elif words[:1] == ["status:"] and words[1:2] == ["inactive"]:
            cur.up = False
    return out


def parse_sw_vers(text: str) -> dict[str, str]:
    """``sw_vers`` fields: ProductName, ProductVersion, BuildVersion."""
    return {k.strip(): v.strip() for k, _, v in (l.partition(":") for l in text.splitlines()) if v.strip()}


def parse_versions(text: str) -> dict[str, str]:
    """The versions section: python, executable, mlx and mlx_nb (``-`` when not installed)."""
    return {k: v.strip() for k, _, v in (l.partition(" ") for l in text.splitlines()) if k and v}


def parse_gpus(text: str) -> list[Gpu]:
    """The GPUs of ``nvidia-smi --query-gpu=index,name,memory.total,uuid,pci.bus_id
    --format=csv,noheader,nounits`` output (lines it cannot read are left out).

    >>> parse_gpus("0, NVIDIA H200, 143771, GPU-1f2e, 00000000:00:05.0")
    [Gpu(index=0, name='NVIDIA H200', memory_mib=143771, uuid='GPU-1f2e', pci_bus_id='00000000:00:05.0')]
    """
    gpus = []
    for line in text.splitlines():
        f = [x.strip() for x in line.split(",")]
        if len(f) >= 3 and f[0].isdigit():
            gpus.append(Gpu(int(f[0]), f[1], int(f[2]) if f[2].isdigit() else 0, *f[3:5]))
    return gpus


def visible_gpu(visible: Optional[str], gpus: list[Gpu]) -> tuple[Optional[Gpu], str]:
    """The GPU MLX's device 0 is under ``CUDA_VISIBLE_DEVICES=visible`` (None: unset), and
    why not where none is: (gpu, "") or (None, reason).

    CUDA counts only the visible devices: device 0 is the first entry (an index or a UUID).

    >>> gpus = parse_gpus("0, NVIDIA H200, 143771, GPU-1f2e, 0:5.0\\n1, NVIDIA H200, 143771, GPU-9a8b, 0:6.0")
    >>> visible_gpu("1", gpus)[0].index, visible_gpu(None, gpus)[0].index, visible_gpu("GPU-9a", gpus)[0].index
    (1, 0, 1)
    >>> visible_gpu("2", gpus)[1]
    'CUDA_VISIBLE_DEVICES=2 but the host has GPUs 0-1'
    """
    if not gpus:
        return None, "nvidia-smi lists no GPU"
    if visible is None:
        return gpus[0], ""
    first = visible.split(",")[0].strip()
    if first.isdigit():
        found = next((g for g in gpus if g.index == int(first)), None)
    else:
        found = next((g for g in gpus if first and g.uuid.startswith(first)), None)
    if found is None:
        have = f"GPUs 0-{len(gpus) - 1}" if len(gpus) > 1 else "GPU 0 only"
        return None, f"CUDA_VISIBLE_DEVICES={visible} but the host has {have}"
    return found, ""


def rdma_interface(device: str) -> str:
    """The network interface behind an RDMA device: ``rdma_en5`` -> ``en5``."""
    return device.removeprefix("rdma_")


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def mlx_problem(version: Optional[str]) -> Optional[str]:
    """Why the ranks must not run MLX ``version``, with the version to install; None if they may.

    >>> mlx_problem("0.32.1")
    "mlx 0.32.1 is known bad (its greedy generation degenerates): install 0.32.2 or later, pip install -U 'mlx>=0.32.2'"
    >>> mlx_problem("0.32.4") is None
    True
    """
    if version not in KNOWN_BAD_MLX:
        return None
    what, fixed = KNOWN_BAD_MLX[version]
    return f"mlx {version} is known bad ({what}): install {fixed} or later, pip install -U 'mlx>={fixed}'"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


# ------------------------------------------------------------------ checks
def _unavailable(s: dict[str, Section], name: str) -> Optional[str]:
    if name not in s:
        return f"no {name} output was gathered"
    return f"{name} not found" if s[name].rc == NOT_FOUND else None


def _macos(s: dict[str, Section], backend: str) -> tuple[Severity, str]:
    if _unavailable(s, "sw_vers"):
        system = s["uname"].output.strip() if "uname" in s else "unknown system"
        return (
            Severity.SKIP,
            f"cannot check the macOS version on this host ({system}): {_unavailable(s, 'sw_vers')}",
        )
    v = parse_sw_vers(s["sw_vers"].output)
    version = v.get("ProductVersion", "?")
    if backend.startswith("jaccl") and _version(version) < JACCL_MACOS:
        return (
            Severity.FAIL,
            f"macOS {version}: {backend} needs RDMA over Thunderbolt, which needs macOS 26.2 or later",
        )
    return Severity.OK, f"{v.get('ProductName', 'macOS')} {version} ({v.get('BuildVersion', '?')})"


def _rdma(s: dict[str, Section], wanted: list[str], label: str) -> tuple[Severity, str]:
    if _unavailable(s, "ibv_devices"):
        return Severity.SKIP, f"cannot check RDMA on this host: {_unavailable(s, 'ibv_devices')}"
    have = parse_ibv_devices(s["ibv_devices"].output)
    absent = [d for d in wanted if d not in have]
    if not have:
        return Severity.FAIL, f"RDMA is not enabled (ibv_devices lists no device): {RDMA_ENABLE}"
    if absent:
        return Severity.FAIL, (
            f'{", ".join(absent)} from "rdma" of {label} not present; ibv_devices lists '
            f"{', '.join(have)}: fix the hostfile or the cabling"
        )
    return Severity.OK, f"RDMA devices {', '.join(have)}"


def _interfaces(s: dict[str, Section], ips: list[str], wanted: list[str], label: str) -> tuple[Severity, str]:
    if _unavailable(s, "interfaces"):
        return Severity.SKIP, "cannot check interfaces on this host: neither ifconfig nor ip found"
    ifaces = parse_interfaces(s["interfaces"].output)
    have = sorted({ip for i in ifaces.values() for ip in i.ipv4})
    problems = [
        f'IP {ip} from "ips" of {label} is on no interface (this host has {", ".join(have) or "none"}): '
        'ranks listen there, so fix "ips"'
        for ip in ips
        if ip not in have
    ]
    names = [rdma_interface(d) for d in wanted]
    for d, name in zip(wanted, names):
        if name not in ifaces:
            problems.append(f"interface {name} (of {d}) does not exist")
        elif not ifaces[name].ipv4:
            problems.append(
                f"interface {name} (of {d}) has no IPv4 address; mlx.distributed_config --auto-setup assigns one"
            )
    bridged = [m for i in ifaces.values() if i.up for m in i.members if m in names]
    if problems:
        return Severity.FAIL, "; ".join(problems)
    if bridged:
        return Severity.WARN, (
            f"{', '.join(bridged)} are in an active bridge (the Thunderbolt Bridge): take it down with "
            "`sudo ifconfig bridge0 down`, as mlx.distributed_config does"
        )
    return Severity.OK, f"{', '.join(ips + names) or 'nothing to check'} present"


def _versions(s: dict[str, Section]) -> tuple[Severity, str]:
    sec = s.get("versions")
    v = parse_versions(sec.output) if sec else {}
    if sec is None or sec.rc or "python" not in v:
        why = sec.output.strip().splitlines()[-1] if sec and sec.output.strip() else "no versions output"
        return Severity.FAIL, f"cannot run the engines' Python on this host: {why}"
    if v.get("mlx", "-") == "-":
        return Severity.FAIL, f"mlx is not installed for {v.get('executable', 'python')}: pip install mlx"
    if problem := mlx_problem(v["mlx"]):
        return Severity.FAIL, f"{problem} (for {v.get('executable', 'python')})"
    return (
        Severity.OK,
        f"python {v['python']}, mlx {v['mlx']}, mlx_nb {v.get('mlx_nb', '-')} ({v.get('executable')})",
    )


def _cuda(s: dict[str, Section]) -> str:
    """The engines' MLX CUDA backend package ("mlx-cuda-13 0.32.4"), or "" where it has none."""
    sec = s.get("versions")
    found = parse_versions(sec.output).get("mlx_backend", "") if sec and not sec.rc else ""
    return next((b.strip() for b in found.split(",") if b.strip().startswith("mlx-cuda")), "")


def _host_gpus(s: dict[str, Section]) -> list[Gpu]:
    sec = s.get("gpus")
    return parse_gpus(sec.output) if sec is not None and not sec.rc else []


def _gpu(
    s: dict[str, Section], ranks: list, backend: str, rank_env: dict[int, dict[str, str]]
) -> Optional[tuple[Severity, str]]:
    """Which GPU each rank of this host gets (None where the host has no NVIDIA GPU and its MLX no CUDA)."""
    gpus, cuda = _host_gpus(s), _cuda(s)
    if not gpus and not cuda:
        return None
    if not gpus:
        sec = s.get("gpus")
        why = (
            "nvidia-smi is not installed"
            if sec is None or sec.rc == NOT_FOUND
            else (f"nvidia-smi failed: {sec.output.strip().splitlines()[-1] if sec.output.strip() else sec.rc}")
        )
        return Severity.WARN, f"the engines' mlx has the CUDA backend ({cuda}) but {why}: the ranks may find no GPU"
    kinds = ", ".join(dict.fromkeys(g.name for g in gpus))
    if not cuda:
        v = parse_versions(s["versions"].output) if "versions" in s else {}
        return Severity.WARN, (
            f"{len(gpus)} GPU{'s' * (len(gpus) != 1)} ({kinds}) here, but the engines' mlx has no CUDA backend "
            f"({v.get('mlx_backend', '-')}): the ranks run on the CPU; pip install 'mlx[cuda13]' to use them"
        )
    vis = s.get("cuda_visible")
    inherited = vis.output.strip() if vis is not None and not vis.rc else None
    on: dict[int, list[int]] = {}
    problems = []
    for h in ranks:
        visible = rank_env.get(h.rank, {}).get("CUDA_VISIBLE_DEVICES", inherited)
        gpu, why = visible_gpu(visible, gpus)
        if gpu is None:
            problems.append(f"rank {h.rank}: {why}")
        else:
            on.setdefault(gpu.index, []).append(h.rank)
    by_index = {g.index: g for g in gpus}
    parts = [
        f"{'ranks' if len(rs) > 1 else 'rank'} {', '.join(map(str, rs))} on {by_index[i]}"
        + (f", shared by {len(rs)} ranks" if len(rs) > 1 else "")
        for i, rs in on.items()
    ]
    shared = [i for i, rs in on.items() if len(rs) > 1]
    if problems or (backend == "nccl" and shared):
        fix = "NCCL needs one GPU per rank" if backend == "nccl" else "fix CUDA_VISIBLE_DEVICES"
        return Severity.FAIL, "; ".join(problems + parts) + f": {fix}"
    return Severity.OK, "; ".join(parts) + f" ({cuda})"


def _blas(s: dict[str, Section], n_ranks: int) -> tuple[Severity, str]:
    sec = s.get("blas")
    lines = sec.output.strip().splitlines() if sec else []
    try:
        info = json.loads(lines[-1]) if sec and not sec.rc and lines else None
    except ValueError:
        info = None
    if not isinstance(info, dict):
        why = lines[-1] if lines else "no blas output was gathered"
        return Severity.SKIP, f"cannot tell which BLAS the ranks will run: {why}"
    if info["system"] != "Linux" or info["note"].endswith("=off"):
        return Severity.OK, info["name"] + (f" ({info['note']})" if info["note"] else "")
    if _cuda(s) and _host_gpus(s):
        return Severity.OK, f"matmuls run on the GPU (cuBLAS); work put on the CPU uses {info['name']}"
    if not info["optimized"]:
        return (
            Severity.WARN,
            f"ranks will run MLX's bundled reference BLAS (float32 matmuls about 30x slower): {info['note']}",
        )
    threads = threads_per_rank(info["cores"], n_ranks)
    return Severity.OK, (
        f"{info['name']} ({info['path']}): {threads} thread{'s' * (threads != 1)} per rank "
        f"({info['cores']} cores, {n_ranks} rank{'s' * (n_ranks != 1)} on this host)"
    )


def check_host(
    hostfile: Hostfile,
    ssh_hostname: str,
    gathered: str,
    backend: Optional[str] = None,
    rank_env: Optional[dict[int, dict[str, str]]] = None,
) -> list[Finding]:
    """Findings for the host ``ssh_hostname`` of ``hostfile`` from its ``gather_command`` output.

    Checks: macos (version; 26.2+ for jaccl), rdma (for jaccl or when the host lists RDMA
    devices: ibv_devices has them), interfaces (each "ips" address and each RDMA device's
    interface has an IPv4 address; no active bridge over them), versions (the engines'
    Python runs and has an mlx not known bad), blas (on Linux: an optimized BLAS the ranks will load, and its
    threads per rank; on a CUDA host, matmuls run on the GPU), gpu (where the host has NVIDIA
    GPUs or the engines' MLX has CUDA: which GPU each rank gets, from ``CUDA_VISIBLE_DEVICES``
    in ``rank_env`` (rank -> the variables the launch sets) or the host's own).
    """
    backend = resolve_backend(hostfile, backend)
    s = parse_gathered(gathered)
    ranks = [h for h in hostfile.hosts if h.ssh_hostname == ssh_hostname]
    if not ranks:
        raise ValueError(f"{ssh_hostname!r} is not an ssh host of this hostfile")
    label = ("ranks " if len(ranks) > 1 else "rank ") + ", ".join(str(h.rank) for h in ranks)
    wanted = sorted({d for h in ranks for j, x in enumerate(h.rdma) if j != h.rank for d in rdma_devices(x)})
    # "ips" may hold hostnames (MLX's ring resolves them); only addresses can be looked for
    ips = sorted({ip for h in ranks for ip in h.ips if _is_address(ip)})
    checks = {"macos": _macos(s, backend)}
    if backend.startswith("jaccl") or wanted:
        checks["rdma"] = _rdma(s, wanted, label)
    checks["interfaces"] = _interfaces(s, ips, wanted, label)
    checks["versions"] = _versions(s)
    checks["blas"] = _blas(s, len(ranks))
    gpu = _gpu(s, ranks, backend, rank_env or {})
    if gpu is not None:
        checks["gpu"] = gpu
    return [Finding(ssh_hostname, check, status, message) for check, (status, message) in checks.items()]


def check_cluster(
    hostfile: Hostfile,
    outputs: dict[str, str],
    backend: Optional[str] = None,
    local_versions: Optional[dict[str, str]] = None,
    rank_env: Optional[dict[int, dict[str, str]]] = None,
) -> list[Finding]:
    """Findings for every host (``outputs`` maps ssh hostname to gathered text) and across hosts.

    ``local_versions`` (``parse_versions`` of the notebook's side) adds a check that every
    host runs the notebook's mlx and mlx_nb; ``rank_env``, see :func:`check_host`.
    """
    found: list[Finding] = []
    versions: dict[str, dict[str, str]] = {}
    for host in dict.fromkeys(h.ssh_hostname for h in hostfile.hosts):
        if host not in outputs:
            found.append(
                Finding(host, "gather", Severity.SKIP, "cannot check this host: no output was gathered from it")
            )
            continue
        found += check_host(hostfile, host, outputs[host], backend, rank_env)
        s = parse_gathered(outputs[host]).get("versions")
        if s is not None and not s.rc:
            versions[host] = parse_versions(s.output)
    if local_versions:
        versions = {"(notebook)": local_versions, **versions}
    for key in ("python", "mlx", "mlx_nb"):
        seen = {h: v.get(key, "-") for h, v in versions.items()}
        if key == "python":
            seen = {h: ".".join(x.split(".")[:2]) for h, x in seen.items()}
        if len(set(seen.values())) > 1:
            detail = ", ".join(f"{h} {x}" for h, x in seen.items())
            found.append(
                Finding(
                    "*",
                    "versions",
                    Severity.WARN,
                    f"{key} differs across hosts ({detail}): install the same version everywhere",
                    refuses_start=key != "python",  # a python minor version may differ: mlx and mlx_nb must not
                )
            )
    return found


def warnings(hostfile: Hostfile) -> list[str]:
    """Lessons users learned the hard way, for this hostfile (no host needed)."""
    notes = []
    names = {e.split("=", 1)[0]: e for e in hostfile.envs}
    if "MLX_METAL_FAST_SYNCH" in names:
        notes.append(
            f"the hostfile's \"envs\" sets {names['MLX_METAL_FAST_SYNCH']}: MLX's docs now "
            "advise leaving MLX_METAL_FAST_SYNCH unset; remove it unless you measured that it helps"
        )
    managed = sorted(n for n in names if n in LAUNCH_VARS)
    if managed:
        notes.append(
            f'the hostfile\'s "envs" sets {", ".join(managed)}, which the launch sets per rank '
            "and overrides: remove them"
        )
    return notes
