"""The notebook UI in a real browser: JupyterLab in headless Chromium runs
tests/notebooks/browser.ipynb one cell at a time, as a person would, and each test
checks what that person sees on the page.

The tests share one JupyterLab, one browser tab and one kernel (2 ranks) and run
in file order: each runs the next cells of the notebook, so run the module whole.
On a failure the page's screenshot and HTML are saved in tests/browser-artifacts/;
the widgets' screenshots are always saved there, and into docs/ with
MLX_NB_SCREENSHOTS=docs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from labbrowser import INSTALL, JupyterLab, NotebookPage, chromium, missing_parts, wait_for

HERE = Path(__file__).resolve().parent
NOTEBOOK = HERE / "notebooks" / "browser.ipynb"
ARTIFACTS = HERE / "browser-artifacts"
DOCS = HERE.parent / "docs" if os.environ.get("MLX_NB_SCREENSHOTS") == "docs" else None
SOURCES = ["".join(c["source"]) for c in json.loads(NOTEBOOK.read_text())["cells"]]
MAX_TOKENS = 1000  # the chat cell's --max-tokens: a long reply that only Stop ends early
pytestmark = [pytest.mark.browser, pytest.mark.kernel, pytest.mark.cluster]  # JupyterLab runs the notebook


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The test notebook open in JupyterLab in headless Chromium; all of it shut down afterwards."""
    missing = missing_parts()
    if missing:
        pytest.fail(f"the browser tests need {', '.join(missing)}: {INSTALL}", pytrace=False)
    home = tmp_path_factory.mktemp("jupyterlab")
    root = home / "notebooks"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)  # JupyterLab autosaves: never the committed copy
    lab = JupyterLab(root, home)
    driver, started = None, time.monotonic()
    try:
        lab.start()
        driver = chromium(home / "chromium")  # while JupyterLab starts
        lab.wait_ready()
        notebook = NotebookPage(driver, SOURCES, ARTIFACTS)
        try:
            notebook.open(lab.url(f"lab/tree/{NOTEBOOK.name}"))
        except Exception:
            print("\nsaved:", *notebook.save("opening"))
            raise
        yield notebook
    finally:
        if driver is not None:
            driver.quit()
        lab.stop()
        print(f"\nbrowser tests: {time.monotonic() - started:.0f} s from JupyterLab's start to its stop")


@pytest.fixture(autouse=True)
def evidence_on_failure(request, page):
    """The page's screenshot and HTML when a test fails, named after it."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"\n{request.node.name} failed; saved:", *page.save(request.node.name))


def widget(page: NotebookPage, cell: int, css: str, timeout: float = 30):
    """The first element matching ``css`` in cell ``cell``'s output, once it is there."""
    from selenium.webdriver.common.by import By

    return wait_for(lambda: page.cell(cell).find_elements(By.CSS_SELECTOR, css), timeout, f"{css} in cell {cell}")[0]


def button(element, label: str):
    from selenium.webdriver.common.by import By

    return next(b for b in element.find_elements(By.CSS_SELECTOR, "button") if b.text.strip() == label)


def status_rows(page: NotebookPage, cell: int) -> list[list[str]]:
    """The status panel's rows (rank, host, pid, memory, peak, state) in cell ``cell``, read at one
    instant (the panel re-renders every second)."""
    return page.driver.execute_script(
        "const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[arguments[0]];"
        "return [...cell.querySelectorAll('.widget-html tbody tr')].map(tr => [...tr.cells].map(td => td.innerText));",
        cell,
    )


def both_at_work(rows: list[list[str]], with_memory: bool = False) -> bool:
    """Both ranks shown at work ("busy, line 2", "in all_sum #7"), their live memory in MB or GB if asked."""
    return len(rows) == 2 and all(r[5] != "idle" and (not with_memory or r[3][-2:] in ("MB", "GB")) for r in rows)


def test_the_cluster_starts_and_its_table_has_a_row_per_rank(page):
    cell = page.run_and_wait(page.index("%load_ext mlx_nb"), timeout=90)
    assert cell["errors"] == []
    assert "Cluster ready in" in cell["text"]
    assert re.findall(r"^(\d)\t.*\tidle(?:\t.*)?$", cell["text"], re.MULTILINE) == ["0", "1"]  # rank ... state


def test_rank_0_lines_appear_while_the_cell_still_runs(page):
    i = page.index("%%mlx_dist\nimport time")
    page.run(i)
    seen = wait_for(
        lambda: (s := page.read(i))["prompt"] == "[*]:" and "rank 0: step 1 of 10" in s["text"] and s,
        30,
        "rank 0's first line while the cell runs ([*])",
    )
    assert "step 10 of 10" not in seen["text"]
    done = wait_for(lambda: page.ran(i), 30, "the cell to finish")
    assert done["text"].split("\n")[:10] == [f"rank 0: step {k} of 10" for k in range(1, 11)]
    assert "rank 1" not in done["text"] and done["errors"] == []


def test_the_status_panel_has_a_row_per_rank_and_updates(page):
    i = page.index("%mlx_cluster status --watch")
    assert page.run_and_wait(i, timeout=30)["errors"] == []
    panel = widget(page, i, ".widget-html")
    assert [row[0] for row in status_rows(page, i)] == ["0", "1"]
    first = re.search(r"updated (\d\d:\d\d:\d\d)", panel.text).group(1)
    wait_for(
        lambda: re.search(r"updated (\d\d:\d\d:\d\d)", panel.text).group(1) != first,
        10,
        f"the panel's 'updated {first}' to change",
    )


