"""mlx_nb: distributed MLX from the notebook.

``Cluster`` starts MLX ranks as ipyparallel engines; ``%load_ext mlx_nb`` adds
``%mlx_cluster`` and ``%%mlx_dist``.
"""

__version__ = "0.1.0"

from .cluster import Cluster, ClusterError  # noqa: E402
from .profile import last_profile  # noqa: E402
from .run import CellResult, DistCellError  # noqa: E402
from . import generate, widgets  # noqa: E402  (mlx_nb.generate.load_model / generate, ChatWidget)


def load_ipython_extension(ipython) -> None:
    from .magics import MLXMagics

    ipython.register_magics(MLXMagics)


__all__ = ["Cluster", "ClusterError", "CellResult", "DistCellError", "last_profile", "load_ipython_extension"]
