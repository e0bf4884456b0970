"""Pie's expansion: the transparent far fraction from rates, and the controller that follows it on a
synthetic plant (a decode step whose time grows linearly past the knee, with 1% noise)."""

from __future__ import annotations

import random

import pytest

from kvtier.offload.expansion import ExpansionController, transparent_fraction

# Llama-3-8B at batch 64 x 2048 on the H200 (design.md): weights, KV, device and link rates
WEIGHTS, KV, DEVICE_BW = 16.06e9, 17.18e9, 4.21e12


def test_transparent_fraction_from_rates():
    assert transparent_fraction(WEIGHTS, KV, DEVICE_BW, 54e9) == pytest.approx(0.0245, abs=0.001)  # PCIe
    assert transparent_fraction(WEIGHTS, KV, DEVICE_BW, 394e9) == pytest.approx(0.166, abs=0.002)  # NVLink
    f = transparent_fraction(WEIGHTS, KV, DEVICE_BW, 54e9)
    assert f * KV / 54e9 == pytest.approx((WEIGHTS + (1 - f) * KV) / DEVICE_BW)  # the defining equality
    assert transparent_fraction(WEIGHTS, 0.0, DEVICE_BW, 54e9) == 0.0
    assert transparent_fraction(WEIGHTS, KV, DEVICE_BW, 1e15) == 1.0  # a link faster than memory
    with pytest.raises(ValueError, match="positive"):
        transparent_fraction(WEIGHTS, KV, 0.0, 54e9)


def run_plant(controller: ExpansionController, knees: list[tuple[int, float]], num_steps: int,
              seed: int, t0: float = 0.008) -> list[tuple[float, float]]:
    """(knee, fraction) per step; knees: (first step, knee) changes of the plant."""
    rng, fraction, out = random.Random(seed), 0.0, []
    changes = dict(knees)
    knee = changes[0]
    for step in range(num_steps):
        knee = changes.get(step, knee)
        step_time = t0 * max(1.0, fraction / knee) * (1 + rng.gauss(0, 0.01))
        fraction = controller.update(step_time, t0)
        out.append((knee, fraction))
    return out


def steps_to_settle(history: list[tuple[float, float]], start: int, end: int) -> int | None:
    """Steps after `start` until the fraction stays within 10% of the knee up to `end`."""
    for i in range(start, end):
        if all(abs(f - knee) <= 0.1 * knee for knee, f in history[i:end]):
            return i - start
    return None


def longest_excess(history: list[tuple[float, float]], epsilon: float) -> int:
    """Most consecutive steps holding a fraction whose noise-free slowdown exceeds epsilon + 2%."""
    longest = run = 0
    for knee, f in history:
        run = run + 1 if max(1.0, f / knee) - 1 > epsilon + 0.02 else 0
        longest = max(longest, run)
    return longest


@pytest.mark.parametrize("knee", [0.025, 0.17], ids=["pcie", "nvlink"])
@pytest.mark.parametrize("seed", range(10))
def test_controller_converges_and_follows_the_knee(knee, seed):
    controller = ExpansionController()
    history = run_plant(controller, [(0, knee), (120, knee / 2), (240, knee)], 360, seed)
    assert steps_to_settle(history, 0, 120) <= 50  # from 0
    assert steps_to_settle(history, 120, 240) <= 50  # the knee halves
    assert steps_to_settle(history, 240, 360) <= 50  # and doubles back
    assert longest_excess(history, controller.epsilon) <= 5


def test_a_controller_that_does_not_cut_fails_the_bounds():
    """The checks above can fail: a controller that tolerates any slowdown runs past the knee."""
    history = run_plant(ExpansionController(epsilon=10.0), [(0, 0.025)], 120, seed=0)
    assert steps_to_settle(history, 0, 120) is None and longest_excess(history, 0.03) > 5


def test_reference_must_be_positive():
    with pytest.raises(ValueError, match="reference"):
        ExpansionController().update(0.01, 0.0)
