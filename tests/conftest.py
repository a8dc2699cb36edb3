"""Shared fixtures: real clusters shared by a module's tests, and a check that nothing is left running."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import time
import uuid
from pathlib import Path

import psutil
import pytest
from IPython.core.error import UsageError
from jupyter_client.manager import start_new_kernel

from mlx_nb import Cluster
from mlx_nb.generate import generate, prompt_cache

# modules import the test hosts' helpers (tests/testhosts.py) before it is loaded as a plugin
pytest.register_assert_rewrite("testhosts", "lanes")
from lanes import starts  # noqa: E402
from waiting import wait_for, wait_until  # noqa: E402, F401 (the tests import them from here)

pytest_plugins = ["lanes"]  # the markers of what a test starts, and their check

_PROJECT = (
    "ipyparallel.engine",
    "ipyparallel.controller",
    "ipyparallel.cluster",
    "ipengine",
    "ipcontroller",
    "mlx_nb.engines.watchdog",
)


# every process this test session starts inherits the mark, orphans included
os.environ["MLX_NB_TEST_SESSION"] = SESSION = uuid.uuid4().hex


def project_processes(session: str = SESSION) -> list[psutil.Process]:
    """Engines, nannies and controllers started by this test session (or marked ``session``)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if not any(k in cmd for k in _PROJECT):
            continue
        try:
            if p.environ().get("MLX_NB_TEST_SESSION") == session:
                found.append(p)
        except psutil.Error:
            pass
    return found


def processes_left(mark: str = SESSION, keep=(), timeout: float = 10.0, find=None) -> list[psutil.Process]:
    """The processes of the session marked ``mark`` (or those ``find()`` lists: a test host's) other
    than the pids in ``keep``, still running after waiting up to ``timeout`` s for them to end;
    ``[]`` as soon as they are gone."""
    find = find or (lambda: project_processes(mark))

    def running() -> list[psutil.Process]:
        return [p for p in find() if p.pid not in keep and _running(p)]

    return [] if wait_until(lambda: not running(), timeout, every=0.2) else running()


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (``item.rep_call``): fixtures read it to save evidence."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="module")
@starts("cluster")
def two_ranks():
    """Two local ranks, shared by the tests of one module."""
    with Cluster(n=2) as c:
        yield c


@pytest.fixture(scope="module")
@starts("cluster")
def four_ranks():
    """Four local ranks, shared by the tests of one module."""
    with Cluster(n=4) as c:
        yield c


SHARED_PAIR = "pipeline_pair"
_pair = pytest.StashKey[Cluster]()
_last_pair_user = pytest.StashKey[pytest.Item]()


@pytest.fixture(scope="session")
@starts("cluster")
def loaded_pipeline_pair(request):
    """The cluster behind ``pipeline_pair``: started and loaded once in a session."""
    from mlx_nb.generate import load_model

    with Cluster(n=2) as c:
        load_model(c, pipeline=True, progress=False)
        request.config.stash[_pair] = c
        yield c


@pytest.fixture(scope="module")
def pipeline_pair(loaded_pipeline_pair):
    """Two local ranks holding the bundled model as a pipeline (its 9 heads do not split over 2),
    shared by the modules that load that model on that layout; each module meets it as loaded
    (its prompt cache empty). Those modules run one after another and the pair stops after the
    last of them (the hooks below): no other test meets it. A module must leave it as it found
    it (that model, that layout, the cache's default limit); one that restarts or stops the
    ranks, or keeps another model loaded, starts a pair of its own."""
    prompt_cache(loaded_pipeline_pair, clear=True)
    return loaded_pipeline_pair


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules whose tests share the pipeline pair run together, where the first of them did."""
    sharing = {i.path for i in items if SHARED_PAIR in i.fixturenames}
    if not sharing:
        return
    first = next(n for n, i in enumerate(items) if i.path in sharing)
    together = [i for i in items if i.path in sharing]
    rest = [i for i in items if i.path not in sharing]
    items[:] = rest[:first] + together + rest[first:]


def pytest_collection_finish(session: pytest.Session) -> None:
    users = [i for i in session.items if SHARED_PAIR in i.fixturenames]
    if users:
        session.config.stash[_last_pair_user] = users[-1]


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop the shared pair after the last module that uses it (trylast: after that module's own
    fixtures, a server on the pair among them, are torn down). The session's teardown stops it
    again, which does nothing to a stopped cluster."""
    last = item.config.stash.get(_last_pair_user, None)
    if last is not None and item.path == last.path and (nextitem is None or nextitem.path != item.path):
        if pair := item.config.stash.get(_pair, None):
            pair.stop()


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running():
    """Fail the session if any engine or controller outlives the tests."""
    yield
    alive = processes_left()
    assert not alive, "processes left running: " + "; ".join(f"{p.pid} {' '.join(p.cmdline())}" for p in alive)


