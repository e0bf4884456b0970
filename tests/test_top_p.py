"""top_p_threshold (the sort-free nucleus threshold) against its sort-based reference, and both
against the definition of the nucleus, checked with float64 sums of their own.

The Triton kernel runs on CPU tensors under the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU). On a GPU machine the same cases run compiled, and
`test_full_size_*` adds Llama-3's vocabulary (128256) at batch 64.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import kvtier.ops.top_p as tp
from kvtier.ops.kernel_variants import compiled_variants
from kvtier.ops.top_p import top_p_threshold, top_p_threshold_ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="full sizes need a GPU")

NUM_ROWS = 6
VOCABS = [1000, 2500]  # one chunk of TOP_P_BLOCK (masked); three, the last one masked
ROW_KINDS = ["random", "bf16_ties", "coarse_ties", "uniform", "one_hot", "top_k_zeros"]


def make_rows(kind: str, num_rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(num_rows, vocab) fp32 distributions of one kind, drawn on the CPU (the same numbers on
    every machine), on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, vocab, generator=gen) * 3
    if kind == "bf16_ties":  # logits from a bf16 model: many exactly equal probabilities
        logits = logits.bfloat16().float()
    elif kind == "coarse_ties":  # a few hundred tokens per distinct value
        logits = (logits * 2).round() / 2
    elif kind == "uniform":
        logits = torch.zeros(num_rows, vocab)
    elif kind == "one_hot":
        logits = torch.full((num_rows, vocab), float("-inf"))
        logits[torch.arange(num_rows), torch.randint(vocab, (num_rows,), generator=gen)] = 0.0
    elif kind == "top_k_zeros":  # after top-k: all but the 20 largest are exactly 0
        logits = logits.masked_fill(logits < logits.topk(20, dim=-1).values[:, -1:], float("-inf"))
    return torch.softmax(logits, dim=-1).to(DEVICE)


def random_top_p(num_rows: int, seed: int = 0) -> torch.Tensor:
    """(num_rows,) fp32 in [0.01, 0.99], on DEVICE."""
    return (0.01 + 0.98 * torch.rand(num_rows, generator=torch.Generator().manual_seed(seed + 1))).to(DEVICE)


def nucleus_violations(probs: torch.Tensor, top_p: torch.Tensor, t: torch.Tensor, tol: float = 0.0) -> list[str]:
    """Rows whose threshold breaks the definition, by float64 sums: with top_p < 1,
    sum(p[p >= t]) >= top_p and sum(p[p > t]) < top_p; with top_p >= 1, t = 0; t is one of the
    row's values (or 0). tol widens both bounds (for fp32 sums over a large vocabulary)."""
    p, top_p, t = probs.double().cpu(), top_p.double().cpu(), t.double().cpu()
    at_or_above = (p * (p >= t[:, None])).sum(-1)
    above = (p * (p > t[:, None])).sum(-1)
    found = []
    for i in range(p.shape[0]):
        if top_p[i] >= 1:
            ok = t[i] == 0
        else:
            ok = at_or_above[i] >= top_p[i] - tol and above[i] < top_p[i] + tol
        if not ok or not (t[i] == 0 or (p[i] == t[i]).any()):
            found.append(f"row {i}: t {t[i].item()!r} top_p {top_p[i].item()!r} mass >= t "
                         f"{at_or_above[i].item()!r}, > t {above[i].item()!r}")
    return found


# ------------------------------------------------------------------------------- the kernel

@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernel compiled")
def test_interpreter_is_active():
    """Without a GPU the kernel tests must run interpreted; a silent skip would hide them."""
    assert tp._INTERPRETED, "TRITON_INTERPRET=1 was not set before triton was imported"


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("kind", ROW_KINDS)
def test_kernel_equals_reference(kind, vocab):
    probs, top_p = make_rows(kind, NUM_ROWS, vocab), random_top_p(NUM_ROWS)
    top_p[2] = 1.0  # a row without top-p, as a user asks for it ...
    top_p[4] = float("inf")  # ... and as the sampler passes it
    got = top_p_threshold(probs, top_p, backend="triton")
    want = top_p_threshold_ref(probs, top_p)
    assert torch.equal(got, want), f"kernel {got.tolist()} reference {want.tolist()}"
    assert got[2] == 0 and got[4] == 0


@pytest.mark.parametrize("top_p_value", [1e-6, 0.5, 0.999])
def test_kernel_equals_reference_at_extreme_top_p(top_p_value):
    """Only the most likely token (and its ties), about half the mass, nearly all of it."""
    probs = torch.cat([make_rows(kind, 2, 1000, seed=3) for kind in ROW_KINDS])
    top_p = torch.full((probs.shape[0],), top_p_value, device=DEVICE)
    assert torch.equal(top_p_threshold(probs, top_p, backend="triton"), top_p_threshold_ref(probs, top_p))


