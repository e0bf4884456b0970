"""The CPU tier's storage: one block-major KV tensor in pinned host memory.

Layout (its StorageSpec's, kvtier/cache/storage.py: num_cpu_blocks, layers, 2, block_size, kv_heads,
head_dim): one CPU block is one
contiguous chunk holding all layers' K and V (2 MiB for Llama-3-8B in bf16), so a scattered block
moves as one DMA copy at ~90% of the link, and a run of consecutive blocks can also move one
group of layers at a time (a 2-D copy: rows of the group's bytes, one per block) for layer-wise
loading (kvtier/engine/transfer_engine.py).

A quantized tier (--kv-offloading-dtype int8 / int4; its spec from StorageSpec.quantized) holds
kv_quant's QuantizedBlocks instead: five tensors (codes, K scales and zeros, V scales and zeros),
each block-major with the layer next, (Nc, L, ...), so a block id indexes every one and a run of
blocks, or a group of layers of it, is one span of each (five DMA copies where the plain tier
makes one). `kv` is then the codes (Nc, L, 2, bs, kv_heads, head_dim * bits / 8), uint8.

The memory is allocated pageable, then page-locked in chunks with cudaHostRegister (a progress
bar shows it; pinning tens of GiB takes seconds). Registered memory is mapped into the GPU's
address space (UVA), so the transfer kernel reads and writes it directly. If pinning a chunk
fails, the pool keeps the chunks already pinned and says so: a smaller tier, never a crash.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from kvtier.cache import storage
from kvtier.cache.storage import Kind, Layout, StorageSpec
from kvtier.ops.kv_quant import PARAM_DTYPE, QuantizedBlocks, QuantSpec

logger = logging.getLogger(__name__)

PIN_CHUNK_BYTES = 1 << 30
_CUDA_HOST_REGISTER_PORTABLE_MAPPED = 3  # cudaHostRegisterPortable | cudaHostRegisterMapped


def pinning_available() -> bool:
    return torch.cuda.is_available()


def _register(ptr: int, num_bytes: int) -> bool:
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(ptr, num_bytes, _CUDA_HOST_REGISTER_PORTABLE_MAPPED)
    return int(getattr(err, "value", err)) == 0


def _unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


def quant_spec(spec: StorageSpec) -> QuantSpec | None:
    """kv_quant's format of quantized blocks (StorageSpec.quantized); None for blocks in a float dtype."""
    if spec.scale is None:
        return None
    scale, param_dtype = spec.scale, str(PARAM_DTYPE).removeprefix("torch.")
    if (spec.kind is not Kind.KV or spec.dtype not in ("int8", "int4") or scale.k_group_size is None
            or scale.values_per_group != 2 or scale.dtype != param_dtype):
        raise ValueError(f"{spec}: a quantized tier holds KIVI blocks (StorageSpec.quantized) only")
    quant = QuantSpec(spec.num_layers, spec.block_size, spec.num_heads, spec.head_dim, storage.BITS[spec.dtype],
                      scale.group_size, scale.k_group_size)
    # two formulas of one size: the tier is sized by the spec's, the tensors have kv_quant's
    assert quant.bytes_per_block == spec.bytes_per_block, (quant, spec)
    return quant


