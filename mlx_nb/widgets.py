"""ipywidgets: a cluster status panel that refreshes itself."""

from __future__ import annotations

import threading
import time

import ipywidgets as widgets

from .cluster import Cluster
from .display import Table, human_bytes


def _rows(cluster: Cluster) -> list[list]:
    rows = []
    for r in cluster.ranks:
        live = cluster.live.get(r.rank, {}) if cluster.busy else {}
        active = live.get("active_memory", r.active_memory)
        peak = live.get("peak_memory", r.peak_memory)
        if cluster.busy:
            state = f"busy, line {live['line']}" if live.get("line") else "busy"
            if live.get("in_eval") and live.get("pending"):
                c = live["pending"][0]
                state = f"in {c['op']} #{c['seq']}"
        else:
            state = r.state
        rows.append([r.rank, r.host, r.pid, human_bytes(active), human_bytes(peak), state])
    return rows


class StatusWidget(widgets.HTML):
    """Rank, host, pid, memory and state of every rank, refreshed every ``interval`` s.

    Memory is live while a cell runs (each rank reports it), and the last cell's
    figures otherwise; the panel never queues work on a busy rank.
    """

    def __init__(self, cluster: Cluster, interval: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.cluster, self.interval = cluster, interval
        self._stop = threading.Event()
        self.refresh()
        threading.Thread(target=self._loop, name="mlx_nb-status", daemon=True).start()

    def refresh(self) -> None:
        if not self.cluster.running:
            self.value = "<i>cluster stopped</i>"
            self._stop.set()
            return
        table = Table(["rank", "host", "pid", "memory", "peak", "state"], _rows(self.cluster))
        self.value = table._repr_html_() + f"<small>updated {time.strftime('%H:%M:%S')}</small>"

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
        super().close()
