"""Sampling from a batch of logits, each row with its own SamplingParams, with no Python loop over rows.

Order, as in vLLM: repetition penalty -> min_tokens masking -> greedy rows: argmax; the others:
/ temperature -> top-k -> top-p -> min-p -> draw. Logprobs are those of the raw model distribution
(log_softmax of the unprocessed logits).

Every option is one tensor op over the batch, fed by per-row parameter tensors: the host packs
whatever the step's rows use (temperatures, k, p, seeds, the (row, token) pairs to penalize or
ban) into one int64 buffer and copies it to the device once. Work no row asked for is skipped:
an all-greedy batch is one argmax, no top_p below 1 means no top-p pass.

Draws use the exponential race (argmax p / E, E = -log(u) ~ Exp(1)), which samples from p with
no host sync. Unseeded rows take u from one batch-wide torch.Generator. A seeded row's u is a hash
of (seed, num_output_tokens, token id) computed with int64 ops on the device
(`seeded_exponentials`): a per-request generator would make a row's tokens depend on every draw
made before (a retried or resumed step would shift them) and is state to keep and drop; a
counter-based hash gives the same draw whatever else is in the batch, at whatever row, whenever
the step runs, on the CPU or a GPU. (Top-p keeps every token tied with its last kept one for the
same reason: which of tied tokens make the cut is not left to how a device sorted this batch.)

`Sampler.sample` does all device work and starts one device-to-host copy of everything the host
needs (token ids, and logprob data when asked) without waiting for it; `DeviceSample.to_host`
waits and builds the SampledTokens. An asynchronous scheduler can feed `DeviceSample.token_ids`
(on the device) to the next step before the copy lands. A forced row (teacher forcing,
SamplingParams.forced_token_ids) draws like any other and then takes its forced id, so its logprob
is the model's for that id and the other rows' draws do not change.

Prompt logprobs (`PromptLogprobs`) are kept on the device chunk by chunk while a prompt is
computed and cross to the host once, with the request's first sampled token (`PromptLogprobsToken`):
nothing of them is copied, or even computed, for a request that did not ask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from kvtier.ops.top_p import precompile as precompile_top_p, top_p_threshold
from kvtier.scheduler.output import SampledToken, ScheduledRequest

# splitmix64 (Steele, Lea, Flood 2014) as signed int64: torch has no uint64 arithmetic, but int64
# addition and multiplication wrap mod 2**64 exactly like uint64's; only right shifts differ.
_GAMMA = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64
_UNIFORM_BITS = 52  # a float64 holds (k + 0.5) / 2**52 exactly: a uniform in (0, 1), never 0 or 1
# Prompt logprobs turn at most this many rows into logits at a time: (1024, V) fp32 is 200 MB for a
# 49K vocabulary, where a whole 8K-token chunk would be 1.6 GB.
PROMPT_LOGITS_ROWS = 1024


@dataclasses.dataclass
class HostLogprobs:
    """The logprob data of the rows that asked for it, on the host (R = len(rows))."""

    rows: list[int]  # batch rows, in order
    chosen: np.ndarray  # (R,) logprob of the drawn token
    rank: np.ndarray  # (R,) 1 + the number of tokens with a strictly larger logprob
    top_ids: np.ndarray  # (R, K) K = the largest `logprobs` in the batch; row i reads its first k
    top_values: np.ndarray  # (R, K)

    @classmethod
    def unpack(cls, flat: np.ndarray, rows: list[int], k: int) -> HostLogprobs:
        """flat int64, as `_logprobs` packs it: rank (R), top ids (R*K), then float64 bits."""
        r = len(rows)
        floats = flat[r + r * k:].view(np.float64)
        return cls(rows, floats[:r], flat[:r], flat[r:r + r * k].reshape(r, k), floats[r:].reshape(r, k))


@dataclasses.dataclass
class PromptLogprobsToken(SampledToken):
    """A request's first sampled token, carrying the logprobs of its prompt (SamplingParams.prompt_logprobs):
    `rows` are the positions 1 .. P - 1 of the prompt tokens scored."""

    prompt_logprobs: HostLogprobs | None = None


@dataclasses.dataclass
class PendingPromptLogprobs:
    """A prompt's logprob data on its way to the host (laid out as HostLogprobs.unpack reads it)."""

    host: torch.Tensor  # int64, filled once `event` completes
    event: torch.cuda.Event | None
    num_prompt_tokens: int
    k: int

    def to_host(self) -> HostLogprobs:
        if self.event is not None:
            self.event.synchronize()
        return HostLogprobs.unpack(self.host.numpy(), list(range(1, self.num_prompt_tokens)), self.k)


