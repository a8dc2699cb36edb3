"""Bad input gets one line before anything starts: the magics' UsageError, the API's ValueError."""

from __future__ import annotations

import doctest
import importlib
import math

import pytest
from conftest import ipython_shell, project_processes
from IPython.core.error import UsageError
from lanes import starts

from mlx_nb import Cluster, batch, bench, magics, model_magics, spec
from mlx_nb import generate as generation
from mlx_nb.batch import generate_batch
from mlx_nb.bench import bench_main, run_bench
from mlx_nb.engines import launch as launchers
from mlx_nb.engines import procs, watchdog
from mlx_nb.generate import generate, load_model
from mlx_nb.serve import serve
from mlx_nb.spec import process_limit
from mlx_nb.widgets import ChatWidget


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
    serving = importlib.import_module("mlx_nb.serve")  # the module (mlx_nb.serve is also its function)
    for module in (spec, bench, launchers, magics, model_magics, watchdog, procs, generation, batch, serving):
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


def test_a_bad_cluster_is_the_same_one_line_from_cluster_and_its_magic(shell):
    for kwargs, line, message in [
        ({"n": 0}, "-n 0", "-n must be a positive number of ranks, got 0"),
        (
            {"hostfile": "h.json", "hosts": "a,b"},
            "--hostfile h.json --hosts a,b",
            "give either --hostfile or --hosts, not both",
        ),
    ]:
        with pytest.raises(ValueError) as info:
            Cluster(**kwargs)
        assert str(info.value) == message
        assert _usage_error(shell, "mlx_cluster", f"start {line}") == message
    assert project_processes() == [] and _no_cluster()


# --------------------------------------------------------- a running cluster
@pytest.fixture(scope="module")
@starts("cluster")
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


# a value the magics refuse is refused, in the same words, by the function they call
@pytest.mark.parametrize(
    "api, magic, message",
    [
        (
            lambda c: generate(c, "Hi", max_tokens=0),
            ("mlx_generate", "--max-tokens 0 Hi", ""),
            "--max-tokens must be at least 1, got 0",
        ),
        (
            lambda c: generate_batch(c, ["Hi"], 8, temperature=9.0),
            ("mlx_batch", "--temperature 9", "Hi"),
            "--temperature must be in [0, 2], got 9.0",
        ),
        (
            lambda c: generate_batch(c, ["Hi"], 0),
            ("mlx_batch", "--max-tokens 0", "Hi"),
            "--max-tokens must be at least 1, got 0",
        ),
        (
            lambda c: ChatWidget(c, max_tokens=-3),
            ("mlx_chat", "--max-tokens -3", ""),
            "--max-tokens must be at least 1, got -3",
        ),
        (lambda c: serve(c, port=70000), ("mlx_serve", "--port 70000", ""), "--port must be 0-65535, got 70000"),
        (
            lambda c: serve(c, port=0, prefill_batch=0),
            ("mlx_serve", "--port 0 --prefill-batch 0", ""),
            "--prefill-batch must be at least 1, got 0",
        ),
        (
            lambda c: serve(c, port=0, gather=-0.5),
            ("mlx_serve", "--port 0 --gather -0.5", ""),
            "--gather must be 0-10 seconds (a request's longest wait for others to share its prefill), got -0.5",
        ),
        (
            lambda c: load_model(c, adapter_path="/nowhere/run"),
            ("mlx_generate", "--load bundled --adapter /nowhere/run", ""),
            "/nowhere/run/adapter_config.json does not exist: adapter_path takes the folder that finetune "
            "(or mlx_lm.lora) wrote, holding adapter_config.json and adapters.safetensors",
        ),
    ],
)
def test_a_bad_value_is_the_same_one_line_from_the_api_and_its_magic_before_any_rank_runs(
    shell, running, api, magic, message
):
    with pytest.raises((ValueError, FileNotFoundError)) as info:  # no model is loaded: a rank would say so
        api(running)
    assert str(info.value) == message
    assert _usage_error(shell, *magic) == message
    assert [r.state for r in running.status()] == ["idle", "idle"]


def test_a_bad_fine_tuning_option_is_one_line_before_any_rank_runs(running):
    from mlx_nb.finetune import finetune

    with pytest.raises(ValueError) as info:
        finetune(running, iters=0)
    assert str(info.value) == "iters=0: it takes a number of steps, 1 or more"
    with pytest.raises(ValueError, match=r"^unknown finetune option iter: the options are model, data, iters, "):
        finetune(running, iter=5)
    with pytest.raises(ValueError, match=r"^learning_rate=-0.1: it takes a positive number$"):
        finetune(running, learning_rate=-0.1)
    assert running.running_job is None
