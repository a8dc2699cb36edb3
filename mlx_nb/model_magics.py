"""IPython magics for a model loaded on the ranks: %mlx_generate, %mlx_plan, %mlx_chat, %mlx_serve,
%%mlx_batch. Thin over the Python API (mlx_nb.generate, batch, serve, widgets), as magics.py's are;
they work on the cluster of the magics (``magics.current()``), whose instance also holds the server.
"""

from __future__ import annotations

import re
from typing import Optional

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from .display import human_bytes
from .magics import current, instance, refused, unquoted

# a %mlx_generate line whose prompt ends in "?" (the text before it is more than question marks)
_QUESTION = re.compile(r"^(\s*)%mlx_generate\s+(.*[^\s?].*\?)\s*$")


def keep_prompt_question_marks(lines: list[str]) -> list[str]:
    """An IPython input transformer: a ``%mlx_generate`` prompt ending in ``?`` stays the prompt.

    IPython reads a line's trailing ``?`` as a help request before any magic sees the line
    (``Object `France` not found.``); this turns such a line into the magic's own call first.
    ``%mlx_generate?`` alone still shows the help; a cell magic's body is left as it is.

    >>> keep_prompt_question_marks(["%mlx_generate Why is the sky blue?\\n"])
    ["get_ipython().run_line_magic('mlx_generate', 'Why is the sky blue?')\\n"]
    """
    if lines and lines[0].lstrip().startswith("%%"):
        return lines
    out = []
    for line in lines:
        m = _QUESTION.match(line)
        if m:
            indent, text = m.groups()
            line = f"{indent}get_ipython().run_line_magic('mlx_generate', {text!r})" + "\n" * line.endswith("\n")
        out.append(line)
    return out


