"""The vectorized sampler against a per-row reference: every option mixed in one batch; seeded rows
reproducible whatever the batch; unseeded draws follow the distribution; the reference can fail."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from kvtier import SamplingParams
from kvtier.engine.sampler import Sampler, seeded_exponentials
from kvtier.scheduler.output import ScheduledRequest

VOCAB = 64
EOS = (3, 7)


def item(params: SamplingParams, num_output_tokens: int = 0, seen: tuple[int, ...] = (),
         request_id: str = "r") -> ScheduledRequest:
    penalized = params.repetition_penalty != 1.0
    return ScheduledRequest(request_id, [0], 0, (0,), True, params, seen if penalized else (), 1,
                            eos_token_ids=EOS, num_output_tokens=num_output_tokens)


def random_params(rng: random.Random) -> SamplingParams:
    """One row's options: each on or off at random, so that a batch mixes all of them."""
    pick = lambda *choices: rng.choice(choices)  # noqa: E731
    return SamplingParams(
        temperature=pick(0.0, 0.5, 1.0, 1.0, 1.7), top_k=pick(0, 0, 1, 3, 8, 20, VOCAB, VOCAB + 30),
        top_p=pick(1.0, 0.9, 0.7, 0.5), min_p=pick(0.0, 0.0, 0.1), seed=pick(None, rng.randrange(-2**63, 2**63)),
        repetition_penalty=pick(1.0, 1.0, 1.3, 0.7), min_tokens=pick(0, 0, 3, 6), ignore_eos=pick(False, True),
        stop_token_ids=pick([], [11, 12]), logprobs=pick(None, 0, 1, 5), max_tokens=None)


def random_batch(seed: int, num_rows: int = 32) -> tuple[torch.Tensor, list[ScheduledRequest]]:
    rng = random.Random(seed)
    items = [item(random_params(rng), rng.randrange(4), tuple(rng.choices(range(VOCAB), k=rng.randrange(1, 30))),
                  f"r{i}") for i in range(num_rows)]
    logits = torch.randn(num_rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2
    logits[0, :] = 0.5  # a row of ties: top-k and top-p keep them all
    logits[1::3, EOS[0]] += 4  # an EOS likely enough that banning it below min_tokens shows
    return logits, items


@dataclasses.dataclass
class Expected:
    token_id: int | None  # None: an unseeded draw, which only has to be in `allowed`
    allowed: torch.Tensor  # (V,) bool: the tokens the draw may return
    logprobs: torch.Tensor | None  # (V,) the row's logprobs, where asked


def reference_row(row: torch.Tensor, it: ScheduledRequest, top_p_first: bool = False,
                  processed_logprobs: bool = False) -> Expected:
    """The sampler's semantics for one row, spelled out; the flags break it on purpose."""
    p, raw, row = it.params, row, row.clone()
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(it.all_token_ids)))
        row[seen] = torch.where(row[seen] > 0, row[seen] / p.repetition_penalty, row[seen] * p.repetition_penalty)
    if it.num_output_tokens < p.min_tokens:
        banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(it.eos_token_ids))
        row[banned] = float("-inf")
    logprobs = torch.log_softmax(row if processed_logprobs else raw, -1) if p.logprobs is not None else None
    if p.greedy:
        token = int(row.argmax())
        return Expected(token, torch.arange(VOCAB) == token, logprobs)
    probs = reference_probs(row, p, top_p_first)
    if p.seed is None:
        return Expected(None, probs > 0, logprobs)
    noise = seeded_exponentials(torch.tensor([p.seed]), torch.tensor([it.num_output_tokens]), VOCAB)[0]
    return Expected(int((probs / noise).argmax()), probs > 0, logprobs)


