"""mlx_nb: distributed MLX from the notebook.

``Cluster`` starts MLX ranks as ipyparallel engines; ``%load_ext mlx_nb`` adds
``%mlx_cluster`` and ``%%mlx_dist``.
"""

__version__ = "0.1.0"

from .cluster import Cluster, ClusterError  # noqa: E402
from .profile import last_profile  # noqa: E402
from .run import CellResult, DistCellError  # noqa: E402


def __getattr__(name: str):
    # imported on first use: engines import mlx_nb, and must not pull in mlx-lm or widgets
    if name in ("generate", "widgets", "finetune", "bench", "models"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'mlx_nb' has no attribute {name!r}")


def load_ipython_extension(ipython) -> None:
    from .magics import MLXMagics, keep_prompt_question_marks

    ipython.register_magics(MLXMagics)
    # before IPython's own transforms read "France?" as a request for help on France
    if keep_prompt_question_marks not in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.append(keep_prompt_question_marks)


__all__ = ["Cluster", "ClusterError", "CellResult", "DistCellError", "last_profile", "load_ipython_extension"]
