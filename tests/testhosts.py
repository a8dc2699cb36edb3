"""Test hosts: n SSH servers, each in its own network namespace, for multi-host tests on one machine.

Each host is an ``ip netns`` namespace with a veth into a bridge in the root namespace
(bridge 10.213.7.1/24, host i at 10.213.7.(10 + i)), its own hostname (a UTS namespace)
and OpenSSH's sshd listening on its address. The hosts share this machine's filesystem, so
the project's venv Python runs on every host. ``ssh -F hosts.ssh_config mlxnb-h0`` works,
and ``hosts.ssh_cmd`` is that command for ipyparallel's SSH launchers.

    with TestHosts(2) as hosts:
        hosts.ssh(0, "hostname").stdout          # 'mlxnb-h0\\n'
        hosts.ips, hosts.bridge_ip               # ['10.213.7.10', '10.213.7.11'], '10.213.7.1'

Without CAP_NET_ADMIN it falls back, loudly, to sshd on 127.0.13.(10 + i): ssh and TCP
between hosts still work, but the hosts are not isolated and share the hostname.

Several test sessions may run at once: each takes a free slot (a lock file) and its names
(``mlxnb<slot>-...``), subnet (10.213.(7 + slot).0/24) and temp dir follow from it.
Taking a slot first removes whatever a crashed session left under that slot's names.
"""

from __future__ import annotations

import fcntl
import getpass
import glob
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Optional, Union

import psutil
import pytest
from lanes import starts

SSHD = "/usr/sbin/sshd"
# the Debian packages the tests need (scripts/system-packages.sh installs them)
SSHD_PACKAGES = ["openssh-server", "openssh-client"]
MPI_PACKAGES = ["openmpi-bin", "libopenmpi-dev"]
SLOTS = 16
MARK = "MLXNB_TESTHOSTS"  # set (by sshd) in every process started on a test host
LOCKS = Path(tempfile.gettempdir()) / "mlxnb-testhosts-locks"
SSH_OPTIONS = {
    "User": getpass.getuser(),
    "IdentitiesOnly": "yes",
    "StrictHostKeyChecking": "no",
    "UserKnownHostsFile": "/dev/null",
    "BatchMode": "yes",
    "LogLevel": "ERROR",
    "ConnectTimeout": "5",
}


class TestHostsError(RuntimeError):
    """The test hosts could not be set up; the message says what is missing."""

    __test__ = False


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        p = subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: command not found")
    if check and p.returncode:
        raise TestHostsError(f"`{' '.join(argv)}` failed ({p.returncode}): {p.stderr.strip()}")
    return p


def require(packages: list[str], present: Callable[[], bool], purpose: str) -> None:
    """Raise TestHostsError, saying how to install the Debian ``packages``, unless ``present()``.

    The tests install nothing themselves: scripts/test.sh (the README's test command) does.
    """
    if not present():
        raise TestHostsError(
            f"{purpose} need {' '.join(packages)}: scripts/test.sh installs them (as root on Debian), "
            f"or install them yourself (sudo apt-get install -y {' '.join(packages)})"
        )


def require_sshd() -> None:
    """OpenSSH server and client."""
    require(
        SSHD_PACKAGES,
        lambda: os.path.exists(SSHD) and all(map(shutil.which, ("ssh", "scp", "ssh-keygen"))),
        "the multi-host tests",
    )


def require_mpi() -> None:
    """Open MPI (mpirun and the libmpi.so MLX loads)."""
    from mlx_nb.engines.launch import mpi_available

    require(MPI_PACKAGES, lambda: mpi_available()[0], "the MPI tests")


def _marked(prefix: str) -> list[psutil.Process]:
    # sshd rewrites its environ area with its process title, so it is found by its config path
    config = os.path.join(tempfile.gettempdir(), prefix + "-hosts-")
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if config in " ".join(p.info["cmdline"] or []) or p.environ().get(MARK) == prefix:
                found.append(p)
        except psutil.Error:
            pass
    return found


def _kill(procs: list[psutil.Process], grace: float = 3.0) -> None:
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)


