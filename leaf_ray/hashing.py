"""Content hashes: a text's identity in the caches, and a model's or file's weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa

# A text's key: 16 bytes, kept as numpy `S16` (sorts and searches like bytes) and as Arrow
# fixed_size_binary(16) (Parquet's FIXED_LEN_BYTE_ARRAY). 16 bytes, not 32 hex characters stored
# as `<U32` (128 bytes): at millions of texts the keys are what every selection moves around.
HASH_BYTES = 16
HASH_DTYPE = np.dtype(f"S{HASH_BYTES}")
HASH_TYPE = pa.binary(HASH_BYTES)


def files_sha256(*paths: Path) -> str:
    """One sha256 over the files' bytes in order (a folder: its files, recursively, by path).
    Of a single file, its own sha256, as `sha256sum` prints it."""
    digest = hashlib.sha256()
    for path in paths:
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                with file.open("rb") as f:
                    for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                        digest.update(chunk)
    return digest.hexdigest()


def text_hash(kind: str, text: str) -> bytes:
    """The cache's row key: the prompt (hence the vector) depends on the kind as well."""
    return hashlib.blake2b(f"{kind}\x1f{text}".encode(), digest_size=HASH_BYTES).digest()


def text_hashes(kinds: object, texts: object) -> np.ndarray:
    """`text_hash` of each (kind, text) pair, as an `S16` array."""
    joined = b"".join(text_hash(k, t) for k, t in zip(kinds, texts, strict=True))
    return np.frombuffer(joined, dtype=HASH_DTYPE)


def hashes_to_arrow(hashes: np.ndarray) -> pa.FixedSizeBinaryArray:
    """An `S16` array as Arrow, byte for byte (`pa.array` would strip trailing zero bytes)."""
    hashes = np.ascontiguousarray(hashes, dtype=HASH_DTYPE)
    return pa.FixedSizeBinaryArray.from_buffers(
        HASH_TYPE, len(hashes), [None, pa.py_buffer(hashes.tobytes())]
    )


def hashes_of(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An Arrow fixed_size_binary(16) column as an `S16` array, without a Python object a row."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if column.type != HASH_TYPE:  # variable-size binary, as Ray's numpy batches come back
        column = column.cast(HASH_TYPE)
    if len(column) == 0:
        return np.empty(0, dtype=HASH_DTYPE)
    buffer = column.buffers()[1]
    return np.frombuffer(buffer, HASH_DTYPE, count=len(column), offset=column.offset * HASH_BYTES)


def find_sorted(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of `keys`, its place in `sorted_keys` (clipped into it) and whether it is there:
    how every selection is looked up, a binary search a key, not a set of Python objects."""
    if not sorted_keys.size:
        return np.zeros(keys.size, np.intp), np.zeros(keys.size, bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    return at, sorted_keys[at] == keys


def hex_of(hashes: np.ndarray) -> list[str]:
    """Each `S16` hash as 32 hex characters, as messages and logs name a text."""
    return [row.tobytes().hex() for row in hashes.view(np.uint8).reshape(-1, HASH_BYTES)]


def first_of_each(hashes: np.ndarray) -> np.ndarray:
    """Row indices of each hash's first occurrence, in row order."""
    return np.sort(np.unique(hashes, return_index=True)[1])