def random_model(path, **shape):
    """A randomly initialised SmolLM2-shaped model folder (with the bundled tokenizer) at ``path``:
    the bundled config with ``shape`` (hidden_size=64, ...) changed. Returns ``path``."""
    import json
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    from mlx_nb.models import bundled_model

    src = bundled_model()
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization", None)
    config.update(shape)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, path / name)
    model_class, args_class = _get_classes(config)
    mx.random.seed(0)
    weights = dict(tree_flatten(model_class(args_class.from_dict(config)).parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 2-layer, randomly initialised SmolLM2-shaped model (with its tokenizer): steps in ms."""
    return random_model(
        tmp_path_factory.mktemp("tiny") / "model",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


def steps_in(run, n: int, timeout: float = 240) -> None:
    """Wait until the notebook has seen step ``n`` of ``run`` (or the run ended)."""
    wait_until(lambda: len(run.history) >= n or run.result is not None or run.error is not None, timeout, every=0.2)
    assert len(run.history) >= n, f"no step {n} within {timeout} s: {run.label.value}"


def ipython_shell():
    """The test IPython shell (IPython's global test app starts once per process)."""
    from IPython import get_ipython
    from IPython.testing.globalipapp import start_ipython

    return start_ipython() or get_ipython()


@contextlib.contextmanager
def magics_on(cluster):
    """The test shell with mlx_nb's magics working on ``cluster`` (a running Cluster)."""
    from mlx_nb import magics

    shell = ipython_shell()
    shell.run_line_magic("load_ext", "mlx_nb")
    magics.use(cluster)
    try:
        yield shell
    finally:
        magics.use(None)


@contextlib.contextmanager
def magic_cluster(line: str):
    """``%mlx_cluster start LINE`` in the test shell; stopped, nothing left, afterwards."""
    from mlx_nb import magics

    shell = ipython_shell()
    shell.run_line_magic("load_ext", "mlx_nb")
    t = time.monotonic()
    shell.run_line_magic("mlx_cluster", f"start {line}")
    print(f"\ncluster ({line}) started in {time.monotonic() - t:.1f} s")
    try:
        yield shell
    finally:
        try:
            magics.current().stop()
        except UsageError:  # stopped by the test already
            pass
        magics.use(None)


class Kernel:
    """A real IPython kernel; its processes carry the test's own mark."""

    def __init__(self, mark: str):
        self.km, self.kc = start_new_kernel(kernel_name="python3", env={**os.environ, "MLX_NB_TEST_SESSION": mark})
        self.pid = int(self.run("import os; print(os.getpid())")[0])

    def run(self, code: str, timeout: float = 180) -> tuple[str, str]:
        """(stdout, error: a traceback or stderr) of one cell."""
        out, err = [], []

        def hook(msg: dict) -> None:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":  # a magic's UsageError comes as stderr text
                (err if content["name"] == "stderr" else out).append(content["text"])
            elif kind == "error":
                err.append("\n".join(content["traceback"]))
            elif kind in ("execute_result", "display_data"):
                out.append(content["data"].get("text/plain", "") + "\n")

        self.kc.execute_interactive(code, output_hook=hook, timeout=timeout)
        return "".join(out).strip(), "\n".join(err)

    def wait_for_output(self, text: str, timeout: float = 60) -> None:
        """Wait until the cell sent with ``self.kc.execute`` has printed ``text``."""
        seen: list[str] = []

        def printed() -> bool:
            try:
                msg = self.kc.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                return False
            if msg["msg_type"] == "stream":
                seen.append(msg["content"]["text"])
            return text in "".join(seen)

        wait_for(printed, timeout, f"the kernel to print {text!r}", every=0)

    def kill(self, reap: bool = True) -> None:
        """SIGKILL the kernel. Unreaped (``reap=False``) it stays a zombie, as a killed kernel does
        until the notebook server's kernel manager waits for it (``close`` does here)."""
        p = psutil.Process(self.pid)
        os.kill(self.pid, signal.SIGKILL)
        if reap:
            psutil.wait_procs([p], timeout=10)
            return
        wait_until(lambda: p.status() == psutil.STATUS_ZOMBIE, 10, every=0.02)
        assert p.status() == psutil.STATUS_ZOMBIE

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture
@starts("kernel", "cluster")
def execute_notebook():
    """``execute_notebook(path, ...)``: a notebook run as a person runs it (see :func:`run_notebook`)."""
    return run_notebook


def run_notebook(path, *, parameters: str | None = None, nb=None, timeout: float = 300, restart_at: str | None = None):
    """Execute the notebook at ``path`` cell by cell in a new kernel whose folder is the notebook's,
    and return it with its outputs. ``parameters`` replaces the cell tagged "parameters"; ``nb`` is
    the notebook read from ``path`` and changed by the test. With ``restart_at`` (a cell's tag) it
    runs as a person's who restarts the kernel there: the cells before that cell in one kernel,
    which is then killed, the rest in a new one."""
    import nbclient
    import nbformat

    nb = nb if nb is not None else nbformat.read(path, as_version=4)
    if parameters is not None:
        next(c for c in nb.cells if "parameters" in c.metadata.get("tags", [])).source = parameters
    resources = {"metadata": {"path": str(Path(path).parent)}}
    if restart_at is None:
        nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", resources=resources).execute()
        return nb
    at = next(i for i, c in enumerate(nb.cells) if restart_at in c.metadata.get("tags", []))
    for cells in (range(at), range(at, len(nb.cells))):
        client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", resources=resources)
        with client.setup_kernel():
            for i in cells:
                if nb.cells[i].cell_type == "code":
                    client.execute_cell(nb.cells[i], i)
            os.kill(client.km.provisioner.process.pid, signal.SIGKILL)  # the restart: nothing runs at exit
    return nb


# ------------------------------------------------------- the prompt cache's tests
CHAT_TOKENS = 12
CHAT_SYSTEM = (
    "You are the guide of a lighthouse museum. Visitors ask about lamps, lenses, keepers, storms "
    "and ships. Answer in one or two short sentences, plainly, without lists. " * 6
)
CHAT_TURNS = ["What is a Fresnel lens?", "Who invented it?", "Why do lighthouses blink?"]
# the bundled model's KV bytes per token in one process: 30 layers x keys and values x 3 heads
# x 64 dimensions, in 2-byte or 4-byte floats (the ranks load the dense float32 copy with OpenBLAS)
KV_BYTES_PER_TOKEN = {30 * 2 * 3 * 64 * b for b in (2, 4)}


def uncached(cluster, prompts: list, n: int = CHAT_TOKENS) -> list:
    """Each prompt's greedy reply (stats) on ``cluster`` with its prompt cache off: every prompt
    prefilled whole, as before the cache (that sharded generation equals one mlx-lm process is
    test_generate's)."""
    prompt_cache(cluster, limit=0)
    try:
        out = [generate(cluster, p, n, quiet=True) for p in prompts]
    finally:
        prompt_cache(cluster, limit="auto")
    assert all(s.cached_tokens == 0 for s in out)
    return out


def conversation(cluster, questions: list[str] = CHAT_TURNS, n: int = CHAT_TOKENS) -> tuple[list, object]:
    """Chat turns through ``generate``: each turn's stats and the tokens its whole conversation
    gives with the cache off; and the cache's report after the turns."""
    messages = [{"role": "system", "content": CHAT_SYSTEM}]
    turns, prompts = [], []
    for question in questions:
        messages.append({"role": "user", "content": question})
        turns.append(generate(cluster, messages, n, quiet=True))
        prompts.append(messages[:])
        messages.append({"role": "assistant", "content": turns[-1].text})
    report = prompt_cache(cluster)
    refs = uncached(cluster, prompts, n)
    return [(stats, ref.tokens, ref.prompt_tokens) for stats, ref in zip(turns, refs)], report