def test_kernel_reads_the_row_stride():
    """Rows that are views of wider ones (row stride 1037 > V): the padding never counts."""
    wide = make_rows("random", NUM_ROWS, 1037, seed=4)
    probs = wide[:, :1000]  # not distributions any more, which the search does not need
    top_p = random_top_p(NUM_ROWS, seed=4) * probs.sum(-1)
    assert probs.stride(0) == 1037
    assert torch.equal(top_p_threshold(probs, top_p, backend="triton"),
                       top_p_threshold_ref(probs.contiguous(), top_p))


@pytest.mark.parametrize("vocab", VOCABS)
def test_kernel_counts_the_first_and_last_columns(vocab):
    """Mass at the row's ends and at the start of its last chunk (the tail) is found."""
    probs = torch.zeros(3, vocab, device=DEVICE)
    probs[0, -1] = 1.0
    probs[1, 0] = probs[1, -1] = 0.5
    probs[2, (vocab - 1) // tp.TOP_P_BLOCK * tp.TOP_P_BLOCK] = 1.0
    top_p = torch.full((3,), 0.9, device=DEVICE)
    assert top_p_threshold(probs, top_p, backend="triton").tolist() == [1.0, 0.5, 1.0]


def test_no_rows():
    empty = torch.empty(0, 1000, device=DEVICE)
    for backend in ("triton", "torch"):
        assert top_p_threshold(empty, torch.empty(0, device=DEVICE), backend=backend).shape == (0,)


# ------------------------------------------------------------------------------- the definition

@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kind", ROW_KINDS)
def test_thresholds_are_nuclei(kind, backend):
    probs, top_p = make_rows(kind, NUM_ROWS, 2500, seed=5), random_top_p(NUM_ROWS, seed=5)
    top_p[1] = float("inf")
    assert nucleus_violations(probs, top_p, top_p_threshold(probs, top_p, backend=backend)) == []


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_hand_computed_thresholds(backend):
    """Exact binary fractions, so every sum is exact: a mass equal to top_p reaches it (>=), and
    a cut among tied tokens keeps them all."""
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125],  # top_p 0.75: 0.5 + 0.25 reaches it exactly
                          [0.5, 0.25, 0.125, 0.125],  # top_p just above 0.75: both 0.125 join
                          [0.25, 0.5, 0.125, 0.125],  # top_p 0.5: the largest alone, wherever it is
                          [0.375, 0.125, 0.25, 0.25],  # top_p 0.5: sorting keeps one 0.25, t keeps both
                          [0.25, 0.25, 0.25, 0.25],  # uniform: any top_p keeps all
                          [0.0, 1.0, 0.0, 0.0]], device=DEVICE)  # one-hot: t = 1.0
    top_p = torch.tensor([0.75, 0.7500001, 0.5, 0.5, 0.3, 0.9], device=DEVICE)
    want = torch.tensor([0.25, 0.125, 0.5, 0.25, 0.25, 1.0], device=DEVICE)
    assert torch.equal(top_p_threshold(probs, top_p, backend=backend), want)


def test_the_nucleus_check_catches_a_threshold_one_value_off():
    """The next larger of a row's values leaves too little mass, the next smaller keeps a token
    too many: on every row, so the check above can fail."""
    probs, top_p = make_rows("random", NUM_ROWS, 1000, seed=6), random_top_p(NUM_ROWS, seed=6)
    t = top_p_threshold_ref(probs, top_p)
    assert nucleus_violations(probs, top_p, t) == []
    larger = torch.where(probs > t[:, None], probs, float("inf")).amin(-1)
    smaller = torch.where(probs < t[:, None], probs, -1.0).amax(-1)
    assert (smaller >= 0).all(), "a row's smallest value made the cut: pick another seed"
    assert len(nucleus_violations(probs, top_p, larger)) == NUM_ROWS
    assert len(nucleus_violations(probs, top_p, smaller)) == NUM_ROWS


# ------------------------------------------------------------------------------- full sizes (GPU)

FULL_ROWS, FULL_VOCAB = 64, 128256  # a decode batch of Llama-3
# fp32 sums over 128256 tokens, in the kernel's order and the reference's, differ by ~1e-7; a
# row whose cut lies within FULL_TOL of top_p may be cut one distinct value apart
FULL_TOL = 1e-5


