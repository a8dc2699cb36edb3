"""MLX hostfiles: parse and validate (each rank's launch environment: mlx_nb.rank_env).

Mirrors ``mlx._distributed_utils`` (the code behind ``mlx.launch``): a hostfile
``mlx.launch`` accepts works here and gives each rank the same environment, and
one it rejects is rejected with the same reason, followed by the host and field
at fault and what to do. Pure: no I/O beyond reading the hostfile (and printing,
in ``check_main``).

    hf = load("m3-ultra-jaccl.json")
"""

from __future__ import annotations

import difflib
import ipaddress
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

BACKENDS = ("ring", "jaccl", "jaccl-ring", "mpi", "nccl")  # what mx.distributed.init takes
# mlx.launch's argparse defaults
STARTING_PORT = 32323
NCCL_PORT = 12345

Rdma = Optional[Union[str, list[str]]]


class HostfileError(ValueError):
    """A hostfile (or host list) that cannot describe a cluster."""


@dataclass
class Host:
    """One rank: the host to ssh into, its IPs, and its RDMA device towards each rank."""

    rank: int
    ssh_hostname: str
    ips: list[str] = field(default_factory=list)
    rdma: list[Rdma] = field(default_factory=list)


@dataclass
class Hostfile:
    """The ranks in order, plus the backend and "NAME=value" envs the hostfile names."""

    hosts: list[Host]
    backend: str = ""
    envs: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "backend": self.backend,
            "envs": self.envs,
            "hosts": [{"ssh": h.ssh_hostname, "ips": h.ips, "rdma": h.rdma} for h in self.hosts],
        }


# ----------------------------------------------------------------- reading
def _fail(source: str, what: str) -> HostfileError:
    return HostfileError(
        f"Failed to parse hostfile {source}: {what}. A hostfile is a JSON list of hosts "
        '[{"ssh": "mac1", "ips": ["192.168.1.2"], "rdma": [...]}, ...] or the object '
        'mlx.distributed_config writes {"backend": ..., "envs": [...], "hosts": [...]}.'
    )


def _typo(source: str, obj: dict, known: tuple[str, ...], where: str) -> None:
    # mlx.launch ignores unknown keys, so "ip" for "ips" fails later with a confusing reason
    for key in obj:
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        if key not in known and close:
            raise _fail(source, f'{where} has a field "{key}": did you mean "{close[0]}"?')


def check_env(entry: object, where: str) -> None:
    if not isinstance(entry, str):
        raise HostfileError(f'{where}: {entry!r} is not a string; each environment entry is "NAME=value".')
    name = entry.split("=", 1)[0]
    if not name or not all(c.isalnum() or c == "_" for c in name):
        raise HostfileError(
            f"{where}: '{entry}' is an invalid environment variable (mlx.launch ignores it "
            "with a warning); use NAME=value with a name of letters, digits and _."
        )


def _unfit_hostname(name: str) -> Optional[str]:
    """Why ssh cannot take ``name`` as the host to connect to, in mlx.launch's words; None if it can."""
    if name.startswith("-"):
        return "Hostname cannot begin with '-' (ssh would read it as an option)"
    if any(c.isspace() or not c.isprintable() for c in name):
        return "Hostname cannot contain whitespace or control characters"
    return None


def _host(source: str, i: int, raw: object) -> Host:
    if not isinstance(raw, dict):
        raise _fail(
            source,
            f"host entry {i} is a {type(raw).__name__} ({raw!r}), not an object; "
            f'write it as {{"ssh": {json.dumps(raw if isinstance(raw, str) else "hostname")}}}',
        )
    _typo(source, raw, ("ssh", "ips", "rdma"), f"host entry {i}")
    ssh = raw.get("ssh")
    if not isinstance(ssh, str) or not ssh.strip():
        got = "is missing" if "ssh" not in raw else f"is {ssh!r}"
        raise _fail(
            source,
            f'"ssh" of host entry {i} ({json.dumps(raw)}) {got}; it must be the hostname to ssh into',
        )
    unfit = _unfit_hostname(ssh)
    if unfit:
        raise _fail(source, f'"ssh" of host entry {i} is {ssh!r}: {unfit}; it must be the hostname to ssh into')
    name = f"host '{ssh}' (rank {i})"
    ips = raw.get("ips", [])
    if not isinstance(ips, list) or not all(isinstance(ip, str) and ip for ip in ips):
        raise _fail(source, f'"ips" of {name} is {ips!r}; it must be a list of IP strings, e.g. ["192.168.1.2"]')
    rdma = raw.get("rdma", [])
    ok = isinstance(rdma, list) and all(
        d is None
        or (isinstance(d, str) and d)
        or (isinstance(d, list) and d and all(isinstance(x, str) and x for x in d))
        for d in rdma
    )
    if not ok:
        raise _fail(
            source,
            f'"rdma" of {name} is {rdma!r}; it must be a list with one entry per rank: '
            "null, a device name, or a list of device names",
        )
    return Host(i, ssh, ips, rdma)


