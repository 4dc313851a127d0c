"""Shard and tensor validation (pure functions): the tensor-parallel sizes a layer cannot take, and
checkpoint tensors of the wrong shape, each with a message that names what to fix."""

from __future__ import annotations

import pytest

from vlmptq.errors import CheckpointError, ConfigError
from vllm_plugin.validation import PartitionError, ServingScheme, check_tensor, validate_partition

W3G64 = ServingScheme(3, 64, False)

# The tiny test models' linears (hidden 192, intermediate 448, 3 query heads / 1 KV head of 64):
# (name, input_size, full output sizes of the fused shards, row parallel?)
TINY = [
    ("qkv_proj", 192, [192, 64, 64], False),
    ("o_proj", 192, [192], True),
    ("gate_up_proj", 192, [448, 448], False),
    ("down_proj", 448, [192], True),
]


def partition(input_size, outputs, row_parallel, tp):
    """What vLLM hands create_weights on one rank (KV heads replicated when tp > num KV heads)."""
    k = input_size // tp if row_parallel else input_size
    if row_parallel:
        parts = outputs
    elif len(outputs) == 3:  # q, k, v: KV heads (1 here) are replicated, never split below one head
        parts = [outputs[0] // tp, max(outputs[1] // tp, 64), max(outputs[2] // tp, 64)]
    else:
        parts = [n // tp for n in outputs]
    return k, parts


@pytest.mark.parametrize(
    "scheme,tp,rejected",
    [
        (W3G64, 1, {}),
        # o_proj: 192/2 = 96 columns = 1.5 groups of 64; down_proj: 448/2 = 224 = 3.5 groups
        (
            W3G64,
            2,
            {
                "o_proj": "96 of 192 input columns, which is not a whole number of groups of 64",
                "down_proj": "224 of 448 input columns",
            },
        ),
        # qkv q shard: 192/4 = 48 rows * 3 bits = 144 bits of zero points per column
        (
            W3G64,
            4,
            {
                "qkv_proj": "48 rows = 144 bits",
                "o_proj": "48 of 192 input columns",
                "gate_up_proj": "112 rows = 336 bits",
                "down_proj": "112 of 448",
            },
        ),
        (
            ServingScheme(3, -1, False),
            4,
            {
                "qkv_proj": "48 rows",
                "o_proj": "48 input columns = 144 bits",
                "gate_up_proj": "112 rows",
                "down_proj": "112 input columns = 336 bits",
            },
        ),
        (ServingScheme(4, 32, True), 4, {"o_proj": "48 of 192", "down_proj": "112 of 448"}),
        (ServingScheme(2, 32, False), 2, {}),
    ],
    ids=["w3g64-tp1", "w3g64-tp2", "w3g64-tp4", "w3ch-tp4", "w4g32sym-tp4", "w2g32-tp2"],
)
def test_tensor_parallel_sizes_the_tiny_model_cannot_take(scheme, tp, rejected):
    for name, k_full, outs, row in TINY:
        k, parts = partition(k_full, outs, row, tp)
        if name in rejected:
            with pytest.raises(PartitionError) as e:
                validate_partition(name, scheme, k_full, k, parts, tp)
            msg = str(e.value)
            assert name in msg and f"tensor-parallel size {tp}" in msg and rejected[name] in msg, (
                msg
            )
            assert scheme.describe() in msg
        else:
            validate_partition(name, scheme, k_full, k, parts, tp)


def test_fused_shard_that_cuts_a_zero_point_word_is_rejected_even_at_tp1():
    with pytest.raises(
        PartitionError,
        match=r"qkv \(fused shard 1\): has 40 rows = 120 bits .* multiple of 32 rows",
    ):
        validate_partition("qkv", W3G64, 192, 192, [192, 40, 40], 1)
    validate_partition(
        "qkv", ServingScheme(3, 64, True), 192, 192, [192, 40, 40], 1
    )  # symmetric: no zero points


def test_group_size_that_does_not_divide_the_layer():
    with pytest.raises(
        ConfigError, match=r"down_proj: in_features=448 is not divisible by group_size=128"
    ):
        validate_partition("down_proj", ServingScheme(4, 128, False), 448, 448, [192], 1)


def test_unsupported_bits_and_group_sizes():
    with pytest.raises(ConfigError, match=r"num_bits=5 is not supported .* serves \(2, 3, 4, 8\)"):
        ServingScheme(5, 64, False)
    with pytest.raises(ConfigError, match="group_size=0 is invalid"):
        ServingScheme(4, 0, False)


@pytest.mark.parametrize(
    "param,shape,expected",
    [
        (
            "weight_packed",
            (192, 19),
            r"expected \(192, 18\) \(dense\) or \(192, 20\) \(10 per word\)",
        ),
        ("weight_packed", (191, 18), r"shape \(191, 18\)"),
        ("weight_scale", (192, 4), r"expected \(192, 3\) \(one scale per 64 inputs\)"),
        ("weight_zero_point", (6, 3), r"expected \(18, 3\) \(dense\) or \(20, 3\)"),
        ("weight_shape", (3,), r"expected \(2\)"),
    ],
)
def test_wrong_tensor_shapes_name_the_tensor_and_the_expected_shape(param, shape, expected):
    name = f"language_model.model.layers.0.self_attn.q_proj.{param}"
    with pytest.raises(CheckpointError, match=expected) as e:
        check_tensor(name, param, shape, W3G64, 192, 192)
    assert str(e.value).startswith(name) and "W3 g64 asym" in str(e.value)


def test_both_3bit_layouts_are_recognised():
    assert (
        check_tensor("t", "weight_packed", (192, 18), W3G64, 192, 192) is False
    )  # dense: 192*3/32
    assert (
        check_tensor("t", "weight_packed", (192, 20), W3G64, 192, 192) is True
    )  # padded: ceil(192/10)
    assert check_tensor("t", "weight_zero_point", (20, 3), W3G64, 192, 192) is True
    with pytest.raises(CheckpointError):  # padded widths only exist for 3 bit
        check_tensor("t", "weight_packed", (192, 20), ServingScheme(2, 64, False), 192, 192)


def test_zero_point_in_a_symmetric_checkpoint_is_reported():
    with pytest.raises(
        CheckpointError, match=r"unexpected tensor for a W4 g64 sym layer .*symmetric"
    ):
        check_tensor(
            "x.weight_zero_point",
            "weight_zero_point",
            (24, 3),
            ServingScheme(4, 64, True),
            192,
            192,
        )
