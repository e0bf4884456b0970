"""kvtier.ops.dma: the CUDA runtime binding behind 2-D copies -- which one is chosen, its errors as
DMAError, the fallback when none imports (CPU, with fake modules), and real strided copies (GPU)."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

from kvtier.ops import dma

MODULES = ("cupy", "cupy.cuda", "cupy.cuda.runtime", "cuda", "cuda.bindings", "cuda.bindings.runtime")
on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="real DMA needs a GPU")


@pytest.fixture
def fresh():
    """The binding is chosen once per process: forget the choice before and after the test."""
    dma._memcpy_2d.cache_clear()
    yield
    dma._memcpy_2d.cache_clear()


def _install(monkeypatch, leaf: str, module: types.ModuleType | None) -> None:
    """Put `module` at `leaf` (None: make the import fail) with stand-in parents."""
    for name in MODULES:
        if name.startswith(leaf.split(".")[0]):
            monkeypatch.setitem(sys.modules, name, module if name == leaf or module is None
                                else types.ModuleType(name))


def _fake_cupy(calls: list, status: int = 0) -> types.ModuleType:
    runtime = types.ModuleType("cupy.cuda.runtime")

    class CUDARuntimeError(RuntimeError):
        def __init__(self, status: int):
            super().__init__(f"cudaErrorInvalidPitchValue: invalid pitch argument ({status})")
            self.status = status

    def memcpy2DAsync(*args):
        calls.append(args)
        if status:
            raise CUDARuntimeError(status)

    runtime.memcpyDefault, runtime.CUDARuntimeError, runtime.memcpy2DAsync = 4, CUDARuntimeError, memcpy2DAsync
    return runtime


def _fake_cuda_python(calls: list, status: int = 0) -> types.ModuleType:
    runtime = types.ModuleType("cuda.bindings.runtime")
    runtime.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyDefault="default")
    runtime.cudaError_t = types.SimpleNamespace(cudaSuccess=0)
    runtime.cudaGetErrorName = lambda err: (0, b"cudaErrorInvalidValue")

    def cudaMemcpy2DAsync(*args):
        calls.append(args)
        return (status,)

    runtime.cudaMemcpy2DAsync = cudaMemcpy2DAsync
    return runtime


def test_neither_binding_turns_strided_copies_off_with_one_warning(monkeypatch, fresh):
    _install(monkeypatch, "cupy.cuda.runtime", None)
    _install(monkeypatch, "cuda.bindings.runtime", None)
    with pytest.warns(RuntimeWarning, match="KV blocks load whole") as record:
        assert not dma.rows_available(torch.device("cuda"))
        assert not dma.rows_available(torch.device("cuda", 1))
    assert len(record) == 1 and "cupy" in str(record[0].message) and "cuda-python" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dma.rows_available(torch.device("cpu"))  # plain copies there


def test_the_cpu_never_imports_a_binding(monkeypatch, fresh):
    _install(monkeypatch, "cupy.cuda.runtime", None)
    _install(monkeypatch, "cuda.bindings.runtime", None)
    src = torch.arange(24.0).view(4, 6)[:, :3]  # rows of 3 at a pitch of 6
    dst = torch.zeros(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dma.copy_rows(dst, src)
        assert dma.rows_available(torch.device("cpu"))
    assert torch.equal(dst, src) and dma._memcpy_2d.cache_info().currsize == 0


def test_cupy_is_preferred_and_its_errors_become_dma_errors(monkeypatch, fresh):
    cupy_calls, cuda_python_calls = [], []
    _install(monkeypatch, "cupy.cuda.runtime", _fake_cupy(cupy_calls, status=12))
    _install(monkeypatch, "cuda.bindings.runtime", _fake_cuda_python(cuda_python_calls))
    assert dma.rows_available(torch.device("cuda"))
    with pytest.raises(dma.DMAError, match="cudaErrorInvalidPitchValue") as e:
        dma._memcpy_2d()(1000, 64, 2000, 128, 256, 3, 77)
    assert (e.value.code, e.value.name) == (12, "cudaErrorInvalidPitchValue")
    assert isinstance(e.value.__cause__, RuntimeError)
    assert cupy_calls == [(1000, 64, 2000, 128, 256, 3, 4, 77)] and cuda_python_calls == []


def test_cuda_python_when_cupy_is_absent(monkeypatch, fresh):
    calls = []
    _install(monkeypatch, "cupy.cuda.runtime", None)
    _install(monkeypatch, "cuda.bindings.runtime", _fake_cuda_python(calls))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        memcpy_2d = dma._memcpy_2d()
    memcpy_2d(1000, 128, 2000, 64, 64, 3, 77)
    assert calls == [(1000, 128, 2000, 64, 64, 3, "default", 77)]
    _install(monkeypatch, "cuda.bindings.runtime", _fake_cuda_python(calls, status=1))
    dma._memcpy_2d.cache_clear()
    with pytest.raises(dma.DMAError) as e:
        dma._memcpy_2d()(1000, 128, 2000, 64, 64, 3, 77)
    assert (e.value.code, e.value.name) == (1, "cudaErrorInvalidValue")


def _importable() -> list[str]:
    found = []
    for name, load in dma.BINDINGS:
        try:
            load()
        except (ImportError, OSError, AttributeError):
            continue
        found.append(name)
    return found


@on_gpu
@pytest.mark.parametrize("binding", _importable() if torch.cuda.is_available() else [])
def test_strided_rows_round_trip_byte_exact(monkeypatch, fresh, binding):
    """One layer group of n consecutive blocks, pinned -> GPU staging and back, on a side stream."""
    monkeypatch.setattr(dma, "BINDINGS", tuple(b for b in dma.BINDINGS if b[0] == binding))
    cpu = torch.randn(64, 8, 2, 1024, dtype=torch.bfloat16).pin_memory()  # (block, layer, kv, row)
    stage = torch.zeros(64, 8, 2, 1024, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        dma.copy_rows(stage[3:40, 4:], cpu[10:47, 4:])
        back = torch.zeros_like(cpu).pin_memory()
        dma.copy_rows(back[10:47, 4:], stage[3:40, 4:])
    stream.synchronize()
    assert torch.equal(stage[3:40, 4:].cpu(), cpu[10:47, 4:]) and not stage[3:40, :4].any()
    assert not stage[:3].any() and not stage[40:].any()
    assert torch.equal(back[10:47, 4:], cpu[10:47, 4:]) and not back[10:47, :4].any()


@on_gpu
@pytest.mark.parametrize("binding", _importable() if torch.cuda.is_available() else [])
def test_a_real_runtime_error_is_a_dma_error_and_not_sticky(monkeypatch, fresh, binding):
    monkeypatch.setattr(dma, "BINDINGS", tuple(b for b in dma.BINDINGS if b[0] == binding))
    cpu = torch.randn(4, 256).pin_memory()
    gpu = torch.zeros(4, 256, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(dma.DMAError, match="cudaError") as e:  # a row wider than the pitch
        dma._memcpy_2d()(gpu.data_ptr(), 256, cpu.data_ptr(), 1024, 512, 4, stream)
    assert e.value.code != 0 and e.value.name.startswith("cudaError")
    dma.copy_rows(gpu[:, :128], cpu[:, :128])  # the next copy still works
    torch.cuda.synchronize()
    assert torch.equal(gpu[:, :128].cpu(), cpu[:, :128])
