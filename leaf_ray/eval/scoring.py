"""Scoring cached vectors with mteb (Matryoshka-truncated, quantized), and each row's change from
its starting point."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from leaf_ray.eval.cache import STREAM_ROWS, EvalCache, Vectors, _joined
from leaf_ray.eval.compression import int8_ranges, quantize, truncate
from leaf_ray.eval.models import _LeafSimilarity
from leaf_ray.eval.tasks import SIDES, STARTS, EvalError, EvalTask

if TYPE_CHECKING:
    from mteb.models.model_meta import ModelMeta
    from mteb.results import TaskResult


MTEB_CORPUS_CHUNK = 50_000


@ray.remote(num_cpus=1)
def _score_task(
    task: EvalTask,
    meta: ModelMeta,
    cache: EvalCache,
    keys: tuple[str, str],
    dimension: int,
    quantization: str,
) -> TaskResult:
    """mteb's evaluation of `task` over the cached vectors of `keys` (queries', documents')."""
    import datasets
    import mteb

    datasets.disable_progress_bars()
    (q_key, d_key), (q_side, d_side) = keys, SIDES
    queries = cache.load(task, q_key, q_side)
    documents = functools.partial(cache.stream, task, d_key, d_side)
    encoder = _CachedVectors(meta, queries, documents, dimension, quantization)
    result = mteb.evaluate(encoder, task.load(), cache=None, show_progress_bar=False)
    return result.task_results[0]


def _score_memory(shapes: list[tuple[int, int]], largest_node: float) -> int:
    """Bytes a scoring task holds: the queries' vectors and their compressed copy, one corpus
    chunk of documents (read, truncated, compressed) and its scores against every query
    (float32 products, then float64); capped at the largest node's memory so that a big task
    runs alone rather than never."""
    (queries, q_dim), (documents, d_dim) = shapes
    chunk = min(documents, MTEB_CORPUS_CHUNK) + STREAM_ROWS
    need = 2 * 4 * queries * q_dim + 3 * 4 * chunk * d_dim + (4 + 8) * queries * chunk
    return int(min(need, largest_node))


def _add_retention(rows: list[dict]) -> None:
    """Against the teacher at the same size and precision."""
    teacher = {
        (r["dataset"], r["dimension"], r["quantization"]): r["score"]
        for r in rows
        if r["mode"] == "teacher"
    }
    for r in rows:
        base = teacher.get((r["dataset"], r["dimension"], r["quantization"]))
        r["retention"] = r["score"] / base if base else None


def _add_change(rows: list[dict]) -> None:
    """Against the mode it started from (`STARTS`) at the same size and precision (full size
    for full size: the pretrained model's may differ from the projection's)."""

    def setting(r: dict) -> tuple:
        return r["dataset"], "full" if r["full"] else r["dimension"], r["quantization"]

    score = {(r["mode"], *setting(r)): r["score"] for r in rows}
    for r in rows:
        start = (STARTS.get(r["mode"]), *setting(r))
        r["change"] = r["score"] - score[start] if start in score else None


class _CachedVectors(_LeafSimilarity):
    """mteb's encoder protocol over vectors already computed, truncated and quantized as asked.
    It has no model, so it cannot run one.

    Both sides are served in the order they were written, which is the order mteb asks for
    them: an id alone can be ambiguous, since a task's subsets or splits may number their texts
    alike (Q0, Q1, ... in each language). The queries are held whole. The documents are read
    chunk by chunk (mteb's corpus order, 50,000 at a time): a scoring task holds one chunk of a
    large corpus, not all of it. Asked in another order (e.g. a reranking task), either side is
    looked up by id, where its ids are distinct."""

    def __init__(
        self,
        meta: ModelMeta,
        queries: Vectors,
        documents: Callable[[], Iterator[Vectors]],
        dimension: int,
        quantization: str,
    ) -> None:
        self.mteb_model_meta = meta
        self.documents, self.dimension, self.quantization = documents, dimension, quantization
        # int8 is calibrated on the whole corpus: its ranges take one pass before the search.
        self.ranges = (
            int8_ranges(truncate(chunk.array, dimension) for chunk in documents())
            if quantization == "int8"
            else None
        )
        self.queries = Vectors(queries.ids, self._compress(queries.array))
        self.queries_asked = 0
        self.query_rows: Callable[[list[str]], list[int]] | None = None  # asked out of order
        self.in_order: Iterator[Vectors] | None = None
        self.pending: Vectors | None = None  # read past the last chunk mteb asked for
        self.by_id: tuple[Callable[[list[str]], list[int]], np.ndarray] | None = None

    def encode(self, inputs: Any, *, prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
        ids = list(inputs.dataset["id"])
        if prompt_type.value == "query":
            return self._query_vectors(ids)
        return self._compress(self._document_vectors(ids))

    def _query_vectors(self, ids: list[str]) -> np.ndarray:
        start, end = self.queries_asked, self.queries_asked + len(ids)
        if self.queries.ids[start:end] == ids:
            self.queries_asked = end
            return self.queries.array[start:end]
        self.query_rows = self.query_rows or _rows_by_id(self.queries.ids, "queries")
        return self.queries.array[self.query_rows(ids)]

    def _document_vectors(self, ids: list[str]) -> np.ndarray:
        if self.by_id is None:
            chunk = self._next_in_order(len(ids))
            if chunk.ids == ids:
                return chunk.array
            whole = _joined(list(self.documents()))  # asked out of order: look them up by id
            self.by_id = _rows_by_id(whole.ids, "documents"), whole.array
        rows, array = self.by_id
        return array[rows(ids)]

    def _next_in_order(self, n: int) -> Vectors:
        """The next `n` documents as stored, across the stream's batches."""
        if self.in_order is None:
            self.in_order = self.documents()
        parts = [self.pending] if self.pending else []
        have = sum(len(part.ids) for part in parts)
        while have < n and (part := next(self.in_order, None)) is not None:
            parts.append(part)
            have += len(part.ids)
        read = _joined(parts)
        self.pending = Vectors(read.ids[n:], read.array[n:])
        return Vectors(read.ids[:n], read.array[:n])

    def _compress(self, vectors: np.ndarray) -> np.ndarray:
        return quantize(truncate(vectors, self.dimension), self.quantization, self.ranges)


def _rows_by_id(stored: list[str], side: str) -> Callable[[list[str]], list[int]]:
    """ids -> their rows in `stored`, which must name each text once."""
    rows = {id_: row for row, id_ in enumerate(stored)}
    if len(rows) < len(stored):
        raise EvalError(
            f"mteb asked for {side} out of the order they were embedded in, and their ids repeat "
            "(subsets or splits numbered alike): their vectors cannot be told apart"
        )
    return lambda ids: [rows[i] for i in ids]
