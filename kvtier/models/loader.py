"""Load a model from a local HF directory, a GGUF file, or random weights from a named config.

Nothing is fetched from a model hub. The model is built on the meta device and materialized
straight onto the target device in the target dtype, so a large model never exists twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from kvtier.models.config import ModelConfig, model_config_from_hf
from kvtier.models.registry import DUMMY_CONFIGS, model_class

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelSource:
    kind: str  # "hf_dir", "gguf", "dummy"
    path: Path | None  # directory or file; None for a named dummy config
    hf_config: dict[str, Any]
    name: str


def resolve_model(model: str | None, load_format: str = "auto") -> ModelSource:
    """Find what `model` names; raises FileNotFoundError / ValueError with what to do instead."""
    if model is None:
        from kvtier.models.gguf_loader import default_gguf_path
        model = str(default_gguf_path())
    if load_format == "dummy":
        return _resolve_dummy(model)
    path = Path(model).expanduser()
    if path.is_file() and (path.suffix == ".gguf" or load_format == "gguf"):
        from kvtier.models.gguf_loader import gguf_to_hf_dir
        path = gguf_to_hf_dir(path)
        return ModelSource("gguf", path, _read_config(path), model)
    if path.is_dir():
        return ModelSource("hf_dir", path, _read_config(path), model)
    hint = " (or use --load-format dummy with a config name)" if model in DUMMY_CONFIGS else ""
    raise FileNotFoundError(
        f"model {model!r} is neither a local directory with config.json + safetensors nor a .gguf "
        f"file{hint}; kvtier never downloads models. Dummy configs: {sorted(DUMMY_CONFIGS)}")


def _resolve_dummy(model: str) -> ModelSource:
    if model in DUMMY_CONFIGS:
        return ModelSource("dummy", None, dict(DUMMY_CONFIGS[model]), model)
    path = Path(model).expanduser()
    cfg_path = path / "config.json" if path.is_dir() else path
    if cfg_path.is_file():
        return ModelSource("dummy", path if path.is_dir() else None, json.loads(cfg_path.read_text()), model)
    raise ValueError(f"unknown dummy model config {model!r}; use one of {sorted(DUMMY_CONFIGS)} "
                     "or a path to a config.json")


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face model directory?")
    return json.loads(cfg_path.read_text())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights (tied ones counted once): what a decode step reads."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Module with uninitialized storage on `device`; tied weights stay tied."""
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    _retie(model, cfg)
    return model.eval().requires_grad_(False)


def _retie(model: nn.Module, cfg: ModelConfig) -> None:
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.input_embeddings().weight


def load_weights(model: nn.Module, cfg: ModelConfig, path: Path) -> None:
    """Copy every tensor of the directory's safetensors into the model (casting to its dtype)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: dict[str, int] = {}  # our parameter -> shards written
    with tqdm(desc=f"loading {path.name}", unit="tensor", leave=False) as bar:
        for file in _safetensors_files(path):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    target = _copy_weight(model, params, key, f.get_tensor(key), cfg, file)
                    if target:
                        loaded[target] = loaded.get(target, 0) + 1
                    bar.update()
    _check_complete(model, params, loaded, cfg, path)


def _split_name(name: str) -> tuple[str, str, str]:
    """'model.layers.0.self_attn.q_proj.weight' -> ('model.layers.0.self_attn', 'q_proj', 'weight')"""
    prefix, _, leaf = name.rpartition(".")
    parent, _, module = prefix.rpartition(".")
    return parent, module, leaf


def hf_to_param(model: nn.Module, hf_name: str) -> tuple[str, int | None, int | None]:
    """HF weight name -> (our parameter name, row range or None) through the model's fusions."""
    parent, module, rest = _split_name(hf_name)
    packed = model.packed_modules.get(module)
    if packed is None:
        return hf_name, None, None
    fused, start, end = packed
    return f"{parent}.{fused}.{rest}", start, end


def _copy_weight(model: nn.Module, params: dict, key: str, tensor: torch.Tensor, cfg: ModelConfig,
                 file: Path) -> str | None:
    name, start, end = hf_to_param(model, key)
    if name not in params:
        if "rotary_emb" in key:
            return None
        raise ValueError(f"unexpected weight {key!r} in {file.name} for {cfg.architecture}")
    dest = params[name].data if start is None else params[name].data[start:end]
    if tensor.shape != dest.shape:
        raise ValueError(f"weight {key!r} has shape {tuple(tensor.shape)}, "
                         f"the model expects {tuple(dest.shape)}")
    dest.copy_(tensor)
    return name


def _check_complete(model: nn.Module, params: dict, loaded: dict[str, int], cfg: ModelConfig,
                    path: Path) -> None:
    shards: dict[str, int] = {}
    for fused, _, _ in model.packed_modules.values():
        shards[fused] = shards.get(fused, 0) + 1
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = [n for n in params if n not in tied and loaded.get(n, 0) < shards.get(_split_name(n)[1], 1)]
    if missing:
        raise ValueError(f"weights missing from {path}: {sorted(missing)[:8]}")


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our parameters under HF names (fused ones as row views, no copies)."""
    inverse = {(fused, start, end): hf for hf, (fused, start, end) in model.packed_modules.items()}
    out = {}
    for name, tensor in model.state_dict().items():
        parent, module, rest = _split_name(name)
        parts = [(hf, s, e) for (fused, s, e), hf in inverse.items() if fused == module]
        if not parts:
            out[name] = tensor
        for hf, s, e in parts:
            out[f"{parent}.{hf}.{rest}"] = tensor[s:e]
    return out


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path} (only safetensors are loaded)")
    return files


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int) -> None:
    """Dummy weights: N(0, 0.02) matrices, unit norms, zero biases; deterministic per seed."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and not name.endswith(".bias"):  # RMSNorm / LayerNorm scales
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)


def load_model(source: ModelSource, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
               seed: int = 0) -> nn.Module:
    model = build_model(cfg, device, dtype)
    if source.kind == "dummy":
        init_random_weights(model, seed)
    else:
        assert source.path is not None
        load_weights(model, cfg, source.path)
    return model


def load_tokenizer(source: ModelSource, tokenizer: str | None = None):
    """AutoTokenizer from the model directory (or --tokenizer); None when there is none."""
    path = Path(tokenizer).expanduser() if tokenizer else source.path
    if path is None or not path.is_dir() or not _has_tokenizer(path):
        if tokenizer:
            raise FileNotFoundError(f"no tokenizer files in {tokenizer}")
        return None
    from transformers import AutoTokenizer
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(str(path))


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def model_config(source: ModelSource) -> ModelConfig:
    return model_config_from_hf(source.hf_config)
