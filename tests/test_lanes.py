"""The fast lane holds: a test without the marker of what it starts fails, before anything is
started, and a test gets the markers of the fixtures it uses (tests/lanes.py). Each check runs
pytest on a small test file in a process of its own, with the lanes plugin."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest
from conftest import project_processes
from lanes import FAST_LANE

pytest_plugins = ["pytester"]
HERE = Path(__file__).resolve().parent


def run_pytest(pytester: pytest.Pytester, source: str, *args: str, mark: str) -> pytest.RunResult:
    """pytest, with the lanes plugin and the project's markers, on ``source`` as a test file;
    whatever it starts carries ``mark``."""
    pytester.makepyfile(test_inner=source)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items() | {"MLX_NB_TEST_SESSION": mark}.items():
            patch.setenv(name, value)
        return pytester.runpytest_subprocess(
            "-p", "lanes", "-c", str(HERE.parent / "pyproject.toml"), "--rootdir", str(pytester.path), *args
        )


UNMARKED = """
import pytest
from jupyter_client.manager import start_new_kernel

from mlx_nb import Cluster


def test_starts_a_cluster():
    Cluster(n=1, spares=False).start().stop()


def test_starts_a_kernel():
    start_new_kernel(kernel_name="python3")[0].shutdown_kernel(now=True)


def test_starts_a_cluster_and_catches_what_that_raises():
    with pytest.raises(Exception):
        Cluster(n=1, spares=False).start().stop()


@pytest.mark.kernel
def test_marked_for_a_kernel_starts_a_cluster():
    Cluster(n=1, spares=False).start().stop()
"""


def test_a_test_that_starts_a_cluster_or_a_kernel_without_its_marker_fails_and_starts_nothing(pytester):
    mark = uuid.uuid4().hex
    result = run_pytest(pytester, UNMARKED, mark=mark)
    result.assert_outcomes(failed=4)
    out = result.stdout.str()
    for name, what, marker in (
        ("test_starts_a_cluster", "a Cluster (an ipyparallel controller)", "cluster"),
        ("test_starts_a_kernel", "a Jupyter kernel", "kernel"),
        ("test_starts_a_cluster_and_catches_what_that_raises", "a Cluster (an ipyparallel controller)", "cluster"),
        ("test_marked_for_a_kernel_starts_a_cluster", "a Cluster (an ipyparallel controller)", "cluster"),
    ):
        assert re.search(rf"test_inner.py::{name} starts {re.escape(what)} but is not marked '{marker}'", out), out
    assert f'the fast lane (pytest -m "{FAST_LANE}") starts none of them' in out
    assert project_processes(mark) == []


FIXTURES = """
import pytest
from lanes import starts


@pytest.fixture(scope="module")
@starts("cluster")
def ranks():
    pass


@pytest.fixture
def shell(ranks):
    pass


@pytest.fixture
@starts("kernel", "cluster")
def notebook():
    pass


def test_through_another_fixture(shell):
    pass


def test_with_a_notebook(notebook):
    pass


@pytest.mark.ssh
def test_marked_itself():
    pass


def test_pure():
    pass
"""


@pytest.mark.parametrize(
    "expression, selected",
    [
        (FAST_LANE, ["test_pure"]),
        ("cluster", ["test_through_another_fixture", "test_with_a_notebook"]),
        ("kernel", ["test_with_a_notebook"]),
        ("ssh", ["test_marked_itself"]),
    ],
)
def test_a_test_gets_the_markers_of_the_fixtures_it_uses(pytester, expression, selected):
    result = run_pytest(pytester, FIXTURES, "--collect-only", "-q", "-m", expression, mark=uuid.uuid4().hex)
    assert re.findall(r"test_inner\.py::(\w+)", result.stdout.str()) == selected


def test_the_readme_names_the_fast_lane():
    readme = (HERE.parent / "README.md").read_text()
    assert f'scripts/test.sh -m "{FAST_LANE}"' in readme
