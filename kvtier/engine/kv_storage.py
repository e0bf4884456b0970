"""KVStorage: the one owner of every tier's KV tensors.

Each tier holds blocks of its own StorageSpec (kvtier/cache/storage.py): the GPU tier one
layer-major tensor in device memory, the CPU tier (when on) one block-major tensor in pinned host
memory (HostKVPool). Everything else reads them through this object: the model through
`layer_views`, the transfer engine through `block_rows` and the staging buffers it asks for, the
engine through `num_blocks`. Block ids index the first dimension of a tier's `block_rows`.

A quantized CPU tier (--kv-offloading-dtype int8 / int4) has no rows in a float dtype: its blocks
are kv_quant's QuantizedBlocks (`quantized_blocks`, `quant_spec`), block ids indexing the first
dimension of each of their tensors, and its staging buffers are QuantizedBlocks on the device.
"""

from __future__ import annotations

import logging

import torch

from kvtier.cache import storage
from kvtier.cache.storage import Kind, StorageSpec, Tier
from kvtier.engine.host_kv_pool import HostKVPool, quant_spec
from kvtier.ops.kv_quant import QuantizedBlocks, QuantSpec

logger = logging.getLogger(__name__)


class KVStorage:
    def __init__(self, gpu_spec: StorageSpec, gpu: torch.Tensor, host: HostKVPool | None = None):
        if gpu.dim() != 6 or tuple(gpu.shape) != gpu_spec.shape(gpu.shape[2]):
            raise ValueError(f"the GPU tensor {tuple(gpu.shape)} is not laid out as its spec says "
                             f"({gpu_spec.layout.value}: {gpu_spec.shape(0)} with the block count at dim 2)")
        self.gpu, self.host = gpu, host  # gpu: (L, parts, Ng, bs, H, D); host.kv: (Nc, L, parts, bs, H, D)
        self.gpu_acts: torch.Tensor | None = None  # KVPR (enable_activations): (L, Ng * bs + 1, h)
        self.specs: dict[Tier, StorageSpec] = {Tier.GPU: gpu_spec}
        if host is not None:
            self.specs[Tier.CPU] = host.spec

    @classmethod
    def allocate(cls, gpu_spec: StorageSpec, num_gpu_blocks: int, device: torch.device,
                 num_cpu_blocks: int = 0, pin: bool | None = None, activation_width: int = 0,
                 cpu_spec: StorageSpec | None = None) -> KVStorage:
        """The GPU tier's tensor and, given CPU blocks, the pinned CPU tier (blocks of `cpu_spec`,
        by default the same blocks' CPU layout); a CPU tier that could pin nothing is left off, with
        a warning. With an activation width (KVPR), every tier also keeps each block's layer inputs
        that wide."""
        gpu = storage.allocate(gpu_spec, num_gpu_blocks, device)
        host = (HostKVPool(num_cpu_blocks, cpu_spec or gpu_spec.on(Tier.CPU), pin, activation_width)
                if num_cpu_blocks > 0 else None)
        if host is not None and host.num_blocks == 0:
            logger.warning("kvtier: no pinned memory for the CPU KV tier; running without it")
            host = None
        kv = cls(gpu_spec, gpu, host)
        if activation_width > 0:
            kv.gpu_acts = kv._activation_data(activation_width)
        return kv

    @staticmethod
    def activation_bytes_per_block(spec: StorageSpec, activation_width: int) -> int:
        """KVPR: one block's layer inputs, all layers (what a tier spends beside its K/V)."""
        return spec.num_layers * spec.block_size * activation_width * spec.torch_dtype().itemsize

    @property
    def device(self) -> torch.device:
        return self.gpu.device

    @property
    def has_cpu_tier(self) -> bool:
        return self.host is not None

    def num_blocks(self, tier: Tier) -> int:
        if tier is Tier.CPU and self.host is not None:  # a quantized tier has no block_rows
            return self.host.num_blocks
        return self.block_rows(tier).shape[0]

    def layer_views(self) -> list[tuple[torch.Tensor, ...]]:
        """Per layer the GPU tier's (K, V) as the attention reads them, each (Ng, bs, H, D)."""
        return storage.layer_views(self.specs[Tier.GPU], self.gpu)

    def block_rows(self, tier: Tier) -> torch.Tensor:
        """(blocks, layers, parts, row elements) of `tier`: what the copy kernels and DMAs index."""
        if tier is Tier.CPU:
            if self.host is None:
                raise ValueError("this engine has no CPU tier (--kv-offloading-size is 0)")
            if self.host.quantized is not None:
                raise ValueError("the CPU tier is quantized (--kv-offloading-dtype): its blocks are "
                                 "QuantizedBlocks (quantized_blocks), not rows")
            return storage.block_rows(self.specs[Tier.CPU], self.host.kv)
        return storage.block_rows(self.specs[Tier.GPU], self.gpu)

    def quant_spec(self, tier: Tier) -> QuantSpec | None:
        """The int8 / int4 format of `tier`'s blocks; None when they are in a float dtype."""
        return quant_spec(self.specs[tier])

    def quantized_blocks(self, tier: Tier) -> QuantizedBlocks:
        """A quantized tier's blocks: each tensor (blocks, layers, ...), indexed by block id."""
        if tier is not Tier.CPU or self.host is None or self.host.quantized is None:
            raise ValueError(f"the {tier.value} tier holds no quantized blocks (--kv-offloading-dtype)")
        return self.host.quantized

    def staging(self, tier: Tier, num_blocks: int) -> torch.Tensor:
        """A device buffer of `num_blocks` blocks of `tier` in its block-major rows and its own
        dtype (what crosses the link is the far tier's bytes): (n, layers, parts, row elements)."""
        spec = self.specs[tier]
        if spec.kind is not Kind.KV or spec.scale is not None:
            raise NotImplementedError(f"{spec.kind.value} blocks with scales stage as QuantizedBlocks "
                                      "(quantized_staging)")
        rows = (num_blocks, spec.num_layers, spec.num_parts, spec.row_elements)
        return torch.empty(rows, dtype=spec.torch_dtype(), device=self.device)

    def quantized_staging(self, tier: Tier, num_blocks: int) -> QuantizedBlocks:
        """A device buffer of `num_blocks` quantized blocks of `tier`, in its format."""
        quant = self.quant_spec(tier)
        if quant is None:
            raise ValueError(f"the {tier.value} tier is not quantized: use staging()")
        return QuantizedBlocks.empty(quant, num_blocks, self.device)

    def activation_rows(self, hidden_size: int) -> list[torch.Tensor]:
        """KVPR: each layer's inputs for every KV slot of the GPU tier, per layer (slots + 1,
        hidden_size): the last row takes padding tokens' writes. The kept tensor when activations
        are enabled, else a new one."""
        data = self.gpu_acts if self.gpu_acts is not None else self._activation_data(hidden_size)
        return list(data.unbind(0))

    def _activation_data(self, width: int) -> torch.Tensor:
        spec = self.specs[Tier.GPU]
        num_slots = self.num_blocks(Tier.GPU) * spec.block_size
        return torch.zeros(spec.num_layers, num_slots + 1, width, dtype=spec.torch_dtype(), device=self.device)

    def activation_blocks(self, tier: Tier) -> torch.Tensor:
        """KVPR: (blocks, layers, 1, block_size * width) of `tier`'s kept layer inputs, block ids as
        for its K/V (what copy_blocks indexes)."""
        if tier is Tier.CPU:
            if self.host is None or self.host.acts is None:
                raise ValueError("this engine keeps no layer inputs in a CPU tier (--kvpr off)")
            return self.host.acts.unsqueeze(2)
        if self.gpu_acts is None:
            raise ValueError("this engine keeps no layer inputs (--kvpr off)")
        bs, num_blocks = self.specs[Tier.GPU].block_size, self.num_blocks(Tier.GPU)
        layers, width = self.gpu_acts.shape[0], self.gpu_acts.shape[-1]
        rows = self.gpu_acts[:, :num_blocks * bs].view(layers, num_blocks, bs * width)  # (L, Ng, bs * h)
        return rows.permute(1, 0, 2).unsqueeze(2)

    def activation_ring(self, num_entries: int, num_slots: int) -> torch.Tensor:
        """KVPR beside Pie's ring: (entries, slots, block_size * width) layer inputs of far blocks
        whose K/V the GPU recomputes into the KV ring's slots."""
        assert self.gpu_acts is not None
        row = self.specs[Tier.GPU].block_size * self.gpu_acts.shape[-1]
        return torch.zeros(num_entries, num_slots, row, dtype=self.gpu_acts.dtype, device=self.device)

    def staging_ring(self, num_entries: int, num_slots: int) -> torch.Tensor:
        """Pie's staging ring: (entries, slots, parts, row elements) in the GPU tier's dtype. Layer i
        reads entry i % entries; slot s of an entry holds one far block's K and V of that layer."""
        spec = self.specs[Tier.GPU]
        rows = (num_entries, num_slots, spec.num_parts, spec.row_elements)
        return torch.zeros(rows, dtype=spec.torch_dtype(), device=self.device)

    @property
    def cpu_blocks_per_chunk(self) -> int:
        """CPU blocks per pinned registration: one DMA copy never spans two."""
        return self.host.blocks_per_chunk if self.host is not None else 0

    def close(self) -> None:
        if self.host is not None:
            self.host.close()
