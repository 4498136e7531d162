"""Vector arithmetic for scoring: Matryoshka truncation, int8 and binary quantization, cosine."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from sentence_transformers.util.quantization import quantize_embeddings


def truncate(vectors: np.ndarray, dimension: int) -> np.ndarray:
    """Matryoshka truncation to the first `dimension` values, renormalised."""
    return _unit(vectors[:, :dimension])


def int8_ranges(documents: Iterable[np.ndarray]) -> np.ndarray:
    """Per-dimension minimum and maximum over the (truncated) documents, chunk by chunk: the
    calibration `quantize_embeddings` would compute from them all at once."""
    low = high = None
    for chunk in documents:
        lo, hi = chunk.min(axis=0), chunk.max(axis=0)
        low = lo if low is None else np.minimum(low, lo)
        high = hi if high is None else np.maximum(high, hi)
    return np.vstack([low, high])


def quantize(vectors: np.ndarray, quantization: str, ranges: np.ndarray | None) -> np.ndarray:
    """int8 within the documents' `ranges`, or sign bits packed 8 to a byte: sentence-transformers'
    own quantizer, as a vector index would store them."""
    if quantization == "int8":
        return quantize_embeddings(vectors, "int8", ranges=ranges)
    if quantization == "binary":
        return quantize_embeddings(vectors, "ubinary")
    return vectors


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def similarity(queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """Cosine for floats, integer dot product for int8, minus Hamming distance for packed bits;
    float64 either way (exact for every integer score)."""
    if queries.dtype == np.uint8:
        # On 0/1 bits, Hamming(q, d) = |q| + |d| - 2 q.d: one BLAS product, exact in float32
        # (sums below 2^24), where a popcount per (query, document) pair was a Python loop.
        q, d = (np.unpackbits(x, axis=1).astype(np.float32) for x in (queries, docs))
        hamming = q.sum(1)[:, None] + d.sum(1)[None, :] - 2 * (q @ d.T)
        return -hamming.astype(np.float64)
    if queries.dtype == np.int8:
        return (queries.astype(np.int64) @ docs.astype(np.int64).T).astype(np.float64)
    return (_unit(queries) @ _unit(docs).T).astype(np.float64)
