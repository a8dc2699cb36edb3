"""Output as users produce it, and values as users make them: through real engines (and, where
the notebook's own namespace matters, a real kernel)."""

from __future__ import annotations

import io
import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import Kernel, project_processes
from lanes import starts

from mlx_nb import DistCellError
from mlx_nb.generate import load_model


class _Arrivals(io.StringIO):
    """stdout that remembers when each write came."""

    def __init__(self):
        super().__init__()
        self.times: list[tuple[float, str]] = []

    def write(self, text):
        self.times.append((time.monotonic(), text))
        return super().write(text)


def _capture(run):
    out, old = _Arrivals(), sys.stdout
    sys.stdout = out
    try:
        t0 = time.monotonic()
        run()
        return out, t0, time.monotonic()
    finally:
        sys.stdout = old


def test_a_progress_line_updates_in_place_and_nothing_after_it_is_lost(two_ranks):
    code = "for t in ('loading  10%\\r', 'loading 100%\\r', 'weights ready, 42 layers\\n', 'answer: 7\\n'):\n    print(t, end='')"
    out, _, _ = _capture(lambda: two_ranks.run(code))
    # one shown rank's text goes through as written: Jupyter draws the \r in place
    assert out.getvalue() == "loading  10%\rloading 100%\rweights ready, 42 layers\nanswer: 7\n"
    out, _, _ = _capture(lambda: two_ranks.run(code, ranks="all"))
    assert out.getvalue().splitlines() == ["[ranks 0-1] weights ready, 42 layers", "[ranks 0-1] answer: 7"]


def test_with_ranks_all_a_line_arrives_as_it_is_printed(two_ranks):
    code = "import time\nfor i in range(5):\n    if rank == 0:\n        print(f'tick {i}', flush=True)\n    time.sleep(0.5)"
    out, t0, end = _capture(lambda: two_ranks.run(code, ranks="all"))
    ticks = [(t, text) for t, text in out.times if "tick" in text]
    assert [text for _, text in ticks][0].startswith("[rank 0] tick 0")
    first = ticks[0][0]
    print(f"first tick after {first - t0:.2f} s, cell ended after {end - t0:.2f} s")
    assert end - first > 1.0  # it came while rank 0 was still printing, not with the rest at the end


def test_a_flood_of_output_is_cut_at_the_limit_and_says_so(two_ranks, capsys):
    t0 = time.perf_counter()
    two_ranks.run("for i in range(50_000):\n    print(f'line {i:06d} ' + 'x' * 200)", ranks="all")
    took = time.perf_counter() - t0
    out, err = capsys.readouterr()
    print(f"50,000 lines per rank: {took:.1f} s, {len(out) / 1e6:.1f} MB shown")
    assert len(out) < 2 * 4.3e6  # each rank's 4 MB, labelled
    assert "[rank 0] output cut: " in err and "more not shown (a rank sends at most 4.0 MB of output per cell" in err
    assert out.rstrip().splitlines()[-1].startswith("[rank")  # whole lines, up to the cut


def test_a_figure_returned_by_rank_0_shows_once_without_its_repr(two_ranks):
    from IPython.core.interactiveshell import InteractiveShell

    shown = []
    pub = InteractiveShell.instance().display_pub
    old, pub.publish = pub.publish, (lambda data, *a, **k: shown.append(data))
    try:
        result = two_ranks.run("import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([0, 1])\nfig")
    finally:
        pub.publish = old
    assert [d for d in shown if "image/png" in d] and len(shown) == 1
    assert result.value is None  # no '<Figure size ...>' line after the picture


def test_a_failed_load_keeps_the_load_before_as_the_setup_replayed(two_ranks, tmp_path):
    loaded = load_model(two_ranks, pipeline=True, progress=False)
    # a config and safetensors headers that the split check and the plan read, and no weights to load
    broken = tmp_path / "no-weights"
    broken.mkdir()
    shutil.copy(Path(loaded.model) / "config.json", broken / "config.json")
    with open(Path(loaded.model) / "model.safetensors", "rb") as f:
        head = f.read(8)
        (broken / "model.safetensors").write_bytes(head + f.read(int.from_bytes(head, "little")))
    with pytest.raises(DistCellError):
        load_model(two_ranks, str(broken), pipeline=True, progress=False)
    assert [c.key for c in two_ranks.setup_cells] == ["load_model"]
    two_ranks.restart()  # the setup replayed is the model that loaded
    from mlx_nb.generate import generate

    assert (
        "Paris"
        in generate(two_ranks, [{"role": "user", "content": "What is the capital of France?"}], 8, quiet=True).text
    )


# ------------------------------------------------------------------ a real kernel
@pytest.fixture(scope="module")
@starts("kernel", "cluster")
def kernel():
    mark = uuid.uuid4().hex
    k = Kernel(mark)
    k.run("%load_ext mlx_nb\n%mlx_cluster start -n 2")
    yield k
    k.run("%mlx_cluster stop")
    k.close()
    assert project_processes(mark) == []


def test_values_of_notebook_classes_and_functions_travel_both_ways(kernel):
    out, err = kernel.run(
        "from dataclasses import dataclass\n"
        "@dataclass\nclass Cfg:\n    lr: float\n    layers: int\n"
        "cfg = Cfg(1e-3, 4)\nscale = lambda x: x * 10\n"
        "%mlx_push cfg scale Cfg"
    )
    assert not err, err
    out, err = kernel.run("%%mlx_dist --pull back\nback = Cfg(cfg.lr * 2, scale(cfg.layers))")
    assert not err, err
    assert kernel.run("print(back)")[0] == "Cfg(lr=0.002, layers=40)"


def test_a_value_that_cannot_travel_is_named_in_one_line(kernel):
    _, err = kernel.run("g = (i for i in range(3))\n%mlx_push g")
    assert "g (generator) cannot be sent to the ranks: TypeError: cannot pickle 'generator' object" in err
    assert "Traceback" not in err
    _, err = kernel.run("%%mlx_dist\nimport threading\nlock = threading.Lock()")
    assert not err
    _, err = kernel.run("lock = %mlx_pull lock")
    assert "lock on rank 0 (lock) cannot travel to the notebook" in err and "Traceback" not in err