class HostKVPool:
    """Owns the CPU tier's tensors; unregisters the pinned pages before the memory is freed."""

    def __init__(self, num_blocks: int, spec: StorageSpec, pin: bool | None = None, activation_width: int = 0):
        if spec.layout is not Layout.BLOCK_MAJOR:
            raise ValueError(f"the host pool keeps blocks contiguous (block-major), not {spec.layout.value}")
        pin = pinning_available() if pin is None else pin
        self.spec = spec
        self._registered: list[int] = []
        self.pinned = pin
        self.block_bytes = spec.bytes_per_block
        # one copy must not span two registrations (the driver rejects it): copies split here
        self.blocks_per_chunk = max(1, PIN_CHUNK_BYTES // self.block_bytes) if pin else num_blocks
        self.quant = quant_spec(spec)  # None: blocks in the spec's float dtype
        self.quantized: QuantizedBlocks | None = None  # a quantized tier's blocks
        if self.quant is not None:
            if activation_width > 0:
                raise ValueError("a quantized CPU tier keeps no layer inputs (KVPR)")
            self.quantized = self._allocate_quantized(self.quant, num_blocks)
            self.kv = self.quantized.payload  # the codes (Nc, L, 2, bs, Hkv, D * bits / 8)
            return
        self._tensor = storage.allocate(spec, num_blocks, pin_memory=pin)
        self.kv = self._pin(self._tensor) if pin else self._tensor  # (Nc, L, 2, bs, Hkv, D)
        # KVPR: each block's layer inputs beside its K/V, indexed by the same CPU block id
        self.acts: torch.Tensor | None = None  # (Nc, L, bs * activation_width)
        if activation_width > 0:
            make = torch.empty if pin else torch.zeros  # pinning touches every page (storage.allocate)
            self._acts = make(self.kv.shape[0], spec.num_layers, spec.block_size * activation_width,
                              dtype=spec.torch_dtype())
            self.acts = self._pin(self._acts, "pinning CPU KV tier (layer inputs)") if pin else self._acts
            self.kv = self.kv[:self.acts.shape[0]]

    @property
    def num_blocks(self) -> int:
        return self.kv.shape[0]

    def _allocate_quantized(self, quant: QuantSpec, num_blocks: int) -> QuantizedBlocks:
        """Each tensor pinned in chunks of the same blocks (a run within one chunk is within one
        registration of each); all cut to the fewest blocks any could pin."""
        blocks = QuantizedBlocks.empty(quant, num_blocks)
        if not self.pinned:  # as storage.allocate: unpinned memory starts zeroed
            for t in blocks.tensors():
                t.zero_()
            return blocks
        for t in blocks.tensors():
            if num_blocks:  # (none pinned: the tier is left off)
                num_blocks = self._pin(t[:num_blocks], blocks_per_chunk=self.blocks_per_chunk).shape[0]
        return QuantizedBlocks(quant, *(t[:num_blocks] for t in blocks.tensors()))

    def _pin(self, tensor: torch.Tensor, desc: str = "pinning CPU KV tier",
             blocks_per_chunk: int | None = None) -> torch.Tensor:
        """Register whole blocks chunk by chunk (by default a chunk's worth of this tensor's blocks);
        on failure keep the pinned prefix."""
        block_bytes = tensor[0].numel() * tensor.element_size()
        blocks_per_chunk = blocks_per_chunk or max(1, PIN_CHUNK_BYTES // block_bytes)
        num_pinned = 0
        with tqdm(total=tensor.shape[0] * block_bytes, unit="B", unit_scale=True, desc=desc,
                  disable=tensor.shape[0] * block_bytes < 4 * PIN_CHUNK_BYTES) as bar:
            while num_pinned < tensor.shape[0]:
                n = min(blocks_per_chunk, tensor.shape[0] - num_pinned)
                ptr = tensor[num_pinned].data_ptr()
                if not _register(ptr, n * block_bytes):
                    break
                self._registered.append(ptr)
                num_pinned += n
                bar.update(n * block_bytes)
        if num_pinned < tensor.shape[0]:
            logger.warning("kvtier: could pin only %.2f of %.2f GiB for the CPU KV tier; using %d of %d "
                           "blocks (lower --kv-offloading-size or raise the locked-memory limit)",
                           num_pinned * block_bytes / 2**30, tensor.shape[0] * block_bytes / 2**30,
                           num_pinned, tensor.shape[0])
        return tensor[:num_pinned]

    def close(self) -> None:
        for ptr in self._registered:
            _unregister(ptr)
        self._registered = []

    def __del__(self) -> None:
        if self._registered:
            self.close()