@dataclasses.dataclass
class DeviceSample:
    """A step's draw, on the device, with its copy to the host under way."""

    token_ids: torch.Tensor  # (N,) int64 on the device: the next step's input ids
    items: list[ScheduledRequest]
    host: torch.Tensor  # (N + logprob data,) int64: pinned on CUDA, filled once `event` completes
    event: torch.cuda.Event | None  # None on the CPU: `host` is ready
    logprob_rows: list[int]
    max_logprobs: int
    finish: Callable[[HostLogprobs | None, list[int], list[ScheduledRequest]], list[SampledToken]]
    # item row -> its prompt's logprobs (a request whose last prompt chunk ran this step), if asked
    prompt: dict[int, PendingPromptLogprobs] = dataclasses.field(default_factory=dict)

    def to_host(self) -> list[SampledToken]:
        """Wait for the copy; one SampledToken per item."""
        if self.event is not None:
            self.event.synchronize()
        flat = self.host.numpy()
        num_rows = len(self.items)
        token_ids = flat[:num_rows].tolist()
        logprobs = (HostLogprobs.unpack(flat[num_rows:], self.logprob_rows, self.max_logprobs)
                    if self.logprob_rows else None)
        tokens = self.finish(logprobs, token_ids, self.items)
        for row, pending in self.prompt.items():
            tokens[row] = PromptLogprobsToken(**vars(tokens[row]), prompt_logprobs=pending.to_host())
        return tokens


@dataclasses.dataclass
class PromptChunk:
    """One request's prompt tokens in a step, scored for SamplingParams.prompt_logprobs. The logits
    of the token at position p predict the token at p + 1; the chunk holds positions [s, e):

        position     s-1  |  s     s+1   ...   e-1  |  e
        its logits  stash |  r0    r1    ...   r_last |
        score token   s   |  s+1   s+2   ...   e    |

    The row before the chunk (the previous chunk's last, kept: `PromptLogprobs` stashes it) scores
    the chunk's first token; the chunk's last row scores the next chunk's first token and is kept in
    turn, unless e is the prompt's end P: then it predicts the first output token (it samples)."""

    request_id: str
    k: int  # top logprobs per prompt token
    num_prompt_tokens: int  # P
    start: int  # s
    first_row: int  # the chunk's first row among the step's tokens
    num_tokens: int  # e - s

    @property
    def last(self) -> bool:
        """The prompt's last chunk: the prompt's logprobs are complete after it."""
        return self.start + self.num_tokens == self.num_prompt_tokens


class _PromptBuffer:
    """One prompt's logprob data on the device, laid out as HostLogprobs.unpack reads it: row j is
    the prompt token at position j + 1. `covered` (host) marks the rows written."""

    def __init__(self, num_prompt_tokens: int, k: int, device: torch.device):
        r = num_prompt_tokens - 1
        self.num_prompt_tokens, self.k = num_prompt_tokens, k
        self.flat = torch.zeros(r * (2 + 2 * k), dtype=torch.int64, device=device)
        self.rank, self.top_ids = self.flat[:r], self.flat[r:r + r * k].view(r, k)
        floats = self.flat[r + r * k:].view(torch.float64)  # float64 by their bits, as _logprobs packs
        self.chosen, self.top_values = floats[:r], floats[r:].view(r, k)
        self.covered = np.zeros(r, bool)

    def write(self, position: int, parts: tuple[torch.Tensor, ...]) -> None:
        """logprob_parts of the prompt tokens from `position` on."""
        rank, top_ids, chosen, top_values = parts
        rows = slice(position - 1, position - 1 + rank.shape[0])
        self.rank[rows], self.top_ids[rows] = rank, top_ids
        self.chosen[rows], self.top_values[rows] = chosen.double(), top_values.double()
        self.covered[rows] = True


