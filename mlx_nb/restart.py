"""Restarting a cluster's ranks: new processes, the setup cells replayed on them, what the user is told.

A restart binds the warm spare set (seconds), or starts a new controller and ranks when the
controller died. Setup cells are the jobs replayed, in order, on new ranks after any restart:
a ``%%mlx_dist --setup`` cell, or a call registered under a name (``load_model``: its name
replaces the load before it). A kept cluster carries them in its state, so that a kernel that
attaches replays them too.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import cloudpickle
import ipyparallel as ipp

from . import diagnose
from .cell import DistCellError, Job
from .diagnose import Recovery
from .engines import ClusterError
from .engines.state import EngineState

if TYPE_CHECKING:
    from .engines.group import RankGroup


@dataclass
class SetupCell:
    """A job replayed on new ranks after any restart (``%%mlx_dist --setup``, ``load_model``)."""

    code: str  # the cell's code, or how the call is named
    push: dict = field(default_factory=dict)
    job: Optional[Job] = None  # a function call (None: run ``code``)
    key: Optional[str] = None  # a later setup with the same key replaces this one


class SetupCells:
    """The setup cells of one cluster (``cells``, in order), kept in its engine state."""

    def __init__(self, state: EngineState, save: Callable[[], None]):
        self.state, self._save = state, save  # save: write the state where an attaching kernel reads it
        self.cells: list[SetupCell] = cloudpickle.loads(base64.b64decode(state.setup)) if state.setup else []

    def add(self, cell: SetupCell) -> None:
        """Register ``cell`` last; one of the same ``key`` before it is dropped."""
        if cell.key is not None:
            self.cells[:] = [c for c in self.cells if c.key != cell.key]
        self.cells.append(cell)
        self._changed()

    def forget(self) -> int:
        """Forget every setup cell (a restart then replays none); how many there were."""
        n = len(self.cells)
        self.cells.clear()
        self._changed()
        return n

    @property
    def titles(self) -> list[str]:
        return [c.code for c in self.cells]

    def replay(self, run: Callable[[SetupCell], None]) -> float:
        """``run`` each setup cell again, in order; the seconds it took. A failure is a
        ClusterError that names the cell and says how to drop them."""
        t0 = time.perf_counter()
        for i, cell in enumerate(self.cells):
            try:
                run(cell)
            except DistCellError as e:
                raise ClusterError(
                    f"replaying setup cell {i + 1} of {len(self.cells)} failed:\n{e.report}\n"
                    "(%mlx_cluster forget-setup drops the setup cells)"
                ) from None
        return time.perf_counter() - t0

    def _changed(self) -> None:
        if self.state.keep:  # a kernel that attaches gets them
            self.state.setup = base64.b64encode(cloudpickle.dumps(self.cells)).decode()
            self._save()


class Restarts:
    """New ranks for one cluster (``group``), its ``setup`` cells replayed on them by ``replay``;
    ``say`` tells the user (the cluster's ``on_message``)."""

    def __init__(
        self,
        group: RankGroup,
        setup: SetupCells,
        replay: Callable[[SetupCell], None],
        say: Callable[[str], None],
    ):
        self.group, self.setup, self.replay, self.say = group, setup, replay, say

    def restart(self, tell: bool = False) -> float:
        """New rank processes, a new group, and the setup cells replayed; the seconds the replay
        took. ``tell``: say how long it took and what was replayed."""
        t0 = time.perf_counter()
        whole = not self.group.controller_alive()  # nothing can reach the ranks: start over
        if whole:
            self.group.stop()
            self.group.start()
            took = self.setup.replay(self.replay)
        else:
            self.group.kill()
            try:
                self.group.form()
                took = self.setup.replay(self.replay)
            except BaseException:
                # a half-formed group, or one without its setup, is of no use: leave none, so
                # the next cell starts afresh (and replays the setup cells again)
                self.group.kill()
                raise
        if tell:
            what = "the cluster" if whole else f"{self.group.spec.n} ranks"
            self.say(f"Restarted {what} in {time.perf_counter() - t0:.1f} s.")
            if self.setup.cells:
                self.say(diagnose.replayed(self.setup.titles, took) + ".")
        return took

    def heal(self) -> None:
        """A rank that died while idle (or a failed restart) means new ranks, before the next job;
        a dead controller means a new cluster (a kept one says so, and restart makes it)."""
        group = self.group
        if not group.controller_alive():
            if group.state.keep:
                raise ClusterError(
                    f"the controller of the kept cluster {group.state.name!r} died, so its ranks cannot be "
                    "reached: %mlx_cluster restart starts it anew (what the ranks held is lost)"
                )
            self.say("The controller died; restarting the cluster (controller and ranks)...")
        elif dead := group.dead_ranks():
            if group.ranks:
                why = f"{diagnose.label(dead)} lost: engine process exited while idle"
            else:
                why = "no ranks are running (the last restart failed)"
            self.say(f"{why}; restarting the cluster...")
        else:
            return
        self.restart(tell=True)

    def for_cell(self, why: str = "") -> Recovery:
        """A restart after a failed cell, as the cell's report tells it (a failed one included)."""
        t0, n = time.perf_counter(), self.group.spec.n
        try:
            replay = self.restart()
        except (ClusterError, ipp.error.TimeoutError) as e:
            return Recovery(error=str(e), ranks=n, why=why, killed=self.group.killed)
        return Recovery(
            restarted=True,
            seconds=time.perf_counter() - t0,
            replay=replay,
            setup=self.setup.titles,
            ranks=n,
            why=why,
            killed=self.group.killed,
        )
