"""Bad input gets one line before anything starts: the magics' UsageError, the API's ValueError."""

from __future__ import annotations

import doctest
import math

import pytest
from conftest import ipython_shell, project_processes
from IPython.core.error import UsageError

from mlx_nb import Cluster, bench, magics, spec
from mlx_nb.bench import bench_main, run_bench
from mlx_nb.engines import launch as launchers
from mlx_nb.spec import process_limit


@pytest.fixture(scope="module")
def shell():
    shell = ipython_shell()
    shell.run_line_magic("load_ext", "mlx_nb")
    return shell


def _usage_error(shell, magic: str, line: str, cell: str = "") -> str:
    with pytest.raises(UsageError) as info:
        if cell:
            shell.run_cell_magic(magic, line, cell)
        else:
            shell.run_line_magic(magic, line)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_the_docstring_examples_of_the_checks_run():
    for module in (spec, bench, launchers, magics):
        assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0, module.__name__


# ------------------------------------------------------- nothing running yet
def _no_cluster() -> bool:
    """The magics have no cluster: nothing was started."""
    with pytest.raises(UsageError, match="no MLX cluster is running"):
        magics.current()
    return True


def test_an_invalid_env_name_is_refused_before_the_controller_starts(shell):
    text = _usage_error(shell, "mlx_cluster", "start -n 2 --env BAD-NAME=1")
    assert text == (
        "'BAD-NAME' is not a valid environment variable name: use letters, digits and _, "
        "not starting with a digit (e.g. MY_FLAG=1)"
    )
    assert "'1X'" in _usage_error(shell, "mlx_cluster", "start -n 2 --env 1X=1")
    assert project_processes() == [] and _no_cluster()
    with pytest.raises(ValueError, match="'A B' is not a valid environment variable name"):
        Cluster(n=2, env={"A B": "1"})
    with pytest.raises(ValueError, match="give it as a string"):
        Cluster(n=2, env={"LEVEL": 3})


def test_more_ranks_than_the_machine_can_run_are_refused_naming_the_limit(shell):
    fits = process_limit() // 2  # a rank and its warm spare each
    text = _usage_error(shell, "mlx_cluster", f"start -n {fits + 1}")
    assert text.startswith(
        f"{fits + 1} ranks on this machine are too many: each rank is an engine process plus a warm spare"
    )
    assert f"at most {process_limit()} fit" in text and f"Use {fits} ranks or fewer" in text
    text = _usage_error(shell, "mlx_cluster", "start --hosts 10.0.0.1,10.0.0.2 -n 1000")
    assert text.startswith("1000 ranks on host '10.0.0.1' are too many")
    assert project_processes() == [] and _no_cluster()
    Cluster(n=fits)  # not started: only checked
    Cluster(n=fits * 2, spares=False)
    with pytest.raises(ValueError, match="each rank is an engine process \\("):
        Cluster(n=fits * 2 + 1, spares=False)


def test_a_sweep_larger_than_memory_is_refused_by_the_cli_before_ranks_start(capsys):
    assert bench_main(["-n", "2", "--sizes", "1KB-1TB"]) == 2
    err = capsys.readouterr().err
    assert "--sizes up to 1.0 TB need 4.0 TB of memory on this machine" in err and "is available" in err
    assert "Starting" not in err and project_processes() == []


# --------------------------------------------------------- a running cluster
@pytest.fixture(scope="module")
def running(shell):
    with Cluster(n=2, spares=False) as c:
        magics.use(c)
        yield c
    magics.use(None)


@pytest.mark.parametrize(
    "value, message",
    [
        ("nan", "--timeout must be a finite number of seconds, got nan"),
        ("inf", "--timeout must be a finite number of seconds, got inf"),
        ("-1", "--timeout must be positive seconds, got -1"),
        ("0", "--timeout must be positive seconds, got 0"),
    ],
)
def test_a_timeout_that_could_never_fire_is_refused(shell, running, value, message):
    assert _usage_error(shell, "mlx_dist", f"--timeout {value}", "print('ran')") == message


def test_the_api_refuses_the_same_timeouts(running):
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="timeout must be"):
            running.run("print('ran')", timeout=bad)
    assert running.run("rank + 1", timeout=30).value["text/plain"] == "1"


def test_a_sweep_larger_than_memory_is_refused_naming_size_and_memory(shell, running):
    text = _usage_error(shell, "mlx_bench", "--sizes 1KB-1TB")
    assert text.startswith("--sizes up to 1.0 TB need 4.0 TB of memory on this machine: each of its 2 ranks")
    assert "is available; use sizes up to" in text
    with pytest.raises(ValueError, match="--sizes up to 1.0 TB need 4.0 TB"):
        run_bench(running, "1KB-1TB", progress=False)
    assert [r.state for r in running.status()] == ["idle", "idle"]