def purge(prefix: str, files: bool = True) -> None:
    """Remove every process, namespace, link (and temp dir) named by ``prefix`` (e.g. ``mlxnb0``)."""
    namespaces = [
        line.split()[0]
        for line in _run("ip", "netns", "list", check=False).stdout.splitlines()
        if line.startswith(prefix + "-")
    ]
    procs = {p.pid: p for p in _marked(prefix)}
    for ns in namespaces:
        for pid in _run("ip", "netns", "pids", ns, check=False).stdout.split():
            try:
                procs.setdefault(int(pid), psutil.Process(int(pid)))
            except psutil.Error:
                pass
    _kill(list(procs.values()))
    for ns in namespaces:
        _run("ip", "netns", "del", ns, check=False)
    for line in _run("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if line.count(":") > 1 else ""
        if name.startswith(prefix + "-"):
            _run("ip", "link", "del", name, check=False)
    for d in glob.glob(os.path.join(tempfile.gettempdir(), prefix + "-hosts-*")) if files else []:
        shutil.rmtree(d, ignore_errors=True)


class TestHosts:
    """``n`` SSH hosts on private addresses; a context manager that removes all it made.

    ``netns=None`` uses network namespaces when it can and falls back to loopback
    addresses (with a warning); ``False`` forces the fallback.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, n: int = 2, *, netns: Optional[bool] = None) -> None:
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self.n = n
        self._want_netns = netns
        self.mode = ""
        self.slot = -1
        self.prefix = ""
        self.names = [f"mlxnb-h{i}" for i in range(n)]
        self.ips: list[str] = []
        self.bridge_ip = ""
        self.port = 22
        self.namespaces: list[str] = []
        self.dir = Path()
        self.key = ""
        self.ssh_config = ""
        self._lock = None
        self._fallback_reason = "loopback mode was asked for"
        self._sshd: list[subprocess.Popen] = []

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> TestHosts:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> TestHosts:
        require_sshd()
        self._take_slot()
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-hosts-"))
            self._keys()
            if self._want_netns is not False and self._try_netns():
                self.mode = "netns"
            elif self._want_netns:
                raise TestHostsError("network namespaces were asked for but cannot be created here")
            else:
                self._loopback()
            self._write_ssh_config()
            for i in range(self.n):
                self._start_sshd(i)
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Kill every process on the hosts, delete namespaces, links and files; release the slot."""
        if self._lock is None:
            return
        purge(self.prefix)
        for p in self._sshd:
            p.wait()
        self._sshd = []
        self._lock.close()
        self._lock = None

    def _take_slot(self) -> None:
        LOCKS.mkdir(exist_ok=True)
        for slot in range(SLOTS):
            f = open(LOCKS / f"slot{slot}.lock", "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            self._lock, self.slot, self.prefix = f, slot, f"mlxnb{slot}"
            purge(self.prefix)  # what a crashed session left in this slot
            return
        raise TestHostsError(f"all {SLOTS} test host slots are in use (locks in {LOCKS})")

    def _keys(self) -> None:
        self.key = str(self.dir / "id_ed25519")
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.prefix, "-f", self.key)
        for i in range(self.n):
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / f"host{i}_ed25519"))

    def _try_netns(self) -> bool:
        try:
            self._netns()
        except TestHostsError as e:
            self._fallback_reason = str(e)
            purge(self.prefix, files=False)
            self.namespaces, self.ips = [], []
            return False
        return True

    def _netns(self) -> None:
        net = f"10.213.{7 + self.slot}"
        bridge = f"{self.prefix}-br"
        _run("ip", "link", "add", bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{net}.1/24", "dev", bridge)
        _run("ip", "link", "set", bridge, "up")
        for i in range(self.n):
            ns, outside, inside, ip = (
                f"{self.prefix}-h{i}",
                f"{self.prefix}-v{i}",
                f"{self.prefix}-p{i}",
                f"{net}.{10 + i}",
            )
            _run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            _run("ip", "link", "set", inside, "netns", ns)
            _run("ip", "link", "set", outside, "master", bridge)
            _run("ip", "link", "set", outside, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", inside)
            _run("ip", "-n", ns, "link", "set", inside, "up")
            self.ips.append(ip)
        self.bridge_ip = f"{net}.1"

    def _loopback(self) -> None:
        self.mode = "loopback"
        net = f"127.0.{13 + self.slot}"
        self.ips = [f"{net}.{10 + i}" for i in range(self.n)]
        self.bridge_ip = f"{net}.1"
        self.port = 10022
        message = (
            f"TEST HOSTS WITHOUT NETWORK NAMESPACES ({self._fallback_reason}): sshd runs on {', '.join(self.ips)} "
            "in this machine's own network; hosts are not isolated and share one hostname."
        )
        print("\n" + "!" * 20 + " " + message + " " + "!" * 20, flush=True)
        warnings.warn(message, stacklevel=3)

    def _write_ssh_config(self) -> None:
        entries = [f"Host {name}\n  HostName {ip}\n" for name, ip in zip(self.names, self.ips)]
        common = "".join(f"  {k} {v}\n" for k, v in SSH_OPTIONS.items())
        common += f"  Port {self.port}\n  IdentityFile {self.key}\n"
        # one connection per host, shared by the many short ssh calls of ipyparallel's
        # launcher (each saves a handshake); the master exits 30 s after its last session
        # and purge() ends it sooner (its command line names this temp dir)
        common += f"  ControlMaster auto\n  ControlPath {self.dir}/cm-%C\n  ControlPersist 30\n"
        self.ssh_config = str(self.dir / "ssh_config")
        Path(self.ssh_config).write_text("".join(entries) + f"Host {' '.join(self.names + self.ips)}\n" + common)

    def _start_sshd(self, i: int) -> None:
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        config = self.dir / f"sshd{i}.conf"
        config.write_text(
            f"ListenAddress {self.ips[i]}:{self.port}\n"
            f"HostKey {self.dir / f'host{i}_ed25519'}\n"
            f"PidFile {self.dir / f'sshd{i}.pid'}\n"
            f"AuthorizedKeysFile {self.key}.pub\n"
            "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nUseDNS no\nPrintMotd no\n"
            "MaxStartups 100\nMaxSessions 100\n"
            "Subsystem sftp internal-sftp\n"
            f"SetEnv {MARK}={self.prefix}\n"
        )
        _run(SSHD, "-t", "-f", str(config))
        argv = [SSHD, "-D", "-e", "-f", str(config)]
        if self.mode == "netns":
            # its own hostname and process ids too, as on another machine: a pid an ssh
            # launcher reports means nothing here, and orphans are reaped by sshd (pid 1 there)
            argv = [
                "ip",
                "netns",
                "exec",
                self.namespaces[i],
                "unshare",
                "--uts",
                "--pid",
                "--fork",
                "--mount-proc",
                "sh",
                "-c",
                'hostname "$0" && exec "$@"',
                self.names[i],
                *argv,
            ]
        log = open(self.dir / f"sshd{i}.log", "w")
        self._sshd.append(
            subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), MARK: self.prefix},
            )
        )
        log.close()

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        for i in range(self.n):
            while True:
                p = subprocess.run(self.ssh_argv(i, "true"), capture_output=True, text=True, timeout=timeout)
                if p.returncode == 0:
                    break
                if self._sshd[i].poll() is not None or time.monotonic() > deadline:
                    log = (self.dir / f"sshd{i}.log").read_text().strip()
                    raise TestHostsError(
                        f"sshd of test host {self.names[i]} ({self.ips[i]}) did not accept ssh: "
                        f"{p.stderr.strip()}; sshd log: {log[-800:] or '(empty)'}"
                    )
                time.sleep(0.05)

    # -------------------------------------------------------------- using
    @property
    def ssh_cmd(self) -> list[str]:
        """The ssh command for ipyparallel's ``ssh_cmd``: ``['ssh', '-F', CONFIG]``."""
        return ["ssh", "-F", self.ssh_config]

    def name(self, host: Union[int, str]) -> str:
        return self.names[host] if isinstance(host, int) else host

    def ssh_argv(self, host: Union[int, str], command: str) -> list[str]:
        """argv that runs ``command`` (a shell line) on ``host`` (index or alias)."""
        return [*self.ssh_cmd, self.name(host), command]

    def ssh(self, host: Union[int, str], command: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run ``command`` on ``host`` and wait for it (text output captured)."""
        return subprocess.run(self.ssh_argv(host, command), capture_output=True, text=True, timeout=timeout)

    def processes(self, host: Optional[int] = None) -> list[psutil.Process]:
        """Processes started on the test hosts (all, or host ``host``), sshd's own excluded."""
        ours = {p.pid for p in self._sshd}  # unshare, the parent of each sshd
        procs = []
        for p in psutil.process_iter(["pid", "name"]):
            try:
                if p.pid not in ours and p.info["name"] != "sshd" and p.environ().get(MARK) == self.prefix:
                    procs.append(p)
            except psutil.Error:
                pass
        if host is None or self.mode != "netns":
            return procs
        inside = set(_run("ip", "netns", "pids", self.namespaces[host], check=False).stdout.split())
        return [p for p in procs if str(p.pid) in inside]

    def named(self, name: str) -> list[psutil.Process]:
        """The processes on the test hosts called ``name`` when listed: one that ends meanwhile
        (the shell of a passing ssh command) is skipped, not read after it is gone."""
        return [p for p in self.processes() if p.info["name"] == name]

    def __repr__(self) -> str:
        return f"<TestHosts {self.mode} {dict(zip(self.names, self.ips))} bridge {self.bridge_ip}>"


@pytest.fixture(scope="session")
@starts("ssh")
def ssh_hosts():
    """``ssh_hosts(n)`` gives ``n`` SSH test hosts, made once per session and per ``n``.

    Use it after ``pytest_plugins = ["testhosts"]`` in the test module (or conftest.py):
    as a plugin it is registered once, so every module shares the same hosts.
    """
    made: dict[int, TestHosts] = {}

    def get(n: int = 2) -> TestHosts:
        if n not in made:
            try:
                made[n] = TestHosts(n).start()
            except TestHostsError as e:
                pytest.fail(f"cannot set up {n} SSH test hosts: {e}", pytrace=False)
        return made[n]

    try:
        yield get
    finally:
        for hosts in made.values():
            hosts.close()
