"""One rank's own state: who it is in the group, what the notebook told it, and what it holds.

A leaf of the rank side (it imports nothing of mlx_nb), so that every rank module can read the
state without importing the modules that set it: ``session`` sets the group and the signals,
``memory`` the budget, ``generate`` the loaded model. One object per engine process, apart from
the user's cell namespace (a cell may set ``rank = 8`` without breaking mlx_nb); a restart is a
new process, and so a new, empty state.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class State:
    rank: int = -1
    size: int = 0
    backend: str = ""
    world: Any = None
    files: list[str] = field(default_factory=list)
    cells: deque = field(default_factory=lambda: deque(maxlen=16))  # linecache names kept
    memory: Optional[int] = None  # the budget this rank was given, bytes (None: measured; rank.memory)
    local_ranks: int = 1  # ranks on this rank's host, which share its measured memory
    # the notebook's signals, set from the control channel's thread while a cell runs
    stop: threading.Event = field(default_factory=threading.Event)  # Cluster.request_stop
    inbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # Cluster.send's messages, oldest first
    cancelled: dict[int, str] = field(default_factory=dict)  # cell id -> why the notebook cancelled it
    reports: int = 0  # reports sent (their sequence numbers)
    loaded: Any = None  # rank.generate.Loaded: the model load_model left here, with its prompt cache


state = State()
