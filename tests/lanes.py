"""The test lanes: what a test starts, as pytest markers, and a check that keeps them true.

pyproject.toml registers the markers: ``cluster`` (MLX ranks), ``kernel`` (a Jupyter kernel),
``browser`` (Chromium and JupyterLab), ``ssh`` (the SSH test hosts), and ``gpu``. A test that
starts none of these carries none of the first four, and the fast lane runs exactly those tests:

    pytest -m "not cluster and not kernel and not browser and not ssh"

A test gets a marker from a fixture it uses (directly or through other fixtures) that is
declared with ``@starts(...)``, from ``pytestmark`` in its module, or from its own decorator.
While a test sets up and runs, starting a Cluster (an ipyparallel controller), a Jupyter kernel,
JupyterLab or the SSH test hosts without the matching marker fails it, so a test added without
its marker fails in every run rather than slowing the fast lane down. Tests marked ``gpu`` are
skipped where MLX has no GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import pytest

PROCESSES = ("cluster", "kernel", "browser", "ssh")  # what a test may start, by marker
FAST_LANE = " and ".join(f"not {m}" for m in PROCESSES)


class StartedOutsideItsLane(RuntimeError):
    """A test started a process that its markers do not name."""


def starts(*marks: str) -> Callable:
    """Declare what a fixture starts, under its ``@pytest.fixture``::

        @pytest.fixture(scope="module")
        @starts("cluster")
        def mixed(): ...

    Every test that uses the fixture, directly or through other fixtures, gets these markers.
    """
    if unknown := set(marks) - set(PROCESSES):
        raise ValueError(f"starts{marks}: {sorted(unknown)} is not one of {PROCESSES}")

    def declare(fixture: Callable) -> Callable:
        fixture.starts = marks
        return fixture

    return declare


def process_marks(item: pytest.Item) -> set[str]:
    """The process markers ``item`` carries (its own, its class's and its module's)."""
    return {m.name for m in item.iter_markers() if m.name in PROCESSES}


# ------------------------------------------------------------------ markers from fixtures
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        for defs in info.name2fixturedefs.values() if info else ():
            for mark in getattr(defs[-1].func, "starts", ()):
                item.add_marker(mark)
        if item.get_closest_marker("gpu") and not _gpu():
            item.add_marker(pytest.mark.skip(reason="needs a GPU, and MLX here has none"))


def _gpu() -> bool:
    import mlx.core as mx

    return mx.cuda.is_available() or mx.metal.is_available()


# ------------------------------------------------------------------ the check
class _Lane:
    """The test now setting up or running, and what it started outside its markers."""

    def __init__(self) -> None:
        self.item: Optional[pytest.Item] = None
        self.refused: list[str] = []

    def check(self, what: str, mark: str) -> None:
        __tracebackhide__ = True
        if self.item is None or mark in process_marks(self.item):
            return
        message = (
            f"{self.item.nodeid} starts {what} but is not marked {mark!r}. Mark it "
            f"(@pytest.mark.{mark} on the test, pytestmark = pytest.mark.{mark} in its module, or "
            f'@starts("{mark}") under the @pytest.fixture that starts it), so that the fast lane '
            f'(pytest -m "{FAST_LANE}") starts none of them'
        )
        self.refused.append(message)
        raise StartedOutsideItsLane(message)

    def watch(self, item: pytest.Item):
        """Around one phase of ``item`` (a hook wrapper's body): fail it for what it started."""
        self.item, self.refused = item, []
        try:
            result = yield
        finally:
            self.item, refused = None, self.refused
        if refused:  # also when the test caught the exception
            pytest.fail("\n".join(dict.fromkeys(refused)), pytrace=False)
        return result


LANE = _Lane()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    return (yield from LANE.watch(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    return (yield from LANE.watch(item))


def pytest_configure(config: pytest.Config) -> None:
    """Check every way a test starts a process of a lane: where that process is started."""
    import ipyparallel
    import labbrowser
    import testhosts
    from jupyter_client.provisioning.local_provisioner import LocalProvisioner

    _before(ipyparallel.Cluster, "start_controller", "a Cluster (an ipyparallel controller)", "cluster")
    _before(LocalProvisioner, "launch_kernel", "a Jupyter kernel", "kernel")
    _before(labbrowser.JupyterLab, "start", "JupyterLab", "browser")
    _before(testhosts.TestHosts, "start", "the SSH test hosts", "ssh")


def _before(cls: type, name: str, what: str, mark: str) -> None:
    """Check the lane before ``cls.name`` runs (a coroutine function stays one)."""
    import functools
    import inspect

    original: Any = getattr(cls, name)
    if getattr(original, "lane_checked", False):
        return
    if inspect.iscoroutinefunction(original):

        async def checked(*args, **kwargs):
            __tracebackhide__ = True
            LANE.check(what, mark)
            return await original(*args, **kwargs)

    else:

        def checked(*args, **kwargs):
            __tracebackhide__ = True
            LANE.check(what, mark)
            return original(*args, **kwargs)

    checked = functools.wraps(original)(checked)
    checked.lane_checked = True
    setattr(cls, name, checked)