def reference_probs(row: torch.Tensor, p: SamplingParams, top_p_first: bool = False) -> torch.Tensor:
    """/ temperature -> top-k -> top-p -> min-p, unnormalized (zeros where excluded)."""
    row = row / p.temperature

    def top_k(row: torch.Tensor) -> torch.Tensor:
        if not 0 < p.top_k < VOCAB:
            return row
        return row.masked_fill(row < torch.topk(row, p.top_k).values[-1], float("-inf"))

    def top_p(probs: torch.Tensor) -> torch.Tensor:
        if p.top_p >= 1.0:
            return probs
        sorted_probs = probs.sort(descending=True).values
        last_kept = sorted_probs[sorted_probs.cumsum(-1) - sorted_probs < p.top_p][-1]
        return probs.masked_fill(probs < last_kept, 0.0)  # and every token tied with the last kept

    if top_p_first:
        probs = top_p(torch.softmax(row, -1))
        probs = torch.softmax(top_k(probs.log()), -1)
    else:
        probs = top_p(torch.softmax(top_k(row), -1))
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs


def disagreements(logits, items, sampled, **mutation) -> list[str]:
    """Where the sampler's output differs from the reference's (empty: they agree)."""
    found = []
    for i, (it, s) in enumerate(zip(items, sampled)):
        want = reference_row(logits[i], it, **mutation)
        if (want.token_id is not None and s.token_id != want.token_id) or not want.allowed[s.token_id]:
            found.append(f"row {i}: token {s.token_id}, want {want.token_id} ({it.params})")
        if want.logprobs is None:
            if s.logprob is not None:
                found.append(f"row {i}: logprobs not asked for")
            continue
        # ids compared through their logprobs: which of tied tokens topk lists first is not defined
        top_values = want.logprobs.topk(it.params.logprobs).values.tolist()
        got_ids, got_values = [t for t, _ in s.top_logprobs], [v for _, v in s.top_logprobs]
        if (abs(s.logprob - want.logprobs[s.token_id].item()) > 1e-5
                or s.rank != int((want.logprobs > want.logprobs[s.token_id]).sum()) + 1
                or len(set(got_ids)) != len(top_values)
                or not torch.allclose(torch.tensor(got_values), torch.tensor(top_values), atol=1e-5)
                or not torch.allclose(want.logprobs[got_ids], torch.tensor(got_values), atol=1e-5)):
            found.append(f"row {i}: logprobs {s.logprob} rank {s.rank} top {s.top_logprobs}")
    return found


def disagreements_over_steps(seed: int, **mutation) -> list[str]:
    """A random batch drawn at 6 successive steps: new seeded noise each, rows crossing min_tokens."""
    logits, items = random_batch(seed)
    sampler, found = Sampler(torch.device("cpu"), seed=seed), []
    for step in range(6):
        step_items = [dataclasses.replace(it, num_output_tokens=it.num_output_tokens + step) for it in items]
        found += disagreements(logits, step_items, sampler(logits, step_items), **mutation)
    return found


@pytest.mark.parametrize("seed", range(12))
def test_equals_the_per_row_reference_on_mixed_batches(seed):
    assert disagreements_over_steps(seed) == []


@pytest.mark.parametrize("mutation", ["top_p_first", "processed_logprobs"])
def test_the_reference_comparison_catches_a_wrong_sampler(mutation):
    """A reference that applies top-p before top-k, or takes logprobs after the penalties, disagrees
    with the sampler somewhere in the batches the test above uses: that test can fail."""
    assert [d for seed in range(12) for d in disagreements_over_steps(seed, **{mutation: True})]


def test_seeded_noise_is_splitmix64_mod_2_64():
    """int64 tensor ops wrap and shift like uint64 ones: the noise equals a Python-int splitmix64."""
    gamma, mask = 0x9E3779B97F4A7C15, 2**64 - 1

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    def noise(seed: int, step: int, token_id: int) -> float:
        row_key = mix((mix((seed + gamma) & mask) + (step + 1) * gamma) & mask)
        bits = mix((row_key + (token_id + 1) * gamma) & mask)
        return -math.log(((bits >> 12) + 0.5) * 2.0**-52)

    seeds, steps = [0, 1, -1, 2**63 - 1, -2**63, 987654321], [0, 5, 1000, 3, 2**40, 0]
    got = seeded_exponentials(torch.tensor(seeds), torch.tensor(steps), 1000)
    for i, (seed, step) in enumerate(zip(seeds, steps)):
        for token_id in (0, 1, 500, 999):
            assert got[i, token_id].item() == pytest.approx(noise(seed & mask, step, token_id), rel=1e-6)
    assert 0 < got.min() and got.isfinite().all() and abs(got.mean().item() - 1) < 0.02


