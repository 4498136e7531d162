"""Content hashes: a text's identity in the caches, and a model's or file's weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


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


def text_hash(kind: str, text: str) -> str:
    """The cache's row key: the prompt (hence the vector) depends on the kind as well."""
    return hashlib.blake2b(f"{kind}\x1f{text}".encode(), digest_size=16).hexdigest()


def first_of_each(hashes: np.ndarray) -> np.ndarray:
    """Row indices of each hash's first occurrence, in row order."""
    return np.sort(np.unique(hashes, return_index=True)[1])