class PromptLogprobs:
    """Prompt logprobs of requests whose prompt is being computed, chunk by chunk, on the device.

    A request's buffer lives until the request finishes, not until its prompt's logprobs are sent:
    a failed step's chunk is computed again, and a request preempted mid-prompt resumes after its
    earlier chunks. Only each request's latest stash (one row of logits) is kept."""

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: dict[str, _PromptBuffer] = {}
        self._stash: dict[str, tuple[int, torch.Tensor]] = {}  # request -> (position, its logits (V,))

    def score(self, chunk: PromptChunk, input_ids: torch.Tensor,
              logits_of: Callable[[int, int], torch.Tensor]) -> None:
        """Score the chunk's prompt tokens; input_ids (T,) are the step's, logits_of(a, b) the fp32
        logits (b - a, V) of its rows [a, b)."""
        buf = self._buffers.get(chunk.request_id)
        if buf is None:
            buf = self._buffers[chunk.request_id] = _PromptBuffer(chunk.num_prompt_tokens, chunk.k, self.device)
        s, row, n = chunk.start, chunk.first_row, chunk.num_tokens
        stash = self._stash.get(chunk.request_id)
        if s >= 1 and stash is not None and stash[0] == s - 1:
            buf.write(s, logprob_parts(stash[1][None], input_ids[row:row + 1], buf.k))
        for lo in range(0, n - 1, PROMPT_LOGITS_ROWS):  # rows r0 .. the one before the last
            hi = min(lo + PROMPT_LOGITS_ROWS, n - 1)
            buf.write(s + 1 + lo, logprob_parts(logits_of(row + lo, row + hi), input_ids[row + lo + 1:row + hi + 1],
                                                buf.k))
        if not chunk.last:
            self._stash[chunk.request_id] = (s + n - 1, logits_of(row + n - 1, row + n)[0].clone())

    def deliver(self, request_id: str) -> PendingPromptLogprobs:
        """Start the copy of a complete prompt's logprobs to the host. Raises when some prompt token
        was never scored: its KV came from the prefix cache, so it had no logits."""
        buf = self._buffers[request_id]
        missing = np.flatnonzero(~buf.covered) + 1
        if missing.size:
            raise RuntimeError(
                f"prompt logprobs of request {request_id}: {missing.size} prompt tokens (from position "
                f"{missing[0]}) have no logits, their KV came from the prefix cache; a request with "
                "prompt_logprobs must not read it (LLM.generate gives each such request a cache salt of its own)")
        host, event = copy_to_host(buf.flat)
        return PendingPromptLogprobs(host, event, buf.num_prompt_tokens, buf.k)

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._buffers.pop(request_id, None)
            self._stash.pop(request_id, None)


@dataclasses.dataclass
class _HostRows:
    """What the step's rows ask for. `arrays` holds only what some row uses (a name's absence
    skips that work), each array (N,) per row or flat per (row, token id) pair."""

    arrays: dict[str, np.ndarray]
    num_greedy: int
    num_seeded: int  # rows that draw with a seed
    max_top_k: int  # 0: every row keeps the whole vocabulary
    logprob_rows: list[int]
    max_logprobs: int