def test_a_seeded_row_draws_the_same_alone_anywhere_in_any_batch_at_any_time():
    seeded = item(SamplingParams(temperature=1.0, seed=1234, top_p=0.95, max_tokens=None), num_output_tokens=3)
    row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(0))
    alone = Sampler(torch.device("cpu"), seed=0)(row[None], [seeded])[0].token_id
    sampler = Sampler(torch.device("cpu"), seed=1)  # another engine seed, and a generator already used
    for seed, position in [(1, 0), (2, 3), (3, 7)]:
        logits, others = random_batch(seed, num_rows=7)
        logits = torch.cat([logits[:position], row[None], logits[position:]])
        assert sampler(logits, others[:position] + [seeded] + others[position:])[position].token_id == alone


def test_seeded_draws_change_with_the_step_and_differ_between_n_children():
    row = torch.zeros(VOCAB)  # uniform: every draw is the noise's argmax
    parent = SamplingParams(n=3, temperature=1.0, seed=2**63 - 2, max_tokens=None)
    children = [item(parent.child(i)) for i in range(3)]
    sampler = Sampler(torch.device("cpu"))
    draws = [[sampler(row[None], [dataclasses.replace(c, num_output_tokens=t)])[0].token_id for t in range(20)]
             for c in children]
    assert all(len(set(d)) > 5 for d in draws)  # not one token over and over
    assert len({tuple(d) for d in draws}) == 3  # each child its own stream, incl. the wrapped seed


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0])


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0), SamplingParams(temperature=0.5), SamplingParams(temperature=1.0, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.7), SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=1.5, top_k=4, top_p=0.8)],
    ids=["t1", "t0.5", "top_k3", "top_p0.7", "min_p0.2", "t1.5-top_k4-top_p0.8"])
@pytest.mark.parametrize("seeded", [False, True], ids=["generator", "seeded"])
def test_draws_follow_the_processed_distribution(params, seeded):
    """4000 rows in one batch (distinct seeds when seeded): frequencies within 0.03 of the
    reference's probabilities, and never a token that top-k / top-p / min-p excluded."""
    num_draws = 4000
    items = [item(dataclasses.replace(params, seed=i if seeded else None)) for i in range(num_draws)]
    sampled = Sampler(torch.device("cpu"), seed=0)(LOGITS.expand(num_draws, -1).contiguous(), items)
    counts = torch.bincount(torch.tensor([s.token_id for s in sampled]), minlength=len(LOGITS)).float()
    probs = reference_probs(LOGITS, params)
    probs = probs / probs.sum()
    assert torch.allclose(counts / num_draws, probs, atol=0.03)
    assert (counts[probs == 0] == 0).all()


def test_sample_keeps_tokens_on_the_device_and_finishes_once_per_step():
    logits, items = random_batch(5)
    sampler = Sampler(torch.device("cpu"))
    calls = []
    finish = sampler._with_logprobs
    sampler._with_logprobs = lambda raw, token_ids, its: calls.append(its) or finish(raw, token_ids, its)
    draw = sampler.sample(logits, items)
    assert draw.token_ids.shape == (len(items),) and draw.token_ids.dtype == torch.int64
    assert [s.token_id for s in draw.to_host()] == draw.token_ids.tolist()
    assert calls == [items]


def test_an_all_greedy_batch_is_an_argmax_and_leaves_the_generator_alone():
    logits = torch.randn(5, VOCAB)
    sampler = Sampler(torch.device("cpu"))
    state = sampler.default_generator.get_state()
    sampled = sampler(logits, [item(SamplingParams(temperature=0.0))] * 5)
    assert [s.token_id for s in sampled] == logits.argmax(-1).tolist()
    assert torch.equal(sampler.default_generator.get_state(), state)
