"""Random-weight llamas in mlx-lm's format, with the bundled SmolLM2's vocabulary and tokenizer.
Their replies are noise; their speed and memory are those of a real model of that shape.

- ``llama3b`` (benchmarks/gpu.py, benchmarks/finetune.py --llama3b): about 3e9 parameters,
  Llama-3.2-3B's shape, bfloat16.
- ``smollm2``: the bundled SmolLM2-135M's shape (30 layers of 576), for a machine the bundled
  model cannot reach (the lent GPU machine's CPU: a call carries 64 MiB); in float32 it computes
  what the bundled model's dense float32 copy does on an OpenBLAS CPU.

    python benchmarks/random_llama.py --shape smollm2 --dtype float32 --tokenizer .gpu/tokenizer FOLDER
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gpu_rows import Model

SHAPES = {
    # about 3.0e9 parameters (Llama-3.2-3B's shape with SmolLM2's vocabulary)
    "llama3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
    ),
    # about 1.35e8 parameters: SmolLM2-135M's shape
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
    ),
}
DTYPES = ("bfloat16", "float16", "float32")
LAYERS_PER_FILE = 4
SPECIAL_TOKENS = 17  # SmolLM2's ids 0-16: their embeddings are zero, so greedy decoding never stops early


def write_random_llama(folder: Path, tokenizer: Path, shape: str = "llama3b", dtype: str = "bfloat16") -> Model:
    import mlx.core as mx
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tokenizer / name).read_bytes())
    vocab = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).get_vocab_size()
    vocab = -(-vocab // 64) * 64
    model = SHAPES[shape]
    h, f, layers = model["hidden_size"], model["intermediate_size"], model["num_hidden_layers"]
    q, kv = model["num_attention_heads"] * model["head_dim"], model["num_key_value_heads"] * model["head_dim"]
    dt, width = getattr(mx, dtype), mx.finfo(getattr(mx, dtype)).bits // 8
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        **model,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    mx.random.seed(0)

    def normal(*shape):
        return mx.random.normal(shape, dtype=dt, scale=0.02)

    files = [list(range(i, min(i + LAYERS_PER_FILE, layers))) for i in range(0, layers, LAYERS_PER_FILE)]
    total, weight_map, params = len(files) + 1, {}, 0
    for k, ids in enumerate([None, *files], 1):
        name = f"model-{k:05d}-of-{total:05d}.safetensors"
        w = {}
        if ids is None:
            emb = normal(vocab, h)
            w["model.embed_tokens.weight"] = mx.concatenate([mx.zeros((SPECIAL_TOKENS, h), dt), emb[SPECIAL_TOKENS:]])
            w["model.norm.weight"] = mx.ones((h,), dt)
        for i in ids or []:
            p = f"model.layers.{i}."
            w[p + "self_attn.q_proj.weight"] = normal(q, h)
            w[p + "self_attn.k_proj.weight"] = normal(kv, h)
            w[p + "self_attn.v_proj.weight"] = normal(kv, h)
            w[p + "self_attn.o_proj.weight"] = normal(h, q)
            w[p + "mlp.gate_proj.weight"] = normal(f, h)
            w[p + "mlp.up_proj.weight"] = normal(f, h)
            w[p + "mlp.down_proj.weight"] = normal(h, f)
            w[p + "input_layernorm.weight"] = mx.ones((h,), dt)
            w[p + "post_attention_layernorm.weight"] = mx.ones((h,), dt)
        mx.eval(w)
        mx.save_safetensors(str(folder / name), w, metadata={"format": "mlx"})
        params += sum(a.size for a in w.values())
        weight_map.update(dict.fromkeys(w, name))
        del w
        mx.clear_cache()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": width * params}, "weight_map": weight_map}, indent=2)
    )
    took = time.perf_counter() - t0
    print(
        f"random-weight llama ({shape}): {params / 1e9:.2f}e9 parameters, {dtype}, {layers} layers, hidden {h}, "
        f"vocab {vocab}, {width * params / 2**30:.1f} GiB in {total} files, written in {took:.1f} s to {folder}"
    )
    return Model(params=params, bytes=width * params, seconds=took, folder=str(folder), vocab=vocab)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="where the model is written")
    p.add_argument(
        "--tokenizer", type=Path, required=True, help="a folder with tokenizer.json and tokenizer_config.json"
    )
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3b", help="the model's shape (default llama3b)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="its weights' type (default bfloat16)")
    args = p.parse_args(argv)
    if not (args.tokenizer / "tokenizer.json").exists():
        p.error(f"{args.tokenizer} has no tokenizer.json (python benchmarks/gpu.py prepare copies the bundled model's)")
    write_random_llama(args.folder, args.tokenizer, args.shape, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