def loads(text: Union[str, bytes], source: str = "<string>") -> Hostfile:
    """Parse hostfile JSON text (or UTF-8 bytes); ``source`` names it in errors.

    >>> loads('[{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]').hosts[0].ips
    ['127.0.0.1']
    """
    try:
        text = text.decode() if isinstance(text, bytes) else text
    except UnicodeDecodeError as e:
        byte = f"byte {e.start} is {e.object[e.start]:#04x}"
        raise _fail(source, f"it is not UTF-8 text ({byte}); save it as UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(
            source,
            f"invalid JSON at line {e.lineno}, column {e.colno} ({e.msg}; a trailing "
            "or missing comma or quote is the usual cause)",
        ) from None
    except ValueError as e:  # a number of more digits than Python converts
        raise _fail(source, f"invalid JSON ({str(e).split(':')[0]})") from None
    except RecursionError:
        raise _fail(source, "its JSON nests lists or objects too deeply") from None
    backend, envs = "", []
    if isinstance(data, dict):
        _typo(source, data, ("backend", "envs", "hosts"), "the top-level object")
        if "hosts" not in data:
            raise _fail(source, 'the object has no "hosts" list')
        backend, envs, data = data.get("backend", ""), data.get("envs", []), data["hosts"]
        if not isinstance(backend, str):
            raise _fail(source, f'"backend" is {backend!r}; it must be one of {set(BACKENDS)}')
        if not isinstance(envs, list):
            raise _fail(source, f'"envs" is {envs!r}; it must be a list like ["NAME=value"]')
        for e in envs:
            check_env(e, f'Hostfile {source}, "envs"')
    if not isinstance(data, list):
        raise _fail(source, f"the hosts are a {type(data).__name__}, not a list")
    if not data:
        raise _fail(source, "it lists no hosts; add one entry per rank")
    return Hostfile([_host(source, i, h) for i, h in enumerate(data)], backend, envs)


def load(path: Union[str, Path]) -> Hostfile:
    """Read and parse the hostfile at ``path`` (either MLX form).

    >>> hf = load("hosts.json")  # doctest: +SKIP
    """
    p = Path(path)
    if not p.is_file():
        raise HostfileError(
            f"Hostfile {p} doesn't exist. Check the path, or write one with mlx.distributed_config --output-hostfile."
        )
    try:
        data = p.read_bytes()
    except OSError as e:
        raise HostfileError(f"Hostfile {p} cannot be read: {e.strerror}. Check its permissions.") from None
    return loads(data, str(p))


def from_hosts(hostlist: str, repeats: int = 1) -> Hostfile:
    """Hosts from ``--hosts h1,h2`` and ``-n repeats``, as ``mlx.launch`` builds them.

    A host that is an IP address is also its only IP; each host is repeated
    ``repeats`` times in a row.

    >>> [h.ips for h in from_hosts("127.0.0.1", 2).hosts]
    [['127.0.0.1'], ['127.0.0.1']]
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise HostfileError(f"Number should be positive: repeats (-n) is {repeats!r}; use 1 or more.")
    hosts: list[Host] = []
    for name in (h.strip() for h in hostlist.split(",")):
        if not name:
            raise HostfileError(
                f"Hostname cannot be empty: the host list {hostlist!r} has an empty entry; "
                "write it as h1,h2 with no empty names."
            )
        unfit = _unfit_hostname(name)
        if unfit:
            raise HostfileError(
                f"{unfit}: the host list {hostlist!r} has {name!r}; write host names, aliases or user@host."
            )
        try:
            ipaddress.ip_address(name)
            ips = [name]
        except ValueError:
            ips = []
        hosts += [Host(len(hosts) + k, name, list(ips), []) for k in range(repeats)]
    return Hostfile(hosts)


def is_local(host: str) -> bool:
    """Whether a host name or address means this machine over loopback: an "ssh" name whose
    ranks start here without ssh, a ring address only this machine listens on, a server only
    this machine reaches. MLX's ring resolves names too, so an address may be ``localhost``.

    >>> [is_local(h) for h in ("localhost", "127.0.0.1", "127.0.1.1", "::1", "10.0.0.2", "mac2")]
    [True, True, True, True, False, False]
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local(n: int, ip: str = "127.0.0.1") -> Hostfile:
    """A ring hostfile of ``n`` ranks on this machine, all on ``ip``."""
    if n < 1:
        raise HostfileError(f"A cluster needs at least 1 rank, got n={n}")
    return Hostfile([Host(i, "localhost", [ip], []) for i in range(n)], "ring")


