"""What a rank's cell prints, bounded at the source.

A rank whose output the notebook does not show sends none; a shown rank sends up to the cell's
limit, then counts what it held back, so that the notebook can say how much was cut. Nothing
over the limit crosses the network or accumulates in the notebook's records.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TextIO

from ..results import CR_MARK


class Cut:
    """A cell's output on a rank: the characters it may still send (stdout and stderr together;
    -1 once it ran out), and how many bytes it did not send."""

    def __init__(self, left: int) -> None:
        self.left = left
        self.bytes = 0


class _Limited:
    """A stream that forwards until ``cut.left`` characters are spent, then only counts."""

    def __init__(self, stream: TextIO, cut: Cut):
        self._stream, self._cut = stream, cut

    def write(self, text: str) -> int:
        n = len(text)
        text = text.replace("\r", CR_MARK)
        if self._cut.left >= n:
            self._cut.left -= n
            self._stream.write(text)
            return n
        keep = max(self._cut.left, 0)
        self._cut.left = -1
        if keep:
            # end on a whole line where there is one, so the note after it starts a line
            head = text[:keep]
            keep = head.rfind("\n") + 1 or keep
            self._stream.write(text[:keep])
        self._cut.bytes += len(text[keep:].encode(errors="replace"))
        return n

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def limited_output(show: bool, limit: int) -> Iterator[Cut]:
    """While the cell runs: stdout and stderr limited to ``limit`` characters (0: no limit), or
    silenced when the rank is not shown; carriage returns travel as ``CR_MARK``."""
    cut = Cut((limit or 1 << 62) if show else 0)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Limited(saved[0], cut), _Limited(saved[1], cut)
    try:
        yield cut
    finally:
        sys.stdout, sys.stderr = saved
        if not show:
            cut.bytes = 0  # a rank nobody watches has nothing to report cut
