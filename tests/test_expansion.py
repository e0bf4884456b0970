"""Pie's expansion: the transparent far fraction from rates, and the controller that follows it on a
synthetic plant (a decode step whose time grows linearly past the knee, with 1% noise)."""

from __future__ import annotations

import random

import pytest

from kvtier.offload.expansion import (
    AdaptiveExpansion,
    ExpansionController,
    pipelined_step_seconds,
    transparent_fraction,
)

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


def test_pipelined_step_is_the_compute_below_the_knee_and_the_link_above():
    """32 layers of 0.3 ms; far bytes per layer under 0.3 ms of link: only the first layer's load
    shows; well over: the link sets the pace (every load, then the last layer's compute)."""
    t, layers, link = 9.6e-3, 32, 50e9
    assert pipelined_step_seconds(t, layers, 0.0, link) == t
    small = 0.1e-3 * link * layers  # 0.1 ms of link a layer
    assert pipelined_step_seconds(t, layers, small, link) == pytest.approx(t + 0.1e-3)
    big = 1e-3 * link * layers  # 1 ms a layer: loads back to back
    assert pipelined_step_seconds(t, layers, big, link) == pytest.approx(layers * 1e-3 + t / layers)
    # a deeper ring cannot make it slower, and the transparent fraction's bytes cost about one layer's load
    assert pipelined_step_seconds(t, layers, small, link, depth=3) <= pipelined_step_seconds(t, layers, small, link)


def test_pipelined_step_ring_reuse_waits_for_the_reader():
    """depth 0 (one entry): layer i's load waits for layer i - 1's compute, so nothing overlaps."""
    t, layers, link = 3.2e-3, 32, 50e9
    per_layer = 0.1e-3 * link * layers
    assert pipelined_step_seconds(t, layers, per_layer, link, depth=0) == pytest.approx(t + layers * 0.1e-3)


def test_adaptive_reference_follows_the_bytes_a_step_reads():
    """The reference is the median time per byte of steps with nothing far, times this step's
    bytes: a step that reads twice the bytes in twice the time is not a slowdown."""
    tracker = AdaptiveExpansion(ExpansionController(), weight_bytes=1e9)
    assert tracker.observe(0.019, 0, 1e9) == 0.0  # an outlier first step: no reference from it alone
    for _ in range(4):
        assert tracker.observe(0.010, 0, 1e9) == 0.0 or tracker.reference_ready
    assert tracker.reference_ready and tracker.controller.fraction > 0  # started, on the median
    before = tracker.controller.fraction
    tracker.observe(0.020, 5, 3e9)  # (1 + 3) / (1 + 1) = 2x the bytes, 2x the time: on time
    assert tracker.controller.fraction > before
    tracker.observe(0.030, 5, 3e9)  # 50% slower than its reference: a cut (3 x epsilon)
    assert tracker.controller.fraction < 2 * before and not tracker.controller.probing


@pytest.mark.parametrize("seed", range(5))
def test_controller_holds_at_zero_when_any_far_block_costs_too_much(seed):
    """A plant with a fixed cost for having anything far (6.4%, as the per-layer machinery cost on
    the H200) above epsilon: the true knee is 0. The controller spends its time at 0, never holds a
    slow fraction for more than 5 steps, and the last third's median slowdown is within epsilon."""
    controller, rng, fraction, slowdowns = ExpansionController(), random.Random(seed), 0.0, []
    for _ in range(400):
        slowdown = (1.064 if fraction > 0 else 1.0) * max(1.0, fraction / 0.025) - 1
        step_time = 0.008 * (1 + slowdown) * (1 + rng.gauss(0, 0.01))
        slowdowns.append(slowdown)
        fraction = controller.update(step_time, 0.008)
    longest = run = 0
    for s in slowdowns:
        run = run + 1 if s > controller.epsilon + 0.02 else 0
        longest = max(longest, run)
    assert longest <= 5
    assert sorted(slowdowns[-133:])[66] <= controller.epsilon
    assert sum(s > 0 for s in slowdowns[-133:]) <= 133 // 10  # probes, then longer holds