# --------------------------------------------------------------- validation
def _name(h: Host) -> str:
    return f"host '{h.ssh_hostname}' (rank {h.rank})"


def rdma_devices(d: Rdma) -> list[str]:
    """The device names of one "rdma" entry: null, a name, or a list of names (one per cable)."""
    return [] if d is None else [d] if isinstance(d, str) else list(d)


def peers(n: int, i: int, ring: bool) -> list[int]:
    """The ranks rank ``i`` has an RDMA link to: its two ring neighbours (jaccl-ring), else all."""
    return sorted({(i - 1) % n, (i + 1) % n} - {i}) if ring else [j for j in range(n) if j != i]


def resolve_backend(hostfile: Hostfile, backend: Optional[str] = None) -> str:
    """The backend ``mlx.launch`` would use: ``backend``, else the hostfile's, else nccl with CUDA or ring."""
    chosen = backend or hostfile.backend
    if not chosen:
        import mlx.core as mx

        return "nccl" if mx.cuda.is_available() else "ring"
    if chosen not in BACKENDS:
        origin = "backend argument" if backend else 'hostfile\'s "backend" field'
        close = difflib.get_close_matches(chosen, BACKENDS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "pick one of them."
        raise HostfileError(
            "The backend should be one of {'ring', 'mpi', 'nccl', 'jaccl', 'jaccl-ring'}: "
            f"the {origin} is {chosen!r}; {hint}"
        )
    return chosen


def _check_ring(hosts: list[Host]) -> None:
    missing = [h for h in hosts if not h.ips]
    if missing:
        raise HostfileError(
            "The ring backend requires IPs to be provided instead of hostnames: "
            f'{", ".join(map(_name, missing))} {"has" if len(missing) == 1 else "have"} no "ips". '
            'Add the address each rank listens on, e.g. "ips": ["192.168.1.2"] '
            "(mlx.distributed_config --over ethernet finds them)."
        )
    owner: dict[str, Host] = {}
    for h in hosts:
        for ip in h.ips:
            o = owner.setdefault(ip, h)
            if o.ssh_hostname != h.ssh_hostname and not is_local(ip):
                raise HostfileError(
                    f'The ring backend listens on each rank\'s "ips": {ip} is listed for both '
                    f"{_name(o)} and {_name(h)}, but an address belongs to one machine. "
                    "Give each host its own address (or the same ssh name if it is one machine)."
                )


def _check_coordinator(hosts: list[Host], backend: str) -> None:
    if not hosts[0].ips:
        raise HostfileError(
            "Rank 0 should have an IP reachable from all other ranks: "
            f'{_name(hosts[0])} has no "ips", and the {backend} backend uses its first IP as '
            'the coordinator. Add it, e.g. "ips": ["192.168.1.2"].'
        )


def _check_jaccl(hosts: list[Host], backend: str) -> None:
    _check_coordinator(hosts, backend)
    n = len(hosts)
    bad = [h for h in hosts if len(h.rdma) != n]
    if bad:
        raise HostfileError(
            "The hostfile is malformed: number of RDMA devices does not match hosts: "
            + ", ".join(f'{_name(h)} has {len(h.rdma)} "rdma" entr{"y" if len(h.rdma) == 1 else "ies"}' for h in bad)
            + f' for {n} hosts. Each rank\'s "rdma" has one entry per rank, in rank order: '
            "null for itself and the device that reaches each other rank."
        )
    selfs = [h for h in hosts if h.rdma[h.rank] is not None]
    if selfs:
        raise HostfileError(
            "The hostfile is malformed: RDMA device of self should be null: "
            + ", ".join(f'{_name(h)} has "rdma"[{h.rank}] = {h.rdma[h.rank]!r}' for h in selfs)
            + "; entry i of rank i's list is the rank itself, so set it to null."
        )
    _check_links(hosts, backend)
    _check_cable_ends(hosts, backend == "jaccl-ring")
    seen: dict[str, Host] = {}
    for h in hosts:
        o = seen.setdefault(h.ssh_hostname, h)
        if o is not h:
            raise HostfileError(
                f"{backend} connects ranks over RDMA cables between Macs, but ssh host "
                f"'{h.ssh_hostname}' is both rank {o.rank} and rank {h.rank}. "
                "List each Mac once, or use the ring backend to run several ranks on one machine."
            )


def _check_links(hosts: list[Host], backend: str) -> None:
    """Every link the backend needs has a device listed."""
    n, ring = len(hosts), backend == "jaccl-ring"
    missing = [(i, j) for i in range(n) for j in peers(n, i, ring) if hosts[i].rdma[j] is None]
    if missing:
        pairs = ", ".join(f"{hosts[i].ssh_hostname} to {hosts[j].ssh_hostname}" for i, j in missing[:3])
        if len(missing) > 3:
            pairs += f" and {len(missing) - 3} more"
        i, j = missing[0]
        need = "its two ring neighbours" if ring else "every other rank (a full mesh)"
        raise HostfileError(
            f"The hostfile is malformed: no RDMA device is listed for {pairs}: "
            f'{_name(hosts[i])} has "rdma"[{j}] = null, but {backend} needs a device towards '
            f"{need}. Add the device (ibv_devices on that host lists them)"
            + (", or use jaccl-ring if the Macs are cabled as a ring." if not ring else ".")
        )


def _check_cable_ends(hosts: list[Host], ring: bool) -> None:
    """A device is cabled to one peer, and both ends of a link list as many devices (cables)."""
    n = len(hosts)
    for i, h in enumerate(hosts):
        linked = peers(n, i, ring)
        used = Counter(d for j in linked for d in rdma_devices(h.rdma[j]))
        twice = [d for d, c in used.items() if c > 1]
        if twice:
            raise HostfileError(
                f'{_name(h)} lists RDMA device {twice[0]} in "rdma" for more than one peer, '
                "but a Thunderbolt port is cabled to one peer. Give each peer its own device."
            )
        for j in linked:
            mine, theirs = rdma_devices(h.rdma[j]), rdma_devices(hosts[j].rdma[i])
            if len(mine) != len(theirs):
                raise HostfileError(
                    f'{_name(h)} lists {len(mine)} RDMA device(s) in "rdma"[{j}] towards '
                    f"'{hosts[j].ssh_hostname}', but {_name(hosts[j])} lists {len(theirs)} in "
                    f'"rdma"[{i}] back; the k-th device on each side must be the two ends of '
                    "the k-th cable, so list the same number on both."
                )


def _gpus(hosts: list[Host], repeat_hosts: int) -> None:
    seen: dict[tuple[str, int], Host] = {}
    for h in hosts:
        o = seen.setdefault((h.ssh_hostname, h.rank % repeat_hosts), h)
        if o is not h:
            per_host = Counter(x.ssh_hostname for x in hosts)[h.ssh_hostname]
            raise HostfileError(
                f"The nccl backend gives rank r CUDA_VISIBLE_DEVICES=r % repeat_hosts, so on "
                f"ssh host '{h.ssh_hostname}' rank {o.rank} and rank {h.rank} would share GPU "
                f"{h.rank % repeat_hosts} (repeat_hosts={repeat_hosts}). Pass repeat_hosts="
                f"{per_host} (mlx.launch -n {per_host}) with the host's ranks listed in a row."
            )


def validate(hostfile: Hostfile, backend: Optional[str] = None, *, repeat_hosts: int = 1) -> str:
    """Check ``hostfile`` for ``backend`` with ``mlx.launch``'s rules and more; return the backend.

    >>> validate(from_hosts("127.0.0.1", 2), "ring")
    'ring'
    """
    backend = resolve_backend(hostfile, backend)
    hosts = hostfile.hosts
    if not hosts:
        raise HostfileError("The hostfile lists no hosts; add one entry per rank.")
    for e in hostfile.envs:
        check_env(e, 'Hostfile "envs"')
    if backend == "ring":
        _check_ring(hosts)
    elif backend == "nccl":
        _check_coordinator(hosts, backend)
        _gpus(hosts, repeat_hosts)
    elif backend in ("jaccl", "jaccl-ring"):
        _check_jaccl(hosts, backend)
    return backend
