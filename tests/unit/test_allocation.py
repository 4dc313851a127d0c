"""Automatic mixed precision: the bit allocation (an exact multiple-choice knapsack), the fused units it
allocates, and the config fields that ask for it."""

from __future__ import annotations

import itertools
import random

import pytest

from vlmptq import allocation
from vlmptq.allocation import Choice, allocate_bits
from vlmptq.config import make_config
from vlmptq.errors import ConfigError
from vlmptq.pipeline.sensitivity import fusion_units


def _instance(rng: random.Random, n: int) -> list[Choice]:
    """Losses shaped like measured ones: falling 2-8x per bit, units of a few sizes."""
    units = []
    for _ in range(n):
        params = rng.choice([1, 2, 3, 4, 8, 37]) * 96
        l4 = rng.uniform(0.1, 1.0) * params
        l3 = l4 * rng.uniform(2, 8)
        l2 = l3 * rng.uniform(1, 8)
        units.append(Choice(params, {2: l2, 3: l3, 4: l4}))
    return units


def _loss(units, bits) -> float:
    return sum(u.losses[b] for u, b in zip(units, bits))


def _spent(units, bits) -> int:
    return sum(u.params * b for u, b in zip(units, bits))


@pytest.mark.parametrize("seed", range(40))
def test_allocation_is_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    units = _instance(rng, rng.randint(2, 7))
    total = sum(u.params for u in units)
    for target in (2.0, rng.uniform(2, 3), 2.5, rng.uniform(3, 4), 4.0):
        bits = allocate_bits(units, target)
        assert _spent(units, bits) <= target * total + 1e-6
        feasible = [c for c in itertools.product((2, 3, 4), repeat=len(units))
                    if _spent(units, c) <= target * total + 1e-6]
        assert _loss(units, bits) == pytest.approx(min(_loss(units, c) for c in feasible), rel=1e-12)


def test_coarse_budget_steps_still_keep_the_budget(monkeypatch):
    """Where the exact step would need too many cells, costs are rounded up: never over budget, and close
    to the exact optimum."""
    rng = random.Random(7)
    units = [Choice(rng.randint(10_000, 1_000_000), c.losses) for c in _instance(rng, 60)]
    exact = allocate_bits(units, 2.7)
    monkeypatch.setattr(allocation, "MAX_CELLS", 2000)  # rounding wastes <= 60/2000 of the budget
    coarse = allocate_bits(units, 2.7)
    total = sum(u.params for u in units)
    assert _spent(units, coarse) <= 2.7 * total
    assert _loss(units, exact) <= _loss(units, coarse) <= 1.02 * _loss(units, exact)


def test_fixed_linears_count_in_the_average():
    units = [Choice(100, {2: 10.0, 4: 1.0}), Choice(100, {2: 5.0, 4: 1.0})]
    assert allocate_bits(units, 3.0) == [4, 2]
    # 200 weights pinned at 4 bits (an --override) leave 3 * 400 - 800 = 400 bits: both units at 2
    assert allocate_bits(units, 3.0, fixed_bits=800, fixed_params=200) == [2, 2]
    with pytest.raises(ConfigError, match=r"--target-bits 2.5 is below .*\(3\.000 code bits per weight"):
        allocate_bits(units, 2.5, fixed_bits=800, fixed_params=200)


def test_ties_take_fewer_bits_and_bad_losses_are_refused():
    units = [Choice(10, {2: 1.0, 3: 1.0, 4: 1.0})] * 3
    assert allocate_bits(units, 4.0) == [2, 2, 2]  # more bits that save nothing are not spent
    assert allocate_bits([], 3.0) == []
    with pytest.raises(ValueError, match="same candidate bit widths"):
        allocate_bits([Choice(10, {2: 1.0, 4: 0.5}), Choice(10, {2: 1.0, 3: 0.5})], 3.0)
    with pytest.raises(ValueError, match="finite"):
        allocate_bits([Choice(10, {2: float("nan"), 4: 0.5})], 3.0)


def test_fusion_units_follow_vllms_fused_layers():
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    assert fusion_units(names) == [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                                   ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]
    # a member missing (measured elsewhere): the rest still form one unit
    assert fusion_units(["mlp.up_proj", "mlp.gate_proj", "mlp.down_proj"]) == [("mlp.gate_proj", "mlp.up_proj"),
                                                                                 ("mlp.down_proj",)]


@pytest.mark.parametrize("fields, match", [
    (dict(target_bits=2.5, bits=3), r"bits \(--bits\) and target_bits \(--target-bits\) exclude each other"),
    (dict(bits_choices=(2, 4)), r"bits_choices \(--bits-choices\) is set but target_bits \(--target-bits\) is not"),
    (dict(target_bits=2.5, bits_choices=(4, 2)), "at least two different bit widths in increasing order"),
    (dict(target_bits=2.5, bits_choices=(3,)), "at least two different"),
    (dict(target_bits=2.5, bits_choices=(2, 5)), "bits=5 is not supported"),
    (dict(target_bits=4.5), r"target_bits=4.5 is outside bits_choices \[2, 3, 4\]"),
])
def test_target_bits_config_errors(fields, match):
    with pytest.raises(ConfigError, match=match):
        make_config(**fields)


def test_target_bits_config():
    c = make_config(target_bits=2.5, group_size=64)
    assert c.scheme.describe() == "W2 g64 asym"  # the fewest bits: the allocation gives each linear its own
    resolve = c.scheme_resolver({"a.q_proj": 4})
    assert resolve("a.q_proj").describe() == "W4 g64 asym" and resolve("b").bits == 2
    pinned = make_config(target_bits=3, bits_choices=(2, 4), overrides=[{"pattern": "q_proj", "bits": 8}])
    assert pinned.scheme_resolver({"a.q_proj": 2})("a.q_proj").bits == 8  # an override wins over the allocation
