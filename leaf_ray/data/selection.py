"""Which rows the teacher embeds and the student trains on: one row per distinct text, the sources'
weights, the held-out validation texts."""

from __future__ import annotations

import numpy as np
import ray
import ray.data

from leaf_ray.config import LeafConfig
from leaf_ray.data.sources import DataError
from leaf_ray.hashing import first_of_each


def mixture_counts(
    hashes: np.ndarray, sources: np.ndarray, weights: list[float], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Times each distinct text is trained on per epoch, from its source's weight (a text in
    several sources takes the first listed one's). A fractional part picks exactly that fraction
    of the source's texts for one more pass, seeded, from the texts in hash order: the rows'
    order (which Ray Data does not fix) leaves the choice alone, so every worker and rerun sees
    the same set. Returns the distinct hashes, sorted, and their counts."""
    by_hash = np.lexsort((sources, hashes.astype(str)))  # each text's lowest source first
    hashes, sources = hashes[by_hash], sources[by_hash]
    first = first_of_each(hashes)
    distinct, source = hashes[first], sources[first]
    counts = np.floor(np.asarray(weights)[source]).astype(np.int64)
    rng = np.random.default_rng(seed)
    for index, weight in enumerate(weights):
        members = np.flatnonzero(source == index)
        extra = round((weight % 1) * members.size)
        counts[rng.choice(members, size=extra, replace=False)] += 1
    return distinct, counts


def row_keys(texts: ray.data.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's id, text hash and source index: only these small columns come to the driver;
    the texts stay in Ray."""
    keys = ("id", "text_hash", "source")
    parts: dict[str, list] = {key: [] for key in keys}
    for batch in texts.select_columns(list(keys)).iter_batches(batch_format="numpy"):
        for key in keys:
            parts[key].append(batch[key])
    if not parts["id"]:
        raise DataError("data.sources: no texts to embed (every source is empty)")
    ids, hashes, sources = (np.concatenate(parts[key]) for key in keys)
    return ids.astype(str), hashes.astype(str), sources.astype(np.int64)


def first_ids(ids: np.ndarray, hashes: np.ndarray) -> dict[str, str]:
    """text_hash -> the id of its first row: the one row that stands for the text."""
    first = first_of_each(hashes)
    return dict(zip(hashes[first].tolist(), ids[first].tolist(), strict=True))


def first_rows_missing(ids: np.ndarray, hashes: np.ndarray, cached: np.ndarray) -> dict:
    """text_hash -> (id of its first row, 1), for each distinct text not in the cache."""
    cached = set(cached.astype(str).tolist())
    return {h: (i, 1) for h, i in first_ids(ids, hashes).items() if h not in cached}


def shared_rows(ids: np.ndarray, hashes: np.ndarray) -> set[tuple[str, str]]:
    """(text_hash, id) pairs more than one row has: a text repeated in a source without ids,
    whose id is its content hash."""
    pairs, counts = np.unique(np.char.add(np.char.add(hashes, "\n"), ids), return_counts=True)
    return {tuple(pair.split("\n", 1)) for pair in pairs[counts > 1].tolist()}


def chosen_rows(
    texts: ray.data.Dataset, plan: dict, shared: set[tuple[str, str]]
) -> ray.data.Dataset:
    """The rows `plan` names (text_hash -> (id, times)), each repeated `times` times. Rows that
    name the same pair (`shared_rows`) are one text: kept once, through Ray Data's group-by,
    which runs only when the plan names such a pair."""
    if not any(h in plan and plan[h][0] == i for h, i in shared):
        return texts.map_batches(_repeat_rows, fn_args=(plan,), batch_format="numpy")
    once = {h: (i, 1) for h, (i, _) in plan.items()}
    named_rows = texts.map_batches(_repeat_rows, fn_args=(once,), batch_format="numpy")
    distinct = named_rows.groupby("text_hash").map_groups(_first_row, batch_format="numpy")
    return distinct.map_batches(_repeat_rows, fn_args=(plan,), batch_format="numpy")


def _first_row(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {column: values[:1] for column, values in group.items()}


def _repeat_rows(batch: dict[str, np.ndarray], plan: dict) -> dict[str, np.ndarray]:
    """Keep the rows `plan` names (text_hash -> (id, times)), each repeated `times` times."""
    times = np.array(
        [
            plan[h][1] if h in plan and plan[h][0] == i else 0
            for h, i in zip(batch["text_hash"], batch["id"], strict=True)
        ],
        dtype=np.int64,
    )
    rows = np.repeat(np.arange(len(times)), times)
    return {column: values[rows] for column, values in batch.items()}


def training_selection(
    cfg: LeafConfig, hashes: np.ndarray, sources: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct hashes held out for validation (the first in sorted order: hashes are
    uniform, so a random sample that stays the same across runs; at most a tenth), then the
    other distinct hashes, sorted, with the times each is trained on per epoch (the sources'
    weights)."""
    distinct = np.unique(hashes)
    held = distinct[: min(cfg.train.validation_texts, distinct.size // 10)]
    training = ~np.isin(hashes, held)
    weights = [src.weight for src in cfg.data.sources]
    wanted, counts = mixture_counts(hashes[training], sources[training], weights, cfg.run.seed)
    return held, wanted, counts
