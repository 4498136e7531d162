"""Micro-batches: cut from windows of shuffled rows (by length, or as neighbours by the teacher's
vectors), tokenized in the collate function, a fixed number per step."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
from sentence_transformers import SentenceTransformer

from leaf_ray.config import Grouping, TrainConfig
from leaf_ray.hashing import HASH_DTYPE, hex_of

# Texts per length-sorting window, in batches: batches then carry little padding.
BUCKET_BATCHES = 16


# A generous size of one text in Ray's object store, for deciding whether a training set fits.
TEXT_BYTES = 2048


@dataclass(frozen=True)
class Batching:
    """How a worker cuts the global batch: micro-batches per step (gradient accumulation) and
    per epoch, from the rows its shard holds."""

    micro_batch: int
    accumulation: int
    micro_per_epoch: int
    last_rows: int  # in the epoch's last micro-batch, which may be short
    grouping: Grouping = "length"
    window_batches: int = BUCKET_BATCHES  # micro-batches cut from each window of rows

    @classmethod
    def of(cls, tcfg: TrainConfig, num_rows: int, world: int) -> Batching:
        micro = tcfg.batch_size // world // tcfg.grad_accumulation
        windows = BUCKET_BATCHES
        if tcfg.batching == "neighbours":
            windows = max(1, tcfg.neighbour_window // micro)
        rows = num_rows // world
        per_epoch = batches_per_epoch(rows, micro, windows)
        last = rows - (per_epoch - 1) * micro
        return cls(micro, tcfg.grad_accumulation, per_epoch, last, tcfg.batching, windows)

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.micro_per_epoch // self.accumulation)

    def loss_weight(self, i: int, rows: int) -> float:
        """Micro-batch `i`'s share of its step's loss, its `rows` over the step's: every row of
        a step weighs the same, in the epoch's last step too, which may hold fewer micro-batches
        and a short one (`bucketed_batches` yields it last)."""
        first = i // self.accumulation * self.accumulation
        size = min(self.accumulation, self.micro_per_epoch - first)
        step_rows = size * self.micro_batch
        if first + size == self.micro_per_epoch:
            step_rows -= self.micro_batch - self.last_rows
        return rows / step_rows

    def ends_step(self, i: int) -> bool:
        return (i + 1) % self.accumulation == 0 or i + 1 == self.micro_per_epoch


def batches_per_epoch(
    rows_per_worker: int, batch: int, window_batches: int = BUCKET_BATCHES
) -> int:
    """Batches `bucketed_batches` yields for a shard this size (equal split: workers agree)."""
    full, rest = divmod(rows_per_worker, batch * window_batches)
    return full * window_batches + -(-rest // batch)


class MicroBatch(NamedTuple):
    features: dict  # the tokenizer's output
    targets: torch.Tensor  # the teacher's vectors
    text_hashes: list[str]  # the texts' cache keys, which a step that diverges names; [] unknown


class TokenizedBuckets:
    """A window of rows as its batches of similar-length texts, tokenized, with their targets.
    Every call tokenizes with the same settings, so the threads and validation share the
    tokenizer."""

    def __init__(self, student: SentenceTransformer, batch: int, grouping: Grouping = "length"):
        self.student, self.batch, self.grouping = student, batch, grouping

    def __call__(self, window: dict[str, np.ndarray]) -> list[MicroBatch]:
        # Parquet list columns arrive as an object array of rows: stack them.
        texts, vectors = window["text"], np.stack(window["embedding"]).astype(np.float32)
        hashes = window.get("text_hash")
        if self.grouping == "neighbours":
            batches = neighbour_batches(vectors, self.batch)
        else:
            batches = length_sorted_batches(texts, self.batch)
        return [
            MicroBatch(
                self.student.preprocess(texts[rows].tolist()),
                torch.from_numpy(vectors[rows]),
                [] if hashes is None else hex_of(np.asarray(hashes[rows], HASH_DTYPE)),
            )
            for rows in batches
        ]


def length_sorted_batches(texts: np.ndarray, batch: int) -> list[np.ndarray]:
    """Row indices in batches of similar-length texts (characters: a cheap proxy for tokens)."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def neighbour_batches(vectors: np.ndarray, batch: int) -> list[np.ndarray]:
    """Row indices in batches of neighbours: the first row without a batch and its nearest rows
    without one, by the cosine of their (teacher) vectors, until every row has one; the last
    batches, of what is left, are the least alike. The rows come shuffled, so the rows that seed
    batches are a random draw, and no label is involved."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
    similarity = unit @ unit.T
    free, batches = np.ones(len(unit), dtype=bool), []
    for seed in range(len(unit)):
        if free[seed]:
            candidates = np.flatnonzero(free)
            rows = candidates[np.argsort(-similarity[seed, candidates], kind="stable")[:batch]]
            free[rows] = False
            batches.append(rows)
    return batches


def bucketed_batches(
    shard: ray.data.DataIterator,
    student: SentenceTransformer,
    batch: int,
    seed: int,
    window_batches: int = BUCKET_BATCHES,
    grouping: Grouping = "length",
    skip: int = 0,
) -> Iterator[MicroBatch]:
    """Shuffled, tokenized batches, cut from each window of `window_batches` batches' rows by
    length (little padding) or as teacher neighbours (close candidates for `loss: kl`), less
    the first `skip` (a resumed epoch): the windows they fill are drawn and dropped untokenized.

    A window's batches come in a random order, but its short batch, which only the epoch's last
    window holds, comes last: the step it ends is then known before it starts, and weighted
    by its rows (`Batching.loss_weight`).

    Hand-written because Ray Data has no length-grouped batching (HF Trainer's `group_by_length`),
    nor one by similarity. Windows are tokenized two ahead on two threads (Rust, GIL released),
    so tokenizing overlaps the training step instead of taking its place; on a GPU it is a large
    part of a small batch's step.
    """
    rng = np.random.default_rng(seed)
    window = batch * window_batches
    windows = iter(
        shard.iter_batches(
            batch_size=window,
            batch_format="numpy",
            prefetch_batches=2,
            local_shuffle_buffer_size=window * 4,
            local_shuffle_seed=seed,
        )
    )
    skipped_windows, skip = divmod(skip, window_batches)
    for rows in itertools.islice(windows, skipped_windows):
        rng.permutation(-(-len(rows["text"]) // batch))  # the order it would have drawn
    tokenize = TokenizedBuckets(student, batch, grouping)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize") as pool:
        for n, batches in enumerate(_ahead(pool, tokenize, windows, 2)):
            yield from _ordered(batches, rng, batch)[skip if n == 0 else 0 :]


def _ahead(pool: ThreadPoolExecutor, fn, items: Iterator, depth: int) -> Iterator:
    """`fn` of each item, in order, computed up to `depth` items ahead on `pool`."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _ordered(batches: list[MicroBatch], rng: np.random.Generator, batch: int) -> list[MicroBatch]:
    """A window's batches in a random order, its short one last."""
    order = rng.permutation(len(batches))
    return sorted((batches[i] for i in order), key=lambda b: len(b.targets) < batch)