@magics_class
class ModelMagics(Magics):
    @magic_arguments()
    @argument("prompt", nargs="*", help="the user message (a chat-templated turn)")
    @argument(
        "--load",
        metavar="MODEL",
        default=None,
        help="load MODEL on every rank first: 'bundled' (SmolLM2, offline), an mlx-lm path or repo id",
    )
    @argument("--pipeline", action="store_true", help="with --load: pipeline parallel instead of tensor parallel")
    @argument(
        "--split",
        default=None,
        help="with --load --pipeline: layers per rank, rank 0 first (20,5,5), or auto: split by the ranks' memory",
    )
    @argument("--context", type=int, default=4096, help="with --load: tokens the load must leave room for (4096)")
    @argument(
        "--adapter",
        default=None,
        help="with --load: LoRA adapters (a finetune folder), fused into the weights, then split",
    )
    @argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    @line_magic
    def mlx_generate(self, line: str):
        """Generate with a model sharded over the ranks; tokens stream in as rank 0 makes them.

        %mlx_generate --load bundled --pipeline            load SmolLM2, split as a pipeline
        %mlx_generate What is the capital of France?      one chat turn, greedy
        Interrupt stops every rank at the same token.
        """
        from .generate import check_max_tokens, generate, load_model

        args = parse_argstring(self.mlx_generate, line)
        cluster = current()
        with refused(FileNotFoundError):
            if args.prompt:  # a bad --max-tokens is refused before a model loads
                check_max_tokens(args.max_tokens)
            if args.load is not None:
                model = None if args.load == "bundled" else args.load
                loaded = load_model(
                    cluster,
                    model,
                    pipeline=args.pipeline,
                    split=_split(args.split),
                    context=args.context,
                    adapter_path=args.adapter,
                )
        if args.load is not None:
            how = "pipeline" if args.pipeline else "tensor parallel"
            mem = ", ".join(human_bytes(m) for m in loaded.active_memory)
            print(f"Loaded {args.load} ({how}) on {cluster.n} ranks in {loaded.seconds:.1f} s; memory per rank: {mem}")
        if args.prompt:
            stats = generate(cluster, [{"role": "user", "content": " ".join(args.prompt)}], args.max_tokens)
            print(stats.summary())
            return None

    @magic_arguments()
    @argument("model", nargs="?", default=None, help="'bundled' (SmolLM2, the default), an mlx-lm path or a repo id")
    @argument("--context", type=int, default=4096, help="tokens of KV cache to leave room for (default 4096)")
    @line_magic
    def mlx_plan(self, line: str):
        """Which layouts MODEL allows over the cluster, with each rank's memory, before any load.

        Reads only config.json and the safetensors headers. Lists tensor parallel, an even
        pipeline and a pipeline split by the ranks' memory budgets (%mlx_cluster start --memory),
        each rank's memory (weights, KV cache for --context tokens, activations), whether it
        fits, and the one to load (load_model(cluster, pipeline=True, split="auto")).

        %mlx_plan                            the bundled model, 4096 tokens of context
        %mlx_plan mlx-community/Qwen3-8B-4bit --context 32768
        """
        from .generate import plan

        args = parse_argstring(self.mlx_plan, line)
        model = None if args.model in (None, "bundled") else unquoted(args.model)
        with refused(FileNotFoundError):
            return plan(current(), model, args.context)

    @magic_arguments()
    @argument("--max-tokens", type=int, default=256, help="most tokens per reply (default 256)")
    @argument("--system", default=None, help="a system prompt for the conversation")
    @line_magic
    def mlx_chat(self, line: str):
        """A chat box for the model loaded on the ranks (%mlx_generate --load first)."""
        from .widgets import ChatWidget

        args = parse_argstring(self.mlx_chat, line)
        with refused():
            return ChatWidget(current(), max_tokens=args.max_tokens, system=args.system)

    @magic_arguments()
    @argument(
        "action",
        nargs="?",
        default="start",
        choices=["start", "status", "stop"],
        help="start serving (default), show what the server does, or stop it",
    )
    @argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free one)")
    @argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    @argument(
        "--api-key",
        default=None,
        help="a key every request must send (Authorization: Bearer KEY); "
        "required for a --host other machines can reach",
    )
    @argument("--name", default=None, help="the model's id in the API (default: the model's name)")
    @argument("--max-batch", type=int, default=32, help="most sequences decoded together (default 32)")
    @argument(
        "--prefill-batch",
        type=int,
        default=None,
        help="most prompts in one prefill pass (default: --max-batch on a GPU, 8 on a CPU)",
    )
    @argument(
        "--gather",
        type=float,
        default=None,
        help="seconds a request arriving while others generate may wait for more to share its "
        "prefill (default: 0.05 on a GPU, 0 on a CPU)",
    )
    @line_magic
    def mlx_serve(self, line: str):
        """Serve the model loaded on the ranks as an OpenAI-compatible API, batching requests.

        server = %mlx_serve --port 8000    GET /v1/models, POST /v1/chat/completions, /v1/completions
        %mlx_serve status            requests running and queued, tokens/s, time to first token
        %mlx_serve stop              close the port; the ranks are free again
        Load a model first (%mlx_generate --load bundled --pipeline); the notebook stays free.
        """
        from .serve import ServeError, Server

        args = parse_argstring(self.mlx_serve, line)
        magics = instance()
        if args.action != "start":
            if magics.server is None:
                raise UsageError("no server is running: start one with %mlx_serve --port 8000")
            if args.action == "stop":
                url = magics.server.url
                magics.stop_server()
                print(f"Stopped serving at {url}.")
                return None
            return magics.server.status()
        if magics.server is not None and magics.server.serving:
            raise UsageError(f"already serving at {magics.server.url}: %mlx_serve stop first")
        with refused(ServeError):
            server = Server(
                current(),
                unquoted(args.host),
                args.port,
                unquoted(args.api_key),
                model_name=unquoted(args.name),
                max_batch=args.max_batch,
                prefill_batch=args.prefill_batch,
                gather=args.gather,
            )
            magics.server = server.start()
        print(f"Serving {server.model.id} at {server.url} (OpenAI API; %mlx_serve status, %mlx_serve stop).")
        return server

    @magic_arguments()
    @argument("--max-tokens", type=int, default=256, help="most tokens per reply (default 256)")
    @argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    @argument("--seed", type=int, default=None, help="makes sampled replies repeatable")
    @cell_magic
    def mlx_batch(self, line: str, cell: str):
        """Generate one reply per line of the cell, as one batch over the ranks (chat turns).

        %%mlx_batch --max-tokens 32
        What is the capital of France?
        Name three colours.
        """
        from .batch import generate_batch

        args = parse_argstring(self.mlx_batch, line)
        prompts = [p.strip() for p in cell.splitlines() if p.strip()]
        if not prompts:
            raise UsageError("%%mlx_batch takes one prompt per line of the cell, and the cell is empty")
        chats = [[{"role": "user", "content": p}] for p in prompts]
        with refused():  # checked before any rank runs
            return generate_batch(current(), chats, args.max_tokens, temperature=args.temperature, seed=args.seed)


def _split(text: Optional[str]):
    """--split: None, "auto" or layers per rank ("20,5,5"); the API checks the numbers."""
    if text is None or text == "auto":
        return text
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--split takes layers per rank like 20,5,5 (rank 0 first) or auto, got {text!r}") from None
