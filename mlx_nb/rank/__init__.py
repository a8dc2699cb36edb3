"""The rank side: code that runs inside the engines. It imports nothing of the notebook side.

In a ``%%mlx_dist`` cell (or a function shipped with ``Cluster.call``)::

    from mlx_nb.rank import inbox, report, stop_requested, world
"""

from .session import inbox, report, stop_requested, world

__all__ = ["inbox", "report", "stop_requested", "world"]
