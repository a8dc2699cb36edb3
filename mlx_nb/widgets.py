"""ipywidgets: a cluster status panel that refreshes itself."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import ipywidgets as widgets

from .display import Table, human_bytes

if TYPE_CHECKING:
    from .cluster import Cluster


def _rows(cluster: Cluster) -> list[list]:
    job = cluster.job
    traces = job.traces if job is not None else {}
    rows = []
    for r in cluster.ranks:
        live = traces.get(r.rank)
        active = live.active_memory if live else r.active_memory
        peak = live.peak_memory if live else r.peak_memory
        if job is not None:
            state = f"busy, line {live.line}" if live and live.line else "busy"
            if live and live.in_collective:
                c = live.pending[0]
                state = f"in {c.op} #{c.seq}"
        else:
            state = r.state
        budget = human_bytes(r.memory_budget) if r.memory_budget else "-"
        rows.append([r.rank, r.host, r.pid, human_bytes(active), human_bytes(peak), state, budget])
    return rows


class StatusWidget(widgets.HTML):
    """Rank, host, pid, memory, state and memory budget of every rank, refreshed every ``interval`` s.

    Memory is live while a cell runs (each rank reports it), and the last cell's
    figures otherwise; the panel never queues work on a busy rank.
    """

    def __init__(self, cluster: Cluster, interval: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.cluster, self.interval = cluster, interval
        self._stop = threading.Event()
        self._lock = threading.Lock()  # a last refresh never overwrites the note of end()
        self.refresh()
        self.thread = threading.Thread(target=self._loop, name="mlx_nb-status", daemon=True)
        self.thread.start()

    def refresh(self) -> None:
        if not self.cluster.running:
            self.end("cluster stopped")
            return
        table = Table(["rank", "host", "pid", "memory", "peak", "state", "budget"], _rows(self.cluster))
        # JupyterLab styles the tables of HTML outputs only (a widget's needs the class), and
        # centres them in a block as wide as the output: shrink the block to the table
        with self._lock:
            if not self._stop.is_set():
                self.value = (
                    f"<div class='jp-RenderedHTMLCommon' style='display: inline-block'>{table._repr_html_()}"
                    f"<small>updated {time.strftime('%H:%M:%S')}</small></div>"
                )

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.refresh()

    def end(self, note: str = "") -> None:
        """Stop refreshing (the thread ends within an interval); ``note`` replaces the table."""
        with self._lock:
            self._stop.set()
            if note:
                self.value = f"<i>{note}</i>"

    def close(self) -> None:
        """Stop refreshing and close the panel; returns once its watcher thread has ended."""
        self.end()
        if threading.current_thread() is not self.thread:
            self.thread.join(self.interval + 5)
        super().close()


class ChatWidget(widgets.VBox):
    """Chat with the model loaded on the cluster: history, live tokens, stop.

    Each reply streams in as rank 0 produces it; the line under it has prompt and
    generation tokens/s, how many prompt tokens came from the ranks' prompt cache, time to
    first token and peak memory per rank. Stop asks every rank to end at the same token (no
    collective is left hanging). New chat forgets the conversation and empties the prompt cache.
    """

    def __init__(self, cluster: Cluster, max_tokens: int = 256, system: str | None = None):
        from .generate import check_max_tokens

        check_max_tokens(max_tokens)
        self.cluster, self.max_tokens = cluster, max_tokens
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.transcript = widgets.HTML(layout=widgets.Layout(max_height="420px", overflow="auto"))
        self.box = widgets.Text(placeholder="Ask something, then Enter", layout=widgets.Layout(width="70%"))
        self.send = widgets.Button(description="Send", button_style="primary")
        self.stop = widgets.Button(description="Stop", disabled=True)
        self.new = widgets.Button(description="New chat", tooltip="forget the conversation and empty the prompt cache")
        self.new.on_click(lambda _: self.reset())
        self.send.on_click(lambda _: self.ask(self.box.value))
        self.box.continuous_update = False  # a value change is an Enter (or leaving the box)
        self.box.observe(lambda change: self.ask(change["new"]), "value")
        self.stop.on_click(lambda _: self.cluster.request_stop())
        self._turns: list[str] = []
        self._thread: threading.Thread | None = None
        self._system = self.messages[:]
        super().__init__([self.transcript, widgets.HBox([self.box, self.send, self.stop, self.new])])

    def reset(self) -> None:
        """Start over: the conversation (its system prompt kept) and the ranks' prompt cache."""
        from .generate import prompt_cache

        if self._thread and self._thread.is_alive():
            return
        self.messages, self._turns = self._system[:], []
        try:
            prompt_cache(self.cluster, clear=True)
        except Exception as e:  # shown in the panel, as a reply's error is
            self._turns.append(f"<div style='color:#b00'>the prompt cache was not emptied: {e}</div>")
        self._render()

    def _render(self, live: str = "") -> None:
        import html

        parts = self._turns + ([f"<div><b>model</b>: {html.escape(live)}</div>"] if live else [])
        self.transcript.value = "".join(parts)

    def ask(self, text: str, wait: bool = False) -> None:
        """Send ``text`` as the next user turn; the reply streams in the background."""
        import html

        if not text.strip() or (self._thread and self._thread.is_alive()):
            return
        self.box.value = ""
        self.messages.append({"role": "user", "content": text})
        self._turns.append(f"<div><b>you</b>: {html.escape(text)}</div>")
        self._render()
        self.send.disabled, self.stop.disabled, self.new.disabled = True, False, True
        self._thread = threading.Thread(target=self._reply, daemon=True)
        self._thread.start()
        if wait:
            self._thread.join()

    def _reply(self) -> None:
        import html

        from .generate import generate

        chunks: list[str] = []

        def on_text(chunk: str) -> None:
            chunks.append(chunk)
            self._render("".join(chunks))

        try:
            stats = generate(
                self.cluster, self.messages, self.max_tokens, on_text=on_text, quiet=True, what="a chat reply"
            )
            reply = stats.text
            self.messages.append({"role": "assistant", "content": reply})
            self._turns.append(
                f"<div><b>model</b>: {html.escape(reply)}</div><div><small>{html.escape(stats.summary())}</small></div>"
            )
        except Exception as e:  # shown in the panel: a background thread has no cell to raise into
            self._turns.append(f"<div style='color:#b00'>{html.escape(str(e))}</div>")
        finally:
            self.send.disabled, self.stop.disabled, self.new.disabled = False, True, False
            self._render()
