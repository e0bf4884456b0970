"""Pie's adaptive expansion: how much of the running requests' KV may live in a far tier without
slowing the decode step, predicted from measured rates and followed online.

Decoding reads the layers in order, so layer i + d's far KV can cross the link while layer i
computes. The step stays as fast as with everything on the GPU as long as the far bytes of a step
cross the link in less time than the step computes. With f the far fraction of the batch's KV:

    transparent  <=>  f * kv_bytes / link  <=  t_step(1 - f)

where t_step(g) is the step time with the share g of the KV on the GPU. `transparent_fraction`
solves it for the roofline step time t_step(g) = (weight_bytes + g * kv_bytes) / device_bw:

    f* = (weight_bytes + kv_bytes) * link / (kv_bytes * (device_bw + link))

(Llama-3-8B, batch 64 x 2048: 16.1 GB of weights, 17.2 GB of KV, 4.2 TB/s, 54 GB/s over PCIe ->
f* = 2.5%; 394 GB/s over NVLink -> 17%.)

The model misses what the hardware does under load (a burst of prefix reloads takes the link, the
device's own rate varies), so `ExpansionController` follows the largest transparent fraction
online from measured step times: it grows the share while the step stays within `epsilon` of the
reference (the step with nothing far) and cuts it multiplicatively when it does not:

    fraction
       ^        probe: doubling     steady: + alpha per good step, cut on a slow step
       |                  /\\         /|  /|  /|
       |                 /  \\___/|  / | / | / |      the cut goes to about where the measured
       |              __/        |_/  |/  |/  |/      slowdown says the knee is, at most x decrease
       |___________/
       +--------------------------------------------> steps

`pipelined_step_seconds` predicts a step's time at a far fraction from the layer pipeline itself
(what `kvtier bench expansion` compares its measured points with).

Everything here is torch-free: it takes seconds and bytes and gives fractions.
"""

from __future__ import annotations

import dataclasses


def transparent_fraction(weight_bytes: float, kv_bytes: float, device_bytes_per_s: float,
                         link_bytes_per_s: float) -> float:
    """The largest far fraction f with f * kv / link <= (weights + (1 - f) * kv) / device_bw, in [0, 1]."""
    if kv_bytes <= 0:
        return 0.0
    if min(weight_bytes, device_bytes_per_s, link_bytes_per_s) < 0 or device_bytes_per_s == 0:
        raise ValueError("bytes and rates must be positive")
    f = (weight_bytes + kv_bytes) * link_bytes_per_s / (kv_bytes * (device_bytes_per_s + link_bytes_per_s))
    return min(1.0, f)


def pipelined_step_seconds(step_seconds: float, num_layers: int, far_bytes: float, link_bytes_per_s: float,
                           depth: int = 1) -> float:
    """A decode step's time with `far_bytes` of its KV crossing the link, layer by layer, into a
    staging ring of depth + 1 entries (kvtier/engine/layer_pipeline.py), given its time with
    nothing far. Each layer computes step_seconds / num_layers once its far KV has landed; the
    loads run back to back on the link, and layer i's load starts only once layer i - depth - 1,
    which read the same ring entry, is done:

        load_end[i]    = max(load_end[i-1], compute_end[i-depth-1]) + far_bytes / num_layers / link
        compute_end[i] = max(compute_end[i-1], load_end[i]) + step_seconds / num_layers
    """
    if far_bytes <= 0:
        return step_seconds
    compute, load = step_seconds / num_layers, far_bytes / num_layers / link_bytes_per_s
    load_end: list[float] = []
    compute_end: list[float] = []
    for i in range(num_layers):
        ring_free = compute_end[i - depth - 1] if i > depth else 0.0
        load_end.append(max(load_end[-1] if load_end else 0.0, ring_free) + load)
        compute_end.append(max(compute_end[-1] if compute_end else 0.0, load_end[-1]) + compute)
    return compute_end[-1]


