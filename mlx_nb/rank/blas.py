"""Which BLAS a rank's MLX runs: an optimized one on Linux CPUs, not the wheel's reference BLAS.

The ``mlx[cpu]`` wheel for Linux bundles the netlib reference BLAS
(``mlx_cpu.libs/libblas-*.so.3.10.0``): a 1024x1024 float32 matmul runs at about
5 GFLOP/s where OpenBLAS runs it at 80-160. MLX calls ``cblas_sgemm`` and LAPACK by
name, and the dynamic linker looks names up in the global scope before a library's
own dependencies, so a BLAS loaded with ``RTLD_GLOBAL`` before ``import mlx.core``
takes every call (loaded after, it takes none: MLX's symbols are bound by then).

Stdlib only and no import of mlx_nb: :func:`use` runs first thing in a rank, before
anything imports MLX. ``MLX_NB_BLAS`` chooses: unset or ``auto``, Debian's OpenBLAS
(``apt-get install libopenblas0-pthread``) found by its library name; a path, that
library; ``off``, the bundled reference BLAS. BLAS threads per rank are the cores
this process may run on over ``MLX_NB_RANKS_ON_HOST`` (ranks sharing the host, set
by the notebook), unless ``OPENBLAS_NUM_THREADS`` is set. On macOS nothing changes:
MLX runs Accelerate (and Metal).

    >>> info = use()          # before import mlx.core
    >>> import mlx.core as mx
    >>> str(current())        # doctest: +SKIP
    'OpenBLAS 0.3.21 (Haswell), 1 thread'
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import sys
import threading
from dataclasses import asdict, dataclass, field
from typing import Optional

ENV = "MLX_NB_BLAS"
RANKS_ENV = "MLX_NB_RANKS_ON_HOST"
THREADS_ENV = "OPENBLAS_NUM_THREADS"
INSTALL = "apt-get install libopenblas0-pthread"
# the sonames that OpenBLAS packages install (Debian/Ubuntu, Fedora's pthread build, a plain make install)
OPENBLAS_NAMES = ("libopenblas.so.0", "libopenblasp.so.0", "libopenblas.so")
# where distributions put them when ld.so.cache does not list them
OPENBLAS_DIRS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread",
    "/usr/lib64",
    "/usr/local/lib",
    "/opt/OpenBLAS/lib",
)
REFERENCE = "reference BLAS (bundled with mlx)"


@dataclass
class BlasInfo:
    """The BLAS this process's MLX calls: ``optimized`` is False for the wheel's reference BLAS.

    ``threads`` is the BLAS's thread count (0: not known); ``note`` says why a wanted
    library is not in use (empty when all is as asked); ``system`` is ``platform.system()``.
    """

    name: str
    path: str = ""
    threads: int = 0
    optimized: bool = False
    note: str = ""
    system: str = field(default_factory=platform.system)

    def __str__(self) -> str:
        threads = f", {self.threads} thread{'s' * (self.threads != 1)}" if self.threads else ""
        return f"{self.name}{threads}"

    def to_dict(self) -> dict:
        return asdict(self)


# one per process, not per cluster: a library loaded RTLD_GLOBAL stays for the process's life
# (a restart is a new engine process); and this file runs by path in preflight, importing no mlx_nb
_used: Optional[BlasInfo] = None
_lock = threading.Lock()  # the engine's warm thread and its group init may both ask


def use() -> BlasInfo:
    """Load the BLAS that ``MLX_NB_BLAS`` asks for, globally, so MLX's BLAS calls go to it.

    Call before ``import mlx.core`` (later it changes nothing, and says so in ``note``).
    Idempotent: later calls return the first call's record. Never raises: a library that
    cannot be loaded leaves the reference BLAS, with the reason in ``note``.

    >>> use().optimized       # doctest: +SKIP
    True
    """
    with _lock:
        return _use()


def _use() -> BlasInfo:
    global _used
    if _used is not None:
        return _used
    if sys.platform != "linux":
        _used = _platform_blas()
        return _used
    choice = os.environ.get(ENV, "auto").strip() or "auto"
    if choice.lower() == "off":
        _used = BlasInfo(REFERENCE, note=f"{ENV}=off")
        return _used
    if "mlx.core" in sys.modules:
        _used = current()
        if not _used.optimized:
            _used.note = "mlx.core was imported before mlx_nb could load an optimized BLAS"
        return _used
    threads, chosen = _threads(), THREADS_ENV not in os.environ
    if threads and chosen:
        os.environ[THREADS_ENV] = str(threads)  # OpenBLAS reads it when it loads
    candidates = [choice] if choice.lower() != "auto" else _openblas_candidates()
    errors = []
    for path in candidates:
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
            if not hasattr(lib, "cblas_sgemm"):
                errors.append(f"{path} has no cblas_sgemm, which MLX calls")
                continue
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # the same handle, now global
        except OSError as e:
            errors.append(str(e))
            continue
        if threads and chosen and hasattr(lib, "openblas_set_num_threads"):
            lib.openblas_set_num_threads(threads)  # in case it was loaded (locally) before
        _used = _describe(lib, _library_path(lib, path))
        return _used
    if choice.lower() == "auto":
        note = f"no OpenBLAS found: {INSTALL}"
    else:
        note = f"{ENV}={choice} could not be loaded ({'; '.join(errors)})"
    _used = BlasInfo(REFERENCE, note=note)
    return _used


def current() -> BlasInfo:
    """The BLAS this process's MLX runs (after :func:`use`, its record).

    Without :func:`use`: a ``cblas_sgemm`` in the global scope (``LD_PRELOAD``, a
    library loaded globally before MLX) is the one MLX calls; else the wheel's own.
    """
    if _used is not None:
        return _used
    if sys.platform != "linux":
        return _platform_blas()
    found = _global_symbol_library("cblas_sgemm")
    if found is not None:
        return _describe(ctypes.CDLL(found), found)
    bundled = [p for p in _mapped() if re.search(r"mlx_cpu\.libs/libblas", p)]
    return BlasInfo(REFERENCE, bundled[0] if bundled else "")


def probe() -> dict:
    """What :func:`use` would find here, loading nothing globally (for preflight over ssh).

    >>> probe()["system"]     # doctest: +SKIP
    'Linux'
    """
    found: dict = {"cores": _cores(), ENV: os.environ.get(ENV, "")}
    if sys.platform != "linux":
        return {**found, **_platform_blas().to_dict()}
    choice = found[ENV].strip() or "auto"
    if choice.lower() == "off":
        return {**found, **BlasInfo(REFERENCE, note=f"{ENV}=off").to_dict()}
    for path in [choice] if choice.lower() != "auto" else _openblas_candidates():
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
        except OSError:
            continue
        if hasattr(lib, "cblas_sgemm"):
            return {**found, **_describe(lib, _library_path(lib, path)).to_dict(), "threads": 0}
    note = f"no OpenBLAS found: {INSTALL}" if choice.lower() == "auto" else f"{ENV}={choice} could not be loaded"
    return {**found, **BlasInfo(REFERENCE, note=note).to_dict()}


def threads_per_rank(cores: int, ranks_on_host: int) -> int:
    """BLAS threads for each of ``ranks_on_host`` ranks sharing ``cores``: at least 1.

    >>> threads_per_rank(16, 4)
    4
    """
    return max(1, cores // max(1, ranks_on_host))


# ------------------------------------------------------------------ helpers
def _platform_blas() -> BlasInfo:
    if sys.platform == "darwin":
        return BlasInfo("Accelerate (macOS)", optimized=True)
    return BlasInfo(REFERENCE, note=f"{sys.platform}: mlx_nb loads no BLAS here")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _threads() -> int:
    if os.environ.get(THREADS_ENV, "").isdigit():
        return int(os.environ[THREADS_ENV])
    ranks = os.environ.get(RANKS_ENV, "")
    return threads_per_rank(_cores(), int(ranks)) if ranks.isdigit() else 0


def _openblas_candidates() -> list[str]:
    names = list(OPENBLAS_NAMES)  # dlopen finds these through ld.so.cache and LD_LIBRARY_PATH
    names += [os.path.join(d, n) for d in OPENBLAS_DIRS for n in OPENBLAS_NAMES if os.path.exists(os.path.join(d, n))]
    return names


def _describe(lib: ctypes.CDLL, path: str) -> BlasInfo:
    """Name and threads of a loaded BLAS: OpenBLAS tells its version and CPU kernel."""
    name, threads = os.path.basename(path), 0
    if hasattr(lib, "openblas_get_config"):
        lib.openblas_get_config.restype = ctypes.c_char_p
        config = (lib.openblas_get_config() or b"").decode(errors="replace").split()
        name = " ".join(config[:2]) or "OpenBLAS"
        if hasattr(lib, "openblas_get_corename"):
            lib.openblas_get_corename.restype = ctypes.c_char_p
            name += f" ({(lib.openblas_get_corename() or b'?').decode(errors='replace')})"
    if hasattr(lib, "openblas_get_num_threads"):
        threads = int(lib.openblas_get_num_threads())
    return BlasInfo(name, path, threads, optimized=True)


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _symbol_file(address: int) -> Optional[str]:
    """The file of the loaded library that holds ``address`` (dladdr)."""
    dladdr = ctypes.CDLL(None).dladdr
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    info = _DlInfo()
    if not dladdr(ctypes.c_void_p(address), ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(info.dli_fname.decode())


def _library_path(lib: ctypes.CDLL, name: str) -> str:
    return _symbol_file(ctypes.cast(lib.cblas_sgemm, ctypes.c_void_p).value) or name


def _global_symbol_library(symbol: str) -> Optional[str]:
    """The library that a global lookup of ``symbol`` finds (what MLX binds to), if any."""
    try:
        fn = getattr(ctypes.CDLL(None), symbol)
    except AttributeError:
        return None
    return _symbol_file(ctypes.cast(fn, ctypes.c_void_p).value)


def _mapped() -> list[str]:
    """The files mapped into this process (Linux)."""
    try:
        with open("/proc/self/maps") as f:
            return list(dict.fromkeys(line.split()[-1] for line in f if "/" in line))
    except OSError:
        return []


if __name__ == "__main__":  # preflight runs this file by path: one JSON line
    print(json.dumps(probe()))


def what_computes() -> str:
    """What runs this process's matmuls, for a benchmark's title: the GPU where MLX's default
    device is one (its name), else the CPU's BLAS (:func:`current`)."""
    import mlx.core as mx

    if mx.default_device().type == mx.gpu:
        name = mx.device_info().get("device_name", "GPU")
        return f"{name}, MLX {mx.__version__}"
    return f"{current()}, MLX {mx.__version__}"