@on_gpu
@pytest.mark.parametrize("kind", ROW_KINDS)
def test_full_size_equals_reference_away_from_rounding(kind):
    """Batch 64 at V = 128256 (rows of one kind, random top_p, one row without top-p): the
    kernel (picked by default on CUDA) equals the reference computed on the CPU wherever the
    reference's cut is more than FULL_TOL from top_p, and is a nucleus within FULL_TOL on every row."""
    probs, top_p = make_rows(kind, FULL_ROWS, FULL_VOCAB, seed=7), random_top_p(FULL_ROWS, seed=7)
    top_p[0] = float("inf")
    got = top_p_threshold(probs, top_p).cpu()
    want = top_p_threshold_ref(probs.cpu(), top_p.cpu())
    assert nucleus_violations(probs, top_p, got, tol=FULL_TOL) == []
    p64, top_p64 = probs.double().cpu(), top_p.double().cpu()
    margin = torch.minimum((p64 * (p64 >= want[:, None])).sum(-1) - top_p64,
                           top_p64 - (p64 * (p64 > want[:, None])).sum(-1))
    clear = (margin > FULL_TOL) | (top_p64 >= 1)
    assert clear.sum() >= FULL_ROWS // 2, "too few rows away from rounding for the comparison to mean much"
    assert torch.equal(got[clear], want[clear]), f"rows {torch.nonzero(got != want).flatten().tolist()} differ"


@on_gpu
def test_precompile_compiles_the_only_variant():
    """After precompile no batch size, vocabulary or row stride compiles another variant."""
    tp.precompile(DEVICE)
    name = "kvtier.ops._top_p_kernel._top_p_threshold_kernel"
    assert compiled_variants()[name] == 1
    for num_rows, vocab, width in [(1, 7, 7), (3, 32000, 32000), (64, FULL_VOCAB, FULL_VOCAB), (5, 1000, 1031)]:
        probs = make_rows("random", num_rows, width)[:, :vocab]
        top_p_threshold(probs, random_top_p(num_rows), backend="triton")
    assert compiled_variants()[name] == 1


# ------------------------------------------------------------------------------- dispatch

def test_cpu_tensors_take_the_torch_path(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("the kernel must not run for CPU tensors by default")
    monkeypatch.setattr(tp, "_launch", no_kernel)
    probs, top_p = torch.full((2, 8), 0.125), torch.tensor([0.5, 1.0])
    assert top_p_threshold(probs, top_p).tolist() == [0.125, 0.0]


def test_triton_backend_without_interpreter_or_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(tp, "_INTERPRETED", False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        top_p_threshold(torch.full((1, 4), 0.25), torch.tensor([0.5]), backend="triton")


def test_a_cpu_sampler_never_imports_triton():
    """precompile is a no-op off CUDA, and the CPU path is the reference: a CPU-only install
    (no Triton) samples with top-p."""
    code = ("import sys, torch; from kvtier.engine.sampler import Sampler, _top_p; "
            "Sampler(torch.device('cpu')); _top_p(torch.full((2, 4), 0.25), torch.tensor([0.5, float('inf')])); "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------- errors

def _bad_calls():
    """(name, kwargs for top_p_threshold, message) on otherwise valid CPU arguments."""
    probs, top_p = torch.full((3, 8), 0.125), torch.full((3,), 0.5)
    return [
        ("1-D probs", dict(probs=probs[0]), "2-D tensor"),
        ("3-D probs", dict(probs=probs[None]), "2-D tensor"),
        ("2-D top_p", dict(top_p=top_p[None]), "1-D tensor with one value per row of probs"),
        ("top_p length", dict(top_p=top_p[:2]), r"one value per row of probs \(3\)"),
        ("probs dtype", dict(probs=probs.half()), "probs must be float32"),
        ("top_p dtype", dict(top_p=top_p.double()), "top_p must be float32"),
        ("no columns", dict(probs=probs[:, :0]), "no columns"),
        ("strided columns", dict(probs=torch.full((3, 16), 0.0625)[:, ::2]), "contiguous"),
        ("probs elsewhere", dict(probs=probs.to("meta"), top_p=top_p.to("meta")), "only CPU and CUDA"),
        ("device mismatch", dict(top_p=top_p.to("meta")), "top_p is on meta but probs on cpu"),
        ("backend", dict(backend="cuda"), "backend must be one of"),
    ], dict(probs=probs, top_p=top_p)


@pytest.mark.parametrize("case", range(len(_bad_calls()[0])), ids=[c[0] for c in _bad_calls()[0]])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_launcher_rejects(case, backend):
    cases, valid = _bad_calls()
    _, override, message = cases[case]
    with pytest.raises(ValueError, match=message):
        top_p_threshold(**{**valid, "backend": backend, **override})
