"""Tier-typed storage: what one block of each (tier, kind) holds, in which layout and dtype, its bytes,
and the one place that allocates those tensors.

A `StorageSpec` describes the blocks of one (tier, kind): the tier (gpu, cpu; room for peer-gpu,
disk, remote), the kind (K and V together, K alone, V alone, a layer's input activations), the
dtype with optional scale tensors (quantized tiers), and the layout. Its `bytes_per_block` is the
one formula for block bytes; a tier's size in blocks comes from its own spec, never from another
tier's bytes. Block pools (block_pool.py) stay metadata: one per (tier, kind), counting blocks of
a spec.

Layouts, for kind KV (parts = 2: K then V; kinds K, V and activations have parts = 1):

    layer-major (GPU)  (layers, parts, blocks, block_size, heads, head_dim)
                       a layer's K (or V) of every block is one tensor that the attention kernels
                       index by block id
    block-major (CPU)  (blocks, layers, parts, block_size, heads, head_dim)
                       one block is one contiguous chunk: a scattered block moves as one DMA copy,
                       a run of consecutive blocks as one copy or one 2-D copy per layer group

Activations (KVPR) are `hidden_size` wide: heads = 1, head_dim = hidden_size.

Quantized blocks (`StorageSpec.quantized`, the CPU tier's `--kv-offloading-dtype int8 / int4`) are
KIVI's format, kvtier/ops/kv_quant.py: codes of `dtype`'s bits (int4: two a byte) and an fp16 scale
and zero per group, K's groups running along a block's tokens (per channel), V's along head_dim (per
token). Their tensors are kv_quant's QuantizedBlocks, each block-major; `bytes_per_block` counts
them all (the engine checks it against kv_quant's own count when it allocates them).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from kvtier.models.config import ModelConfig


class Tier(enum.Enum):
    GPU = "gpu"
    CPU = "cpu"
    PEER_GPU = "peer-gpu"
    DISK = "disk"
    REMOTE = "remote"


class Kind(enum.Enum):
    KV = "kv"
    K = "k"
    V = "v"
    ACTIVATIONS = "activations"

    @property
    def num_parts(self) -> int:
        return 2 if self is Kind.KV else 1


class Layout(enum.Enum):
    LAYER_MAJOR = "layer-major"
    BLOCK_MAJOR = "block-major"


DEFAULT_LAYOUT = {Tier.GPU: Layout.LAYER_MAJOR, Tier.PEER_GPU: Layout.LAYER_MAJOR, Tier.CPU: Layout.BLOCK_MAJOR,
                  Tier.DISK: Layout.BLOCK_MAJOR, Tier.REMOTE: Layout.BLOCK_MAJOR}

# Bytes per element by torch dtype name: specs are plain data (they pickle, and cache/ code that
# only counts blocks never imports torch).
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1,
            "uint8": 1}
# Bits per element of every storage dtype: int4 codes are packed two a byte, so no whole itemsize.
BITS = {**{name: 8 * size for name, size in ITEMSIZE.items()}, "int4": 4}


@dataclasses.dataclass(frozen=True)
class ScaleSpec:
    """Quantization scales (and zero points) stored beside each block: one `dtype` value per
    `group_size` elements along head_dim, `values_per_group` values each (1: scale; 2: scale and
    zero point). With `k_group_size` (kind KV only), K's groups run along the tokens instead:
    k_group_size tokens of one channel (KIVI's per-channel K), V's still along head_dim."""
    group_size: int
    dtype: str = "float16"
    values_per_group: int = 1
    k_group_size: int | None = None


@dataclasses.dataclass(frozen=True)
class StorageSpec:
    tier: Tier
    kind: Kind
    num_layers: int
    block_size: int  # tokens per block
    num_heads: int  # KV heads (1 for activations)
    head_dim: int  # (hidden_size for activations)
    dtype: str  # a torch dtype name, e.g. "bfloat16"
    layout: Layout
    scale: ScaleSpec | None = None

    def __post_init__(self) -> None:
        if self.dtype not in BITS:
            raise ValueError(f"unsupported storage dtype {self.dtype!r}; choose one of {sorted(BITS)}")
        if self.scale is not None and self.head_dim % self.scale.group_size:
            raise ValueError(f"scale group size {self.scale.group_size} does not divide head_dim {self.head_dim}")
        k_group = None if self.scale is None else self.scale.k_group_size
        if k_group is not None and (self.kind is not Kind.KV or self.block_size % k_group):
            raise ValueError(f"K's scale groups of {k_group} tokens need kind KV and must divide block_size "
                             f"{self.block_size}")

    @classmethod
    def for_model(cls, cfg: ModelConfig, tier: Tier, block_size: int, dtype: str | torch.dtype,
                  kind: Kind = Kind.KV, layout: Layout | None = None, scale: ScaleSpec | None = None) -> StorageSpec:
        dtype = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
        heads, width = (1, cfg.hidden_size) if kind is Kind.ACTIVATIONS else (cfg.num_kv_heads, cfg.head_dim)
        return cls(tier, kind, cfg.num_layers, block_size, heads, width, dtype, layout or DEFAULT_LAYOUT[tier], scale)

    def on(self, tier: Tier, layout: Layout | None = None) -> StorageSpec:
        """The same blocks kept on another tier (in that tier's default layout unless given)."""
        return dataclasses.replace(self, tier=tier, layout=layout or DEFAULT_LAYOUT[tier])

    def quantized(self, dtype: str, group_size: int) -> StorageSpec:
        """The same blocks in KIVI's int8 / int4 format (kvtier/ops/kv_quant.py): V per token in
        groups of `group_size` channels, K per channel in groups of a whole block's tokens (a group
        may not cross blocks, which move one at a time), an fp16 scale and zero per group."""
        if dtype not in ("int8", "int4"):
            raise ValueError(f"quantized blocks are int8 or int4, not {dtype!r}")
        scale = ScaleSpec(group_size, "float16", values_per_group=2, k_group_size=self.block_size)
        return dataclasses.replace(self, dtype=dtype, scale=scale)

    @property
    def num_parts(self) -> int:
        return self.kind.num_parts

    @property
    def row_elements(self) -> int:
        """Elements of one (layer, part) of one block: block_size x heads x head_dim."""
        return self.block_size * self.num_heads * self.head_dim

    @property
    def bytes_per_block(self) -> int:
        """All layers and parts of one block, scales included: the one formula for block bytes."""
        data = self.num_layers * self.num_parts * self.row_elements * BITS[self.dtype] // 8
        if self.scale is None:
            return data
        # a group holds group_size elements whichever way it runs: a row has row_elements / group_size
        sizes = [self.scale.group_size] * self.num_parts
        if self.scale.k_group_size is not None:
            sizes[0] = self.scale.k_group_size  # K, part 0 of kind KV
        groups = self.num_layers * sum(self.row_elements // size for size in sizes)
        return data + groups * self.scale.values_per_group * ITEMSIZE[self.scale.dtype]

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size

    def num_blocks_in(self, num_bytes: int | float) -> int:
        """Whole blocks that fit in `num_bytes`."""
        return int(num_bytes // self.bytes_per_block)

    def shape(self, num_blocks: int) -> tuple[int, ...]:
        """The data tensor's shape (scales, when any, are a tensor of their own)."""
        row = (self.block_size, self.num_heads, self.head_dim)
        if self.layout is Layout.LAYER_MAJOR:
            return (self.num_layers, self.num_parts, num_blocks, *row)
        return (num_blocks, self.num_layers, self.num_parts, *row)

    def torch_dtype(self) -> torch.dtype:
        import torch
        dtype = getattr(torch, self.dtype)
        assert isinstance(dtype, torch.dtype), f"{self.dtype!r} is not a torch dtype"
        return dtype


def allocate(spec: StorageSpec, num_blocks: int, device: torch.device | str = "cpu",
             pin_memory: bool = False) -> torch.Tensor:
    """The data tensor of `num_blocks` blocks of `spec`.

    Zero-filled: attention over padded block-table entries must never meet NaN garbage (memory
    that will be page-locked afterwards is left uninitialized: pinning touches every page anyway,
    and every CPU block is written by a store before a load reads it)."""
    import torch
    make = torch.empty if pin_memory else torch.zeros
    return make(spec.shape(num_blocks), dtype=spec.torch_dtype(), device=device)


def layer_views(spec: StorageSpec, data: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """A layer-major tensor as the model reads it: per layer one view per part (K, V for kind KV),
    each (blocks, block_size, heads, head_dim)."""
    if spec.layout is not Layout.LAYER_MAJOR:
        raise ValueError(f"layer views need a layer-major tensor; this one is {spec.layout.value}")
    return [tuple(data[layer, part] for part in range(spec.num_parts)) for layer in range(spec.num_layers)]


def block_rows(spec: StorageSpec, data: torch.Tensor) -> torch.Tensor:
    """Either layout as the transfer kernels read it: (blocks, layers, parts, row elements), one
    row being one (layer, part) of one block, contiguous (a view: layer-major data is permuted)."""
    if spec.layout is Layout.LAYER_MAJOR:
        return data.view(spec.num_layers, spec.num_parts, data.shape[2], -1).permute(2, 0, 1, 3)
    return data.view(data.shape[0], spec.num_layers, spec.num_parts, -1)
