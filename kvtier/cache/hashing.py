"""Chain hashes of full blocks: hash(parent hash, block tokens, extra keys such as a cache salt)."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT_HASH = b"kvtier-root"


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra: bytes = b"") -> bytes:
    h = hashlib.sha256()
    h.update(parent or ROOT_HASH)
    h.update(array("q", token_ids).tobytes())
    h.update(extra)
    return h.digest()


def hash_full_blocks(token_ids: Sequence[int], block_size: int, start_block: int = 0,
                     parent: bytes | None = None, extra: bytes = b"") -> list[bytes]:
    """Hashes of the full blocks from `start_block` on, chained from `parent`."""
    out = []
    for i in range(start_block, len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], extra)
        out.append(parent)
    return out
