"""The random-weight llama of benchmarks/gpu.py and benchmarks/finetune.py --llama3b: about 3e9
parameters (Llama-3.2-3B's shape with the bundled SmolLM2's vocabulary and tokenizer), bfloat16,
written in mlx-lm's format. Its replies are noise; its speed and memory are those of a real model
of that shape."""

from __future__ import annotations

import json
import time
from pathlib import Path

from gpu_rows import Model

# the random llama: about 3.0e9 parameters (Llama-3.2-3B's shape with SmolLM2's vocabulary)
MODEL = dict(
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=24,
    num_key_value_heads=8,
    head_dim=128,
)
LAYERS_PER_FILE = 4
SPECIAL_TOKENS = 17  # SmolLM2's ids 0-16: their embeddings are zero, so greedy decoding never stops early


def write_random_llama(folder: Path, tokenizer: Path) -> Model:
    import mlx.core as mx
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tokenizer / name).read_bytes())
    vocab = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).get_vocab_size()
    vocab = -(-vocab // 64) * 64
    h, f, layers = MODEL["hidden_size"], MODEL["intermediate_size"], MODEL["num_hidden_layers"]
    kv = MODEL["num_key_value_heads"] * MODEL["head_dim"]
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        **MODEL,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    mx.random.seed(0)

    def normal(*shape):
        return mx.random.normal(shape, dtype=mx.bfloat16, scale=0.02)

    files = [list(range(i, min(i + LAYERS_PER_FILE, layers))) for i in range(0, layers, LAYERS_PER_FILE)]
    total, weight_map, params = len(files) + 1, {}, 0
    for k, ids in enumerate([None, *files], 1):
        name = f"model-{k:05d}-of-{total:05d}.safetensors"
        w = {}
        if ids is None:
            emb = normal(vocab, h)
            w["model.embed_tokens.weight"] = mx.concatenate(
                [mx.zeros((SPECIAL_TOKENS, h), mx.bfloat16), emb[SPECIAL_TOKENS:]]
            )
            w["model.norm.weight"] = mx.ones((h,), mx.bfloat16)
        for i in ids or []:
            p = f"model.layers.{i}."
            w[p + "self_attn.q_proj.weight"] = normal(h, h)
            w[p + "self_attn.k_proj.weight"] = normal(kv, h)
            w[p + "self_attn.v_proj.weight"] = normal(kv, h)
            w[p + "self_attn.o_proj.weight"] = normal(h, h)
            w[p + "mlp.gate_proj.weight"] = normal(f, h)
            w[p + "mlp.up_proj.weight"] = normal(f, h)
            w[p + "mlp.down_proj.weight"] = normal(h, f)
            w[p + "input_layernorm.weight"] = mx.ones((h,), mx.bfloat16)
            w[p + "post_attention_layernorm.weight"] = mx.ones((h,), mx.bfloat16)
        mx.eval(w)
        mx.save_safetensors(str(folder / name), w, metadata={"format": "mlx"})
        params += sum(a.size for a in w.values())
        weight_map.update(dict.fromkeys(w, name))
        del w
        mx.clear_cache()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 2 * params}, "weight_map": weight_map}, indent=2)
    )
    took = time.perf_counter() - t0
    print(
        f"random-weight llama: {params / 1e9:.2f}e9 parameters, bfloat16, {layers} layers, hidden {h}, "
        f"vocab {vocab}, {2 * params / 2**30:.1f} GiB in {total} files, written in {took:.1f} s to {folder}"
    )
    return Model(params=params, bytes=2 * params, seconds=took, folder=str(folder), vocab=vocab)
