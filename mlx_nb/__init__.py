"""mlx_nb: distributed MLX from the notebook.

``Cluster`` starts MLX ranks as ipyparallel engines; ``%load_ext mlx_nb`` adds
``%mlx_cluster`` and ``%%mlx_dist``.

Everything is imported on first use: the ranks import ``mlx_nb.rank`` (which runs inside the
engines) and must not load the notebook side (ipyparallel's client, psutil, widgets).
"""

__version__ = "0.1.0"

_NAMES = {
    "Cluster": "cluster",
    "ClusterError": "engines",
    "CellResult": "cell",
    "DistCellError": "cell",
    "last_profile": "profile",
    "clusters": "cluster",
}
_MODULES = (
    "generate",
    "widgets",
    "finetune",
    "bench",
    "models",
    "hostfile",
    "magics",
    "model_magics",
    "sharding",
    "display",
)


def __getattr__(name: str):
    import importlib

    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'mlx_nb' has no attribute {name!r}")


def load_ipython_extension(ipython) -> None:
    from .magics import MLXMagics
    from .model_magics import ModelMagics, keep_prompt_question_marks

    ipython.register_magics(MLXMagics, ModelMagics)
    # before IPython's own transforms read "France?" as a request for help on France
    if keep_prompt_question_marks not in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.append(keep_prompt_question_marks)


__all__ = ["Cluster", "ClusterError", "CellResult", "DistCellError", "last_profile", "load_ipython_extension"]
