"""Rank output into the notebook: live, labelled, whole lines, identical lines merged.

One shown rank: its text goes through as it comes (partial lines and carriage returns too, so
a progress bar updates in place as it does in Jupyter), less MLX's ring noise on stderr.
Several shown ranks: each line is labelled ``[rank k]``; a line that several ranks print
within ``MERGE_WINDOW`` of each other is shown once as ``[ranks 0-3]``, and every line leaves
within that window of its arrival, whatever the other ranks do. A carriage-return progress
line shows as its final state, once the rank ends the line.
"""

from __future__ import annotations

import re
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Optional

from .diagnose import label
from .results import CR_MARK

NOISE = ("[ring]",)  # lines MLX's ring backend writes on fd 2 when a peer goes away: noise, not news
MERGE_WINDOW = 0.5  # seconds a line waits for the same line of the other shown ranks
STREAMS = ("stdout", "stderr")
_CR = re.compile(r"\r+\n")


def write_stream(stream: str, text: str) -> None:
    out = sys.stdout if stream == "stdout" else sys.stderr
    out.write(text)
    out.flush()


def visible(line: str) -> str:
    """What a terminal (and Jupyter) shows of a line with carriage returns: its last segment."""
    line = _CR.sub("\n", line)
    if "\r" not in line:
        return line
    segments = [s for s in line.split("\r") if s]
    return segments[-1] if segments else ""


class Printer:
    """Feeds of rank text in, notebook stream writes out (see the module docstring)."""

    def __init__(
        self,
        show: list[int],
        write: Callable[[str, str], None] = write_stream,
        window: float = MERGE_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.show, self.single, self.write, self.window, self.clock = list(show), len(show) == 1, write, window, clock
        self.partial = {(r, s): "" for r in show for s in STREAMS}
        self.noise: dict[tuple, Optional[bool]] = {k: None for k in self.partial}  # current line's verdict
        self.finished: set[int] = set()
        self._held: dict[tuple, str] = {}  # the start of a CR_MARK that a chunk ended in
        # per (stream, rank): its lines not yet shown, as (arrival time, text), and how many it showed
        self._lines: dict[tuple, deque] = {(s, r): deque() for r in show for s in STREAMS}
        self._shown: dict[tuple, int] = {(s, r): 0 for r in show for s in STREAMS}

    # ------------------------------------------------------------------ in
    def feed(self, rank: int, stream: str, text: str) -> None:
        if rank not in self.show or not text:
            return
        key = (rank, stream)
        text = self._carriage_returns(key, text)
        if not text:
            return
        if self.single:
            self.write(stream, text if stream == "stdout" else self._without_noise(key, text))
            return
        text = self.partial[key] + text
        *whole, self.partial[key] = text.split("\n")
        now = self.clock()
        for line in whole:
            self._add(stream, rank, visible(line), now)
        self._emit(stream, now)

    def finish(self, rank: int) -> None:
        """The rank's output is complete: its last partial line is a line, and nobody waits for it."""
        self.finished.add(rank)
        for stream in STREAMS:
            key = (rank, stream)
            rest = self.partial.get(key, "")
            if rest and self.single:
                self.write(stream, rest)  # too short to be noise after all
            elif rest:
                self._add(stream, rank, visible(rest), self.clock())
            if key in self.partial:
                self.partial[key] = ""
            self._emit(stream, self.clock())

    def flush_due(self) -> None:
        """Emit the lines whose merge window has passed."""
        now = self.clock()
        for stream in STREAMS:
            self._emit(stream, now)

    def due_in(self) -> Optional[float]:
        """Seconds until the next waiting line must leave (None: none waits)."""
        heads = [q[0][0] for q in self._lines.values() if q]
        return max(0.0, min(heads) + self.window - self.clock()) if heads else None

    def _carriage_returns(self, key: tuple, text: str) -> str:
        """The rank's text with its carriage returns back (they travel as CR_MARK, which a
        chunk may end halfway through: that part waits for the next chunk)."""
        text = self._held.pop(key, "") + text
        for i in range(min(len(CR_MARK) - 1, len(text)), 0, -1):
            if CR_MARK.startswith(text[-i:]):
                text, self._held[key] = text[:-i], text[-i:]
                break
        return text.replace(CR_MARK, "\r")

    # ------------------------------------------------------------------ out
    def _without_noise(self, key: tuple, text: str) -> str:
        """A single rank's stderr as it comes, less whole lines of MLX ring noise."""
        out, buf = [], self.partial[key] + text
        self.partial[key] = ""
        while buf:
            line, nl, rest = buf.partition("\n")
            verdict = self.noise[key]
            if verdict is None:
                probe = line.lstrip(" ")
                if probe.startswith(NOISE):
                    verdict = True
                elif nl or not any(n.startswith(probe) for n in NOISE):
                    verdict = False
                else:  # too short to tell yet: wait for more of the line
                    self.partial[key] = line
                    break
            if not verdict:
                out.append(line + nl)
            self.noise[key] = None if nl else verdict
            buf = rest if nl else ""
        return "".join(out)

    def _add(self, stream: str, rank: int, text: str, now: float) -> None:
        self._lines[(stream, rank)].append((now, text))

    def _emit(self, stream: str, now: float) -> None:
        """Show the ranks' next lines, line k of each rank at a time, identical ones merged.

        Line k leaves once every unfinished rank that is at line k has it, or once the
        first of them has waited ``window``: a quiet rank holds nobody up for longer, and a
        rank that is behind or ahead is not waited for at all.
        """
        out = []
        while True:
            pending = {r: self._lines[(stream, r)] for r in self.show if self._lines[(stream, r)]}
            if not pending:
                break
            k = min(self._shown[(stream, r)] for r in pending)
            have = [r for r in pending if self._shown[(stream, r)] == k]
            awaited = [r for r in self.show if r not in self.finished and self._shown[(stream, r)] == k]
            oldest = min(pending[r][0][0] for r in have)
            if not set(awaited) <= set(have) and now - oldest < self.window:
                break
            texts: dict[str, list[int]] = {}
            for r in have:
                texts.setdefault(pending[r].popleft()[1], []).append(r)
                self._shown[(stream, r)] += 1
            for text, ranks in texts.items():
                if not (stream == "stderr" and text.lstrip().startswith(NOISE)):
                    out.append(f"{label(ranks)} {text}")
        if out:
            self.write(stream, "\n".join(out) + "\n")
