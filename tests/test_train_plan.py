"""The pure plan of a full fine-tuning run, without ranks: whether FSDP can shard a model over N
ranks, and the memory a rank holds (weights, gradients and Adam state of its shard, the layers
gathered whole, activations)."""

from __future__ import annotations

import json

import pytest

from mlx_nb.models import bundled_model
from mlx_nb.train_plan import (
    ModelParameters,
    TrainingMemory,
    activation_bytes,
    check_fits,
    check_shardable,
    estimate,
    model_parameters,
    training_memory,
)

SMOL = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
)


@pytest.fixture(scope="module")
def bundled_params() -> ModelParameters:
    return model_parameters(json.loads((bundled_model(dense=True) / "config.json").read_text()))


def test_the_bundled_models_parameters_are_counted_per_block_and_rest(bundled_params):
    p = bundled_params
    assert len(p.blocks) == 30 and len(set(p.blocks)) == 1
    # a block: q, k, v with biases, o, the MLP's three matrices, two norms
    h, i, kv = 576, 1536, 192
    assert p.blocks[0] == h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    assert p.rest == 49152 * h + h  # tied embeddings (one matrix) and the final norm
    assert p.shapes["model.layers.0.self_attn.k_proj.weight"] == (kv, h)
    assert p.total == sum(p.blocks) + p.rest


def test_fsdp_shards_weights_gradients_and_adam_state_and_adds_the_largest_gathered_layers():
    params = ModelParameters({}, [100, 300, 200], 1000)
    dp = training_memory(params, 4, 4, fsdp=False, activations=7)
    fsdp = training_memory(params, 4, 4, fsdp=True, activations=7)
    assert (dp.weights, dp.gradients, dp.optimizer, dp.gathered) == (6400, 6400, 12800, 0)
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (1600, 1600, 3200)
    # the rest (1000) and the largest block (300) whole: weights and gradient
    assert fsdp.gathered == 2 * 1300 * 4
    assert fsdp.total == 1600 + 1600 + 3200 + 2 * 1300 * 4 + 7
    # FSDP on one rank is data-parallel on one rank
    assert training_memory(params, 4, 1, True, 7) == training_memory(params, 4, 1, False, 7)


def test_activations_grow_with_tokens_and_checkpointing_keeps_fewer():
    small = activation_bytes(SMOL, 32, 32, 4, checkpointed=False)
    assert activation_bytes(SMOL, 64, 32, 4, checkpointed=False) == 2 * small
    assert activation_bytes(SMOL, 32, 32, 4, checkpointed=True) < small / 2
    # the float32 logits, their softmax and gradient are there either way
    assert activation_bytes(SMOL, 32, 32, 4, checkpointed=True) > 32 * 49152 * 4 * 3


def test_the_estimate_of_the_bundled_model_halves_the_shards_on_two_ranks():
    one = estimate(bundled_model(dense=True), 1, False, 2, 32)
    two = estimate(bundled_model(dense=True), 2, True, 1, 32)
    assert one.weights == 4 * two.weights // 2 == 4 * 134_543_808
    assert two.weights + two.gradients + two.optimizer == (one.weights + one.gradients + one.optimizer) // 2
    assert two.gathered > 0 == one.gathered
    assert two.total < 0.65 * one.total
    assert "gathered layers" in str(two) and str(two).endswith(")") and "per rank" in str(two)


def test_a_parameter_that_does_not_divide_by_the_ranks_is_named_with_what_would(bundled_params):
    check_shardable(bundled_params.shapes, 4)
    with pytest.raises(
        ValueError,
        match=r"FSDP cannot shard SmolLM2 over 5 ranks: model\.embed_tokens\.weight has shape \(49152, 576\), "
        r"and its first axis \(49152\) does not divide by 5 .* Rank counts that divide every parameter: "
        r"1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64 and more; or fsdp=False",
    ):
        check_shardable(bundled_params.shapes, 5, "SmolLM2")
    with pytest.raises(ValueError, match=r"w has shape \(6, 4\).* divide every parameter: 1, 2, 3, 6;"):
        check_shardable({"w": (6, 4), "b": (6,)}, 4)
    with pytest.raises(ValueError, match=r"scale is a scalar"):
        check_shardable({"scale": ()}, 2)


def test_a_run_over_a_ranks_budget_is_refused_with_the_numbers_and_what_would_fit():
    memory = TrainingMemory(
        ranks=2, fsdp=False, weights=2**30, gradients=2**30, optimizer=2**31, gathered=0, activations=0
    )
    check_fits(memory, [5 * 2**30, 4 * 2**30])
    with pytest.raises(ValueError) as e:
        check_fits(memory, [5 * 2**30, 3 * 2**30], "full fine-tuning of SmolLM2")
    assert str(e.value).startswith(
        "full fine-tuning of SmolLM2 does not fit the ranks' memory: rank 1 needs 4.0 GB, has 3.0 GB. "
        "It needs 4.0 GB per rank (weights 1.0 GB, gradients 1.0 GB, Adam 2.0 GB, activations 0 B). Try fsdp=True"
    )