def test_a_figure_returned_on_rank_0_is_an_image_and_nothing_else(page):
    cell = page.run_and_wait(page.index("%%mlx_dist\nimport matplotlib"), timeout=60)
    assert cell["errors"] == []
    assert len(cell["images"]) == 1
    assert "<Figure size" not in cell["text"], f"a text line follows the figure: {cell['text']!r}"


def test_the_status_panel_shows_the_ranks_busy_while_the_model_loads(page):
    status, load = page.index("%mlx_cluster status --watch"), page.index("%mlx_generate --load")
    page.run(load)
    wait_for(
        lambda: page.read(load)["prompt"] == "[*]:" and both_at_work(status_rows(page, status)),
        60,
        "both ranks busy in the status panel while the model loads",
    )
    cell = wait_for(lambda: page.ran(load), 150, "the model to load")
    assert cell["errors"] == []
    assert "Loaded bundled (pipeline) on 2 ranks" in cell["text"]


def chat(page: NotebookPage, cell: int) -> tuple[list[str], int]:
    """The chat's replies so far (the text after each "model:") and how many are finished (a stats line each)."""
    from selenium.webdriver.common.by import By

    transcript = widget(page, cell, ".widget-html")
    return transcript.text.split("model:")[1:], len(transcript.find_elements(By.TAG_NAME, "small"))


def test_the_chat_box_answers_a_question_typed_into_it(page):
    i = page.index("%mlx_chat")
    assert page.run_and_wait(i, timeout=30)["errors"] == []
    widget(page, i, ".widget-text input").send_keys("What is the capital of France?\n")
    wait_for(lambda: chat(page, i)[1] == 1, 90, "the chat's first reply to finish")
    answer = chat(page, i)[0][0]
    assert "Paris" in answer, f"the chat answered {answer!r}"
    assert button(widget(page, i, ".widget-vbox"), "Send").is_enabled()


def test_stop_ends_a_long_chat_reply_early(page):
    i = page.index("%mlx_chat")
    box = widget(page, i, ".widget-vbox")
    widget(page, i, ".widget-text input").send_keys("Tell me a long story.")
    button(box, "Send").click()
    wait_for(
        lambda: len(replies := chat(page, i)[0]) == 2 and len(replies[1].split()) >= 3,
        60,
        "the long reply's first words",
    )
    button(box, "Stop").click()
    wait_for(lambda: chat(page, i)[1] == 2, 30, "the long reply to end after Stop")
    stats = chat(page, i)[0][1].strip().splitlines()[-1]
    generated = int(re.search(r"generated (\d+) tok", stats).group(1))
    assert "(stopped)" in stats and generated < MAX_TOKENS, stats
    assert button(box, "Send").is_enabled() and not button(box, "Stop").is_enabled()
    page.screenshot(box, "chat-box", DOCS)


def test_the_finetuning_panel_draws_its_loss_curve(page):
    i = page.index("import os\n\nfrom mlx_nb.finetune")
    assert page.run_and_wait(i, timeout=30)["errors"] == []
    panel = widget(page, i, ".widget-vbox")
    wait_for(lambda: page.read(i)["images"], 150, "the loss curve's image in the panel")
    status = page.index("%mlx_cluster status --watch")
    wait_for(
        lambda: both_at_work(status_rows(page, status), with_memory=True),
        30,
        "the status panel's live memory of both ranks while they train",
    )
    page.screenshot(widget(page, status, ".widget-html"), "status-panel", DOCS)
    wait_for(lambda: panel.text.startswith("done:"), 150, "the fine-tuning to finish")
    assert panel.text.startswith("done: 2 steps in"), panel.text
    assert len(page.read(i)["images"]) == 1
    page.screenshot(panel, "finetune-panel", DOCS)


def test_generate_answers_a_question_that_ends_in_a_question_mark(page):
    cell = page.run_and_wait(page.index("%mlx_generate --max-tokens 12"), timeout=90)
    assert cell["errors"] == []
    assert "Paris" in cell["text"], f"%mlx_generate ... France? printed {cell['text']!r}"


def test_the_server_answers_clients_and_its_status_shows_them_batched(page):
    from selenium.webdriver.common.by import By

    started = page.run_and_wait(page.index("server = %mlx_serve"), timeout=60)
    assert started["errors"] == [] and "Serving SmolLM2-135M-Instruct at http://127.0.0.1:" in started["text"]
    i = page.index("import threading")
    cell = page.run_and_wait(i, timeout=120)
    assert cell["errors"] == [] and "requests running / queued" in cell["text"]
    assert "4 / 0" in cell["text"], cell["text"]  # four requests in the batch, none waiting
    page.screenshot(page.cell(i).find_element(By.CSS_SELECTOR, ".jp-OutputArea-output table"), "serve-status", DOCS)
    stopped = page.run_and_wait(page.index("for t in asks:"), timeout=120)
    assert stopped["errors"] == [] and "Stopped serving at" in stopped["text"]


def test_stopping_the_cluster_ends_the_status_panel(page):
    cell = page.run_and_wait(page.index("%mlx_cluster stop"), timeout=60)
    assert cell["errors"] == [] and "Cluster stopped." in cell["text"]
    panel = widget(page, page.index("%mlx_cluster status --watch"), ".widget-html")
    wait_for(lambda: panel.text == "cluster stopped", 10, "the status panel to say the cluster stopped")


def test_every_cell_ran_and_none_shows_an_error(page):
    cells = [page.read(i) for i in range(len(SOURCES))]
    assert [c["prompt"] for c in cells] == [f"[{n}]:" for n in range(1, len(SOURCES) + 1)]
    assert {SOURCES[i].splitlines()[0]: c["errors"] for i, c in enumerate(cells) if c["errors"]} == {}