class Sampler:
    """Holds no per-request state: a row's draw depends on its item alone, and on the default
    generator's stream for unseeded rows."""

    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.default_generator = torch.Generator(device=device)  # the noise of unseeded rows
        self.default_generator.manual_seed(seed)
        precompile_top_p(device)  # the top-p kernel compiles now, not at the first sampled step

    def __call__(self, logits: torch.Tensor, items: list[ScheduledRequest]) -> list[SampledToken]:
        """logits (N, V) fp32, one row per item -> one SampledToken per item."""
        return self.sample(logits, items).to_host()

    def sample(self, logits: torch.Tensor, items: list[ScheduledRequest],
               last_inputs: tuple[torch.Tensor, torch.Tensor] | None = None) -> DeviceSample:
        """logits (N, V) fp32, one row per item -> the drawn tokens on the device, their copy to
        the host started; the host does not wait for the device.

        last_inputs: (input_ids (T,), positions (N,) of each row's last input token in them), on
        the device. A repetition penalty also counts that token as seen (under async scheduling the
        host has not seen it yet); it is gathered only for penalized rows."""
        rows = _host_rows(items, logits.shape[-1])
        dev = _to_device(rows.arrays, self.device)
        processed = _penalize(logits, dev, last_inputs)
        if rows.num_greedy == len(items):
            token_ids = processed.argmax(dim=-1)
        else:
            token_ids = self._draw(processed, dev, rows)
        if "forced_rows" in dev:  # drawn all the same: the other rows' noise does not depend on forcing
            token_ids = token_ids.index_put((dev["forced_rows"],), dev["forced_ids"])
        pieces = [token_ids]
        if rows.logprob_rows:
            pieces += _logprobs(logits, token_ids, dev.get("logprob_rows"), rows.max_logprobs)
        host, event = copy_to_host(torch.cat(pieces) if len(pieces) > 1 else pieces[0])
        return DeviceSample(token_ids, items, host, event, rows.logprob_rows, rows.max_logprobs,
                            self._with_logprobs)

    def _draw(self, logits: torch.Tensor, dev: dict[str, torch.Tensor], rows: _HostRows) -> torch.Tensor:
        """(N, V) penalized logits -> (N,) int64 tokens: drawn, or the argmax for greedy rows."""
        scaled = logits / dev["temperature"][:, None]
        if rows.max_top_k:
            scaled = _top_k(scaled, dev["top_k"], rows.max_top_k)
        probs = torch.softmax(scaled, dim=-1)
        if "top_p" in dev:
            probs = _top_p(probs, dev["top_p"])
        if "min_p" in dev:
            probs = probs.masked_fill(probs < dev["min_p"][:, None] * probs.amax(-1, keepdim=True), 0.0)
        drawn = (probs / self._exponentials(probs.shape, dev, rows)).argmax(dim=-1)
        if rows.num_greedy:
            return torch.where(dev["greedy"], logits.argmax(dim=-1), drawn)
        return drawn

    def _exponentials(self, shape: torch.Size, dev: dict[str, torch.Tensor], rows: _HostRows) -> torch.Tensor:
        """(N, V) Exp(1) noise: the batch generator's, and the seeded rows' own (a hash)."""
        if rows.num_seeded == shape[0]:
            return seeded_exponentials(dev["seeds"], dev["steps"], shape[1])
        # -log(u) rather than exponential_: 5x faster on the CPU, one more elementwise pass on a GPU.
        # rand may return 0: E = inf then excludes that token from one draw (odds 2**-24 per token).
        noise = torch.rand(shape, device=self.device, generator=self.default_generator).log_().neg_()
        if rows.num_seeded:
            noise[dev["seeded_rows"]] = seeded_exponentials(dev["seeds"], dev["steps"], shape[1])
        return noise

    def _with_logprobs(self, raw: HostLogprobs | None, token_ids: list[int],
                       items: list[ScheduledRequest]) -> list[SampledToken]:
        """The step's SampledTokens from host data: `raw` is None when no row asked for logprobs."""
        out = [SampledToken(t) for t in token_ids]
        if raw is None:
            return out
        for j, i in enumerate(raw.rows):
            k = items[i].params.logprobs
            out[i].logprob, out[i].rank = float(raw.chosen[j]), int(raw.rank[j])
            out[i].top_logprobs = list(zip(raw.top_ids[j, :k].tolist(), raw.top_values[j, :k].tolist()))
        return out


