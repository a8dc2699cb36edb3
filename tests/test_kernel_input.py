"""What a user types in a real IPython kernel (jupyter_client), through IPython's own input
transforms: the tests that call the magics directly skip those."""

from __future__ import annotations

import pytest
from jupyter_client.manager import start_new_kernel
from lanes import starts


@pytest.fixture(scope="module")
@starts("kernel")
def kernel():
    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=120)
    try:
        yield kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def run(kc, code: str) -> tuple[str, list[dict]]:
    """Execute ``code``; everything it printed or raised as text, and the reply's payloads."""
    out: list[str] = []

    def hook(msg):
        c = msg["content"]
        if msg["msg_type"] == "stream":
            out.append(c["text"])
        elif msg["msg_type"] == "error":
            out.append(f"{c['ename']}: {c['evalue']}")
        elif msg["msg_type"] in ("execute_result", "display_data"):
            out.append(c["data"].get("text/plain", ""))

    reply = kc.execute_interactive(code, output_hook=hook, timeout=120)
    return "".join(out), reply["content"].get("payload", [])


def test_a_generate_prompt_ending_in_a_question_mark_reaches_the_magic(kernel):
    run(kernel, "%load_ext mlx_nb")
    text, _ = run(kernel, "%mlx_generate --max-tokens 12 What is the capital of France?")
    assert "Object `France` not found" not in text
    assert "no MLX cluster is running" in text  # the magic ran, with the line as its argument
    line, _ = run(kernel, "get_ipython().transform_cell('%mlx_generate --max-tokens 12 Why is the sky blue?')")
    assert "'--max-tokens 12 Why is the sky blue?'" in line


@pytest.mark.parametrize("line, option", [("%mlx_generate?", "--max-tokens"), ("%mlx_cluster?", "--hostfile")])
def test_a_magic_name_with_a_question_mark_still_shows_its_help(kernel, line, option):
    run(kernel, "%load_ext mlx_nb")
    text, payload = run(kernel, line)
    pages = [p["data"]["text/plain"] for p in payload if p.get("source") == "page"]
    assert pages and f"{line[:-1]} [" in pages[0] and option in pages[0], (text, payload)