@dataclasses.dataclass
class ExpansionController:
    """The far fraction, step by step (`update` after each measured decode step).

    probe: from `min_step`, the fraction doubles after every step within epsilon, until the
    first slow step. steady: it grows by `alpha` per good step (alpha = `growth` x the fraction
    at the last cut, so re-converging after the knee doubles takes about 1 / growth steps) and is
    cut after `patience` slow steps in a row, or at once when the slowdown exceeds 3 x epsilon
    (the workload changed): to fraction x min(decrease, (1 + epsilon / 2) / (1 + slowdown)), the
    second term being where a step time linear in the fraction past the knee puts it.

    hold: a cut below `floor` means having anything far at all costs more than epsilon (a fixed
    cost: on the H200 the per-layer ring machinery made even 0.06% far 14% slower), so the fraction
    is held at 0 for `hold_steps` steps, doubling after each such hold up to `max_hold_steps`, then
    probed again from `min_step`."""

    epsilon: float = 0.03  # allowed slowdown over the reference step
    min_step: float = 0.0002  # the first fraction tried, and the smallest alpha
    growth: float = 0.03
    decrease: float = 0.95
    patience: int = 2
    max_fraction: float = 0.9
    fraction: float = 0.0
    probing: bool = True
    alpha: float = 0.0
    floor: float = 0.001
    hold_steps: int = 16
    max_hold_steps: int = 512
    _slow_steps: int = 0
    _hold: int = 0  # steps left at 0
    _next_hold: int = 0  # the next hold's length (0: hold_steps)

    def update(self, step_seconds: float, reference_seconds: float) -> float:
        """The fraction for the next step, given this step's time and the reference's."""
        if reference_seconds <= 0:
            raise ValueError(f"reference step time must be positive, got {reference_seconds}")
        slowdown = step_seconds / reference_seconds - 1.0
        if self._hold:
            self._hold -= 1
            self.probing = True  # afterwards, from min_step again
        elif slowdown > self.epsilon:
            self._slow_steps += 1
            if self._slow_steps >= self.patience or slowdown > 3 * self.epsilon:
                self._cut(slowdown)
        else:
            self._slow_steps = 0
            self._grow()
        self.fraction = min(max(self.fraction, 0.0), self.max_fraction)
        return self.fraction

    def _grow(self) -> None:
        if self.probing:
            self.fraction = max(2 * self.fraction, self.min_step)
        else:
            self.fraction += self.alpha

    def _cut(self, slowdown: float) -> None:
        self.fraction *= min(self.decrease, (1 + self.epsilon / 2) / (1 + slowdown))
        self.alpha = max(self.min_step, self.growth * self.fraction)
        self.probing, self._slow_steps = False, 0
        if self.fraction >= self.floor:
            self._next_hold = 0
            return
        self.fraction, self._hold = 0.0, self._next_hold or self.hold_steps
        self._next_hold = min(2 * self._hold, self.max_hold_steps)


@dataclasses.dataclass
class AdaptiveExpansion:
    """`--kv-expansion adaptive`: feeds the controller each decode step's device time against a
    reference, the step with nothing far scaled by the bytes a step reads (weights + the KV of its
    contexts: the roofline's numerator, so the reference follows the batch and the contexts).
    The reference's time per byte is the median of the last `window` steps that had nothing far
    (the first steps, and any after a cut to zero); the controller starts once `min_reference`
    of them are in (one step alone was an outlier on the H200: the first step after a burst of
    loads took 1.9x a decode step and, taken as the reference, let the far share grow 30x past
    the knee)."""

    controller: ExpansionController
    weight_bytes: float
    window: int = 8
    min_reference: int = 5
    _per_byte: list[float] = dataclasses.field(default_factory=list)
    # (step seconds, reference seconds, far blocks, fraction after) of the last steps, for benchmarks
    history: list[tuple[float, float, int, float]] = dataclasses.field(default_factory=list)

    def observe(self, step_seconds: float, num_far_blocks: int, bytes_read: float) -> float:
        """The far fraction for the next steps, after a decode step of `step_seconds`."""
        total = self.weight_bytes + bytes_read
        if num_far_blocks == 0:
            self._per_byte = (self._per_byte + [step_seconds / total])[-self.window:]
        if len(self._per_byte) < self.min_reference:
            return self.controller.fraction
        reference = sorted(self._per_byte)[len(self._per_byte) // 2] * total
        fraction = self.controller.update(step_seconds, reference)
        self.history = (self.history + [(step_seconds, reference, num_far_blocks, fraction)])[-1000:]
        return fraction

    @property
    def reference_ready(self) -> bool:
        return len(self._per_byte) >= self.min_reference