def copy_to_host(packed: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start a copy to the host without waiting: (host tensor, event that completes with it; None on
    the CPU, where the copy is done). Pinned memory on CUDA, so the copy does not block the host."""
    if packed.device.type != "cuda":
        return packed.cpu(), None
    host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
    host.copy_(packed, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def seeded_exponentials(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """seeds, steps (R,) int64 -> (R, V) fp32 Exp(1) noise, a function of (seed, step, token id) alone.

    splitmix64 three times: the seed's key, the key's step-th output (the row's key), the row key's
    (token id)-th output (the token's 64 random bits); the top 52 bits make a uniform u in (0, 1)."""
    seed_keys = _mix64(seeds + _GAMMA)  # (R,)
    row_keys = _mix64(seed_keys + (steps + 1) * _GAMMA)  # (R,)
    counters = (torch.arange(vocab_size, device=seeds.device) + 1) * _GAMMA  # (V,)
    bits = _mix64(row_keys[:, None] + counters)  # (R, V)
    uniform = (_shift_right(bits, 64 - _UNIFORM_BITS).double() + 0.5) * 2.0 ** -_UNIFORM_BITS
    return uniform.log().neg().float()


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 (wrapping) tensors."""
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64: torch's >> is arithmetic (copies the sign bit)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _penalize(logits: torch.Tensor, dev: dict[str, torch.Tensor],
              last_inputs: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Repetition penalty, then min_tokens bans, on (row, token id) pairs; a new tensor when any
    applies (logprobs read the raw logits). A pair listed twice writes the same value twice."""
    if "penalty_rows" not in dev and "ban_rows" not in dev:
        return logits
    logits = logits.clone()
    if "penalty_rows" in dev:
        rows, token_ids, penalty = dev["penalty_rows"], dev["penalty_token_ids"], dev["penalty"]
        if last_inputs is not None:  # each penalized row's last input token, from the device
            input_ids, last_positions = last_inputs
            last_rows = dev["penalty_last_rows"]
            rows, token_ids = torch.cat([rows, last_rows]), torch.cat([token_ids, input_ids[last_positions[last_rows]]])
            penalty = torch.cat([penalty, dev["penalty_last"]])
        pairs = (rows, token_ids)
        seen = logits[pairs]
        logits[pairs] = torch.where(seen > 0, seen / penalty, seen * penalty)
    if "ban_rows" in dev:
        # a device-made value: assigning a Python float copies it from the host, a sync
        logits.index_put_((dev["ban_rows"], dev["ban_token_ids"]), logits.new_full((), float("-inf")))
    return logits


def _top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Keep each row's top_k largest logits (ties with the k-th kept); top_k 0 keeps the row.
    One topk with the batch's largest k, each row's threshold gathered at its k - 1."""
    kth = logits.topk(max_top_k, dim=-1).values.gather(-1, (top_k - 1).clamp(min=0)[:, None])  # (N, 1)
    kth = kth.masked_fill(top_k[:, None] == 0, float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's nucleus: the tokens at least as likely as the last one the sort-based rule
    keeps (most likely first, while the mass before a token is below top_p). Ties at the boundary
    are all kept (common in logits from bf16), so the cut does not depend on sort order, device
    or batch shape (up to fp32 rounding of the masses: kvtier/ops/top_p.py). Rows without top-p
    have top_p = inf: threshold 0, untouched. A GPU finds the thresholds without sorting; the CPU
    sorts."""
    return probs.masked_fill(probs < top_p_threshold(probs, top_p)[:, None], 0.0)


def _logprobs(raw: torch.Tensor, token_ids: torch.Tensor, rows: torch.Tensor | None, k: int) -> list[torch.Tensor]:
    """The asking rows' (all rows when `rows` is None) logprob data, flat int64 to pack with the
    token ids: rank (R), top ids (R*K), then float64 bits: chosen (R), top values (R*K)."""
    if rows is not None:
        raw, token_ids = raw[rows], token_ids[rows]
    rank, top_ids, chosen, top_values = logprob_parts(raw, token_ids, k)
    floats = [t.double().view(torch.int64).flatten() for t in (chosen, top_values)]  # by their bits
    return [rank, top_ids.flatten(), *floats]


def logprob_parts(raw: torch.Tensor, token_ids: torch.Tensor, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """raw logits (R, V), token_ids (R,) -> rank (R,) int64 (1 + the tokens strictly likelier),
    top ids (R, K), the tokens' logprobs (R,), top logprobs (R, K); K = 0 is an empty topk."""
    logprobs = torch.log_softmax(raw, dim=-1)  # (R, V)
    chosen = logprobs.gather(-1, token_ids[:, None])  # (R, 1)
    rank = (logprobs > chosen).sum(dim=-1) + 1
    top = logprobs.topk(k, dim=-1)
    return rank, top.indices, chosen[:, 0], top.values


def _host_rows(items: list[ScheduledRequest], vocab_size: int) -> _HostRows:
    """One pass sorts the rows by what they ask for; then arrays for what some row asked."""
    sampling, penalized, below_min_tokens, logprob_rows, forced = [], [], [], [], []
    for i, item in enumerate(items):
        p = item.params
        if not p.greedy:
            sampling.append(i)
        if p.repetition_penalty != 1.0:
            penalized.append(i)
        if item.num_output_tokens < p.min_tokens:
            below_min_tokens.append(i)
        if p.logprobs is not None:
            logprob_rows.append(i)
        if p.forced_token_ids is not None and item.num_output_tokens < len(p.forced_token_ids):
            forced.append(i)
    arrays = {**_penalty_arrays(items, penalized), **_ban_arrays(items, below_min_tokens),
              **_forced_arrays(items, forced)}
    if sampling:
        arrays |= _sampling_arrays(items, sampling, vocab_size)
    if 0 < len(logprob_rows) < len(items):
        arrays["logprob_rows"] = np.array(logprob_rows, np.int64)
    max_top_k = int(arrays["top_k"].max()) if "top_k" in arrays else 0
    max_logprobs = max((items[i].params.logprobs for i in logprob_rows), default=0)
    return _HostRows(arrays, len(items) - len(sampling), len(arrays.get("seeds", ())), max_top_k,
                     logprob_rows, max_logprobs)


def _sampling_arrays(items: list[ScheduledRequest], sampling: list[int], vocab_size: int) -> dict[str, np.ndarray]:
    """Per-row temperature, top-k, top-p, min-p, seeds of the rows that draw (`sampling`); the
    greedy rows get neutral values."""
    params = [item.params for item in items]
    greedy = np.ones(len(items), bool)
    greedy[sampling] = False
    top_k = np.array([p.top_k if 0 < p.top_k < vocab_size else 0 for p in params], np.int64)
    top_p = np.array([p.top_p for p in params])
    min_p = np.array([p.min_p for p in params])
    arrays = {"temperature": np.where(greedy, 1.0, [p.temperature for p in params])}
    if greedy.any():
        arrays["greedy"] = greedy
    if top_k.any():
        arrays["top_k"] = top_k
    if (top_p < 1).any():
        arrays["top_p"] = np.where(top_p < 1, top_p, np.inf)
    if min_p.any():
        arrays["min_p"] = min_p
    seeded = [i for i in sampling if params[i].seed is not None]
    if seeded:
        if len(seeded) < len(items):
            arrays["seeded_rows"] = np.array(seeded, np.int64)
        arrays["seeds"] = np.array([params[i].seed for i in seeded], np.int64)
        arrays["steps"] = np.array([items[i].num_output_tokens for i in seeded], np.int64)
    return arrays


def _penalty_arrays(items: list[ScheduledRequest], rows: list[int]) -> dict[str, np.ndarray]:
    """(row, token id) pairs of every token a penalized row has seen, with the row's penalty."""
    if not rows:
        return {}
    seen = [np.asarray(items[i].all_token_ids, np.int64) for i in rows]
    counts = [len(s) for s in seen]
    return {"penalty_rows": np.repeat(np.array(rows, np.int64), counts),
            "penalty_token_ids": np.concatenate(seen),
            "penalty": np.repeat([items[i].params.repetition_penalty for i in rows], counts).astype(np.float64),
            "penalty_last_rows": np.array(rows, np.int64),
            "penalty_last": np.array([items[i].params.repetition_penalty for i in rows], np.float64)}


def _ban_arrays(items: list[ScheduledRequest], rows: list[int]) -> dict[str, np.ndarray]:
    """(row, token id) pairs that rows below their min_tokens may not draw: stops, and EOS
    unless ignore_eos."""
    banned = {i: [*items[i].params.stop_token_ids, *(() if items[i].params.ignore_eos else items[i].eos_token_ids)]
              for i in rows}
    banned = {i: ids for i, ids in banned.items() if ids}
    if not banned:
        return {}
    return {"ban_rows": np.repeat(np.array(list(banned), np.int64), [len(ids) for ids in banned.values()]),
            "ban_token_ids": np.array([t for ids in banned.values() for t in ids], np.int64)}


def _forced_arrays(items: list[ScheduledRequest], rows: list[int]) -> dict[str, np.ndarray]:
    """Teacher forcing (SamplingParams.forced_token_ids): each forced row and the id its draw becomes."""
    if not rows:
        return {}
    ids = [items[i].params.forced_token_ids[items[i].num_output_tokens] for i in rows]  # type: ignore[index]
    return {"forced_rows": np.array(rows, np.int64), "forced_ids": np.array(ids, np.int64)}


def _to_device(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """One host-to-device copy of every array: packed into one int64 buffer (a float64 by its
    bits, a bool as 0/1), pinned on CUDA, then viewed back on the device (floats as fp32)."""
    if not arrays:
        return {}
    flat = np.concatenate([a.astype(np.int64) if a.dtype == bool else a.view(np.int64) for a in arrays.values()])
    host = torch.from_numpy(flat)
    if device.type == "cuda":
        host = host.pin_memory()
    packed = host.to(device, non_blocking=True)
    out, start = {}, 0
    for name, a in arrays.items():
        view = packed[start:start + a.size]
        start += a.size
        out[name] = (view.view(torch.float64).float() if a.dtype == np.float64
                     else view.bool() if a.dtype == bool else view)
    return out
