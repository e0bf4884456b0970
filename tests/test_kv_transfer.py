"""copy_blocks (the batched GPU <-> pinned CPU block copy) against its pure-torch reference.

The Triton kernel runs on CPU tensors under the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU). On a GPU machine the same cases run compiled between a
CUDA cache and a pinned CPU pool (read through UVA), and `test_full_size_*` adds Llama-3-8B-sized
blocks (2 MiB each).
"""

from __future__ import annotations

import pytest
import torch

import kvtier.ops.kv_transfer as kt
from kvtier.ops.kv_transfer import copy_blocks, copy_blocks_ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # of the "GPU" cache and the ids
on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="full sizes need a GPU")

L, BS, HKV, D = 3, 4, 2, 8  # row = BS * HKV * D = 64 elements
NUM_GPU_BLOCKS, NUM_CPU_BLOCKS = 11, 9


def rand_bits(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random values on gen's device, none zero, so a missed or misplaced row cannot pass for a
    copied one."""
    x = torch.rand(shape, generator=gen, device=gen.device) + 0.5
    sign = torch.randint(0, 2, shape, generator=gen, device=gen.device) * 2 - 1
    return (x * sign).to(dtype)


def caches(dtype: torch.dtype, seed: int = 0, row: tuple[int, int, int] = (BS, HKV, D),
           device: torch.device = DEVICE):
    """(gpu_kv (L, 2, Ng, *row) on `device`, cpu_kv (Nc, L, 2, *row) on the CPU, pinned when
    `device` is CUDA). Drawn on the CPU: the same numbers on every machine."""
    gen = torch.Generator().manual_seed(seed)
    gpu_kv = rand_bits((L, 2, NUM_GPU_BLOCKS, *row), dtype, gen).to(device)
    cpu_kv = rand_bits((NUM_CPU_BLOCKS, L, 2, *row), dtype, gen)
    return gpu_kv, cpu_kv.pin_memory() if device.type == "cuda" else cpu_kv


def ids(*block_ids: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Block ids where copy_blocks wants them: on the GPU tensor's device."""
    return torch.tensor(block_ids, dtype=dtype, device=DEVICE)


def gpu_view(gpu_kv: torch.Tensor) -> torch.Tensor:
    return gpu_kv.view(gpu_kv.shape[0], 2, gpu_kv.shape[2], -1).permute(2, 0, 1, 3)


def cpu_view(cpu_kv: torch.Tensor) -> torch.Tensor:
    return cpu_kv.view(cpu_kv.shape[0], cpu_kv.shape[1], 2, -1)


def bits(x: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers: equality is byte equality (NaN and -0.0 included). Waits
    for the GPU first: copies into pinned memory are asynchronous."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return x.contiguous().view(torch.uint8)


def assert_copied(dst_before: torch.Tensor, dst_after: torch.Tensor, src: torch.Tensor,
                  src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """Destination blocks hold their source blocks byte for byte; every other block is unchanged."""
    expected = dst_before.clone()
    for s, d in zip(src_ids.tolist(), dst_ids.tolist()):
        expected[d] = src[s].to(expected.device)
    assert torch.equal(bits(dst_after), bits(expected))


# ------------------------------------------------------------------------------- the kernel

@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernel compiled")
def test_interpreter_is_active():
    """Without a GPU the kernel tests must run interpreted; a silent skip would hide them."""
    assert kt._INTERPRETED, "TRITON_INTERPRET=1 was not set before triton was imported"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("direction", ["reload", "store"])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_kernel_matches_reference(dtype, direction, id_dtype):
    gpu_kv, cpu_kv = caches(dtype)
    gpu_ids = ids(7, 2, 10, 0, 5, dtype=id_dtype)  # scattered, not sorted
    cpu_ids = ids(3, 8, 0, 6, 1, dtype=id_dtype)
    if direction == "reload":  # CPU pool -> GPU cache
        src, dst, src_ids, dst_ids = cpu_view(cpu_kv), gpu_view(gpu_kv), cpu_ids, gpu_ids
    else:
        src, dst, src_ids, dst_ids = gpu_view(gpu_kv), cpu_view(cpu_kv), gpu_ids, cpu_ids
    before = dst.clone()
    ref = dst.clone()
    copy_blocks_ref(src, ref, src_ids, dst_ids)
    copy_blocks(src, dst, src_ids, dst_ids, backend="triton")
    assert torch.equal(bits(dst), bits(ref))
    assert_copied(before, dst, src, src_ids, dst_ids)


@pytest.mark.parametrize("num_programs", [1, 3, 1000])
def test_kernel_any_grid_size(num_programs):
    """Fewer programs than rows loop; more are cut to the number of rows."""
    gpu_kv, cpu_kv = caches(torch.bfloat16, seed=1)
    src_ids, dst_ids = ids(4, 0, 8), ids(9, 1, 6)
    before = gpu_view(gpu_kv).clone()
    copy_blocks(cpu_view(cpu_kv), gpu_view(gpu_kv), src_ids, dst_ids, backend="triton",
                num_programs=num_programs)
    assert_copied(before, gpu_view(gpu_kv), cpu_view(cpu_kv), src_ids, dst_ids)


@pytest.mark.parametrize("row, chunk_bytes, raw", [
    ((BS, HKV, D), 16384, torch.int64),  # whole row in one chunk
    ((BS, HKV, D), 32, torch.int64),  # 128-byte rows in 4 chunks
    ((1, 1, 3), 4, torch.int16),  # 6-byte rows: 2-element chunks, the last one masked
    ((1, 1, 5), 16384, torch.int16),  # 10-byte rows: one masked chunk (power of two above 5)
])
def test_kernel_row_sizes_and_chunks(row, chunk_bytes, raw):
    gpu_kv, cpu_kv = caches(torch.float16, seed=2, row=row)
    src, dst = gpu_view(gpu_kv), cpu_view(cpu_kv)
    assert kt._raw_dtype(src, dst) == raw
    src_ids, dst_ids = ids(1, 10, 3, 6), ids(8, 2, 0, 5)
    before = dst.clone()
    copy_blocks(src, dst, src_ids, dst_ids, backend="triton", chunk_bytes=chunk_bytes)
    assert_copied(before, dst, src, src_ids, dst_ids)


def test_kernel_within_one_cache():
    """GPU -> GPU inside one cache (e.g. copy-on-write of a shared block): disjoint ids."""
    gpu_kv, _ = caches(torch.bfloat16, seed=3)
    view = gpu_view(gpu_kv)
    src_ids, dst_ids = ids(0, 5, 2), ids(9, 1, 7)
    before = view.clone()
    copy_blocks(view, view, src_ids, dst_ids, backend="triton")
    assert_copied(before, view, before, src_ids, dst_ids)


def test_round_trip_restores_blocks():
    """Store GPU blocks to the CPU pool, overwrite them on the GPU, reload: the bytes come back."""
    gpu_kv, cpu_kv = caches(torch.bfloat16, seed=4)
    original = gpu_kv.clone()
    gpu_ids, cpu_ids = ids(6, 3, 9), ids(2, 7, 4)
    copy_blocks(gpu_view(gpu_kv), cpu_view(cpu_kv), gpu_ids, cpu_ids, backend="triton")
    gpu_view(gpu_kv)[gpu_ids] = 1.0
    copy_blocks(cpu_view(cpu_kv), gpu_view(gpu_kv), cpu_ids, gpu_ids, backend="triton")
    assert torch.equal(bits(gpu_kv), bits(original))


def test_kernel_no_ids_is_a_no_op():
    gpu_kv, cpu_kv = caches(torch.float32)
    before = gpu_kv.clone()
    empty = torch.empty(0, dtype=torch.int64, device=DEVICE)
    copy_blocks(cpu_view(cpu_kv), gpu_view(gpu_kv), empty, empty, backend="triton")
    assert torch.equal(gpu_kv, before)


# ------------------------------------------------------------------------------- full sizes (GPU)

# Llama-3-8B: 32 layers, K and V, 16 tokens x 8 KV heads x 128 bf16 = 32 KiB rows, 2 MiB blocks.
FULL_LAYERS, FULL_ROW = 32, (16, 8, 128)


def full_size_caches(num_gpu_blocks: int, num_cpu_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gpu_kv (32, 2, Ng, 16, 8, 128) on the GPU, cpu_kv (Nc, 32, 2, 16, 8, 128) pinned), random."""
    gpu_kv = rand_bits((FULL_LAYERS, 2, num_gpu_blocks, *FULL_ROW), torch.bfloat16,
                       torch.Generator(DEVICE).manual_seed(20))
    cpu_kv = rand_bits((num_cpu_blocks, FULL_LAYERS, 2, *FULL_ROW), torch.bfloat16,
                       torch.Generator().manual_seed(21))
    return gpu_kv, cpu_kv.pin_memory()


@on_gpu
@pytest.mark.parametrize("direction", ["reload", "store"])
@pytest.mark.parametrize("backend", [None, "triton"])
def test_full_size_scattered_blocks(direction, backend):
    """64 scattered 2 MiB blocks (a run of 16 consecutive ids among them) each way, byte for byte."""
    gpu_kv, cpu_kv = full_size_caches(128, 96)
    gen = torch.Generator().manual_seed(22)
    scattered = [i for i in torch.randperm(128, generator=gen).tolist() if not 40 <= i < 56][:48]
    gpu_ids = torch.tensor(scattered[:20] + list(range(40, 56)) + scattered[20:], device=DEVICE)
    cpu_ids = torch.randperm(96, generator=gen)[:64].to(DEVICE)
    if direction == "reload":
        src, dst, src_ids, dst_ids = cpu_view(cpu_kv), gpu_view(gpu_kv), cpu_ids, gpu_ids
    else:
        src, dst, src_ids, dst_ids = gpu_view(gpu_kv), cpu_view(cpu_kv), gpu_ids, cpu_ids
    before = dst.clone()
    copy_blocks(src, dst, src_ids, dst_ids, backend=backend)
    assert_copied(before, dst, src, src_ids, dst_ids)


@on_gpu
def test_full_size_round_trip_on_a_side_stream():
    """Store, overwrite, reload on a copy stream as the transfer engine does: the bytes come back."""
    gpu_kv, cpu_kv = full_size_caches(64, 64)
    original = gpu_kv.clone()
    gpu_ids, cpu_ids = torch.arange(0, 64, 2, device=DEVICE), torch.arange(63, 31, -1, device=DEVICE)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        copy_blocks(gpu_view(gpu_kv), cpu_view(cpu_kv), gpu_ids, cpu_ids)
        gpu_view(gpu_kv)[gpu_ids] = 0.5
        copy_blocks(cpu_view(cpu_kv), gpu_view(gpu_kv), cpu_ids, gpu_ids)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(bits(gpu_kv), bits(original))


# ------------------------------------------------------------------------------- dispatch

def test_cpu_tensors_take_the_torch_path(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("the kernel must not run for CPU tensors by default")
    monkeypatch.setattr(kt, "_launch", no_kernel)
    gpu_kv, cpu_kv = caches(torch.bfloat16, seed=5, device=torch.device("cpu"))
    src_ids, dst_ids = torch.tensor([2, 0]), torch.tensor([10, 4])
    before = gpu_view(gpu_kv).clone()
    copy_blocks(cpu_view(cpu_kv), gpu_view(gpu_kv), src_ids, dst_ids)
    assert_copied(before, gpu_view(gpu_kv), cpu_view(cpu_kv), src_ids, dst_ids)


def test_triton_backend_without_interpreter_or_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(kt, "_INTERPRETED", False)
    gpu_kv, cpu_kv = caches(torch.bfloat16, device=torch.device("cpu"))
    ids = torch.tensor([0])
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        copy_blocks(cpu_view(cpu_kv), gpu_view(gpu_kv), ids, ids, backend="triton")


# ------------------------------------------------------------------------------- errors

def _bad_calls():
    """(name, kwargs for copy_blocks, message) on otherwise valid CPU arguments."""
    gpu_kv, cpu_kv = caches(torch.bfloat16, device=torch.device("cpu"))
    src, dst = cpu_view(cpu_kv), gpu_view(gpu_kv)
    ids = torch.tensor([1, 2])
    return [
        ("3-D src", dict(src=src[:, 0]), "4-D tensor"),
        ("row shape", dict(src=src[:, :2]), "src rows"),
        ("dtype", dict(src=src.float()), "dtype"),
        ("strided rows", dict(src=src[..., ::2], dst=dst[..., ::2]), "contiguous"),
        ("float ids", dict(src_block_ids=ids.float()), "int32/int64"),
        ("2-D ids", dict(src_block_ids=ids[None]), "1-D"),
        ("lengths", dict(dst_block_ids=torch.tensor([1, 2, 3])), "2 src_block_ids but 3"),
        ("src id too large", dict(src_block_ids=torch.tensor([1, NUM_CPU_BLOCKS])), r"\[0, 9\)"),
        ("negative dst id", dict(dst_block_ids=torch.tensor([-1, 2])), r"\[0, 11\)"),
        ("repeated dst id", dict(dst_block_ids=torch.tensor([4, 4])), "distinct"),
        ("ids elsewhere", dict(src_block_ids=ids.to("meta")), "is on meta"),
        ("backend", dict(backend="cuda"), "backend"),
        ("num_programs", dict(backend="triton", num_programs=0), "num_programs"),
        ("chunk_bytes", dict(backend="triton", chunk_bytes=3000), "power of two"),
    ], dict(src=src, dst=dst, src_block_ids=ids, dst_block_ids=torch.tensor([3, 0]))


@pytest.mark.parametrize("case", range(len(_bad_calls()[0])), ids=[c[0] for c in _bad_calls()[0]])
def test_launcher_rejects(case):
    cases, valid = _bad_calls()
    _, override, message = cases[case]
    dst_before = valid["dst"].clone()
    with pytest.raises(ValueError, match=message):
        copy_blocks(**{**valid, **override})
    assert torch.equal(valid["dst"], dst_before), "a refused call must not write"
