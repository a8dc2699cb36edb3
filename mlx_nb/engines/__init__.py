"""The engines: the only code that touches ipyparallel's internals or psutil.

``launch`` starts and watches rank processes, ``hosts`` knows the other machines, ``group``
holds the controller and the engine sets and binds them into one MLX group, ``tasks`` is one
job dispatched to the ranks as ipyparallel sees it.
"""


class ClusterError(RuntimeError):
    """The cluster could not start, or a rank is not usable; the message says which and why."""

    def _render_traceback_(self) -> list[str]:
        # IPython shows the explanation, not a traceback through mlx_nb's own frames
        return [f"ClusterError: {line}" if i == 0 else line for i, line in enumerate(str(self).splitlines())]
