"""Which rows the teacher embeds and the student trains on: one row per distinct text, the
sources' weights, the held-out validation texts and the projection's fit sample.

Decided by one Ray task (`plan`) over 16-byte keys: each source row's key and source index
(`leaf_ray.inputs`, 18 bytes a row in Ray's object store) and the teacher cache's keys
(`TeacherCache.scan`). Its decisions stay in the object store as sorted key arrays, which the
Ray Data operations that read sources or the cache search (`select_rows`, `TeacherCache.read`);
the driver holds object references and counts, never a row per text. At six million texts the
task holds about 200 MB.

    plan = plan_selection(cfg, inputs.keys, cache.scan().ordinal_maps())
    rows = select_rows(texts, plan.todo, plan.repeated)  # each text the cache lacks, once
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import ray.data

from leaf_ray.config import LeafConfig
from leaf_ray.data.sources import DataError
from leaf_ray.hashing import HASH_BYTES, HASH_DTYPE, find_sorted, hashes_of

# A selection in the object store: sorted distinct keys, how many times each is read (None:
# once) and which cache shard holds each one's first copy (-1: none; None: not looked up).
Chosen = tuple[np.ndarray, np.ndarray | None, np.ndarray | None]


@dataclass(frozen=True)
class Selected:
    """Texts the plan chose, kept in the object store (`Chosen`), and how many."""

    ref: ray.ObjectRef
    texts: int  # distinct texts
    rows: int  # rows, counting each text as many times as it is read
    repeated: int  # of the texts, those that more than one source row holds
    ranges: list[tuple[bytes, bytes]]  # its keys cut in ranges, a reading task each (inclusive)


@dataclass(frozen=True)
class Plan:
    """What the teacher embeds and the student trains on, decided over every row's key."""

    rows: int  # source rows
    distinct: int  # distinct texts
    duplicated: int  # cache rows whose text an earlier shard holds: reads skip them
    todo: Selected  # texts the cache lacks
    training: Selected  # texts trained on, each as often as its source's weight says
    lowest: Selected  # the held-out texts, then the projection's fit sample: the lowest keys
    held: int  # of `lowest`, the first `held` are held out for validation
    repeated: ray.ObjectRef  # sorted keys that more than one source row holds
    first_missing: bytes | None  # a text the cache lacks, to name it


def plan_selection(
    cfg: LeafConfig,
    keys: list[tuple[ray.ObjectRef, int]],
    cache: list[tuple[ray.ObjectRef, np.ndarray]],
) -> Plan:
    """Run `plan` in a Ray task over the sources' `keys` (`Inputs.keys`) and the `cache`'s (each
    scan task's keys, with the read-order ordinals of the shards it read); only counts come back
    here."""
    weights = [src.weight for src in cfg.data.sources]
    fit = cfg.student.projection_fit_texts if cfg.student.projection_init != "random" else 0
    params = {"weights": weights, "seed": cfg.run.seed, "held": cfg.train.validation_texts}
    params["fit"] = fit
    task = ray.remote(plan).options(num_returns=5)
    summary, todo, training, lowest, repeated = task.remote(params, keys, cache)
    s = ray.get(summary)
    if not s["rows"]:
        raise DataError("data.sources: no texts to embed (every source is empty)")
    return Plan(
        rows=s["rows"],
        distinct=s["distinct"],
        duplicated=s["duplicated"],
        todo=Selected(todo, **s["todo"]),
        training=Selected(training, **s["training"]),
        lowest=Selected(lowest, **s["lowest"]),
        held=s["held"],
        repeated=repeated,
        first_missing=s["first_missing"],
    )


def plan(params: dict, keys: list[tuple[ray.ObjectRef, int]], cache: list[tuple]) -> tuple:
    """The plan's Ray task: `decide` over the keys it reads from the object store."""
    parts = [
        _source_keys(value, count)
        for value, (_, count) in zip(ray.get([r for r, _ in keys]), keys, strict=True)
    ]
    hashes = np.concatenate([h for h, _ in parts] or [_no_keys()])
    sources = np.concatenate([s for _, s in parts] or [np.empty(0, np.int16)])
    del parts
    found = ray.get([ref for ref, _ in cache])
    cached = np.concatenate([h for h, _ in found] or [_no_keys()])
    places = [ordinals for _, ordinals in cache]
    shards = np.concatenate(
        [place[local] for (_, local), place in zip(found, places, strict=True)]
        or [np.empty(0, np.int32)]
    )
    del found
    return decide(hashes, sources, cached, shards, params)


def decide(
    hashes: np.ndarray, sources: np.ndarray, cached: np.ndarray, shards: np.ndarray, params: dict
) -> tuple[dict, Chosen, Chosen, Chosen, np.ndarray]:
    """(summary, todo, training, lowest, repeated) from every source row's key and source, and
    every cache row's key and shard (read order); see `Plan`. `params`: the sources' weights,
    the seed, the validation texts and the fit sample's size."""
    order = np.lexsort((sources, hashes))  # by key, then source: each text's first source
    hashes, sources = hashes[order], sources[order]
    first = _firsts(hashes)
    distinct, source = hashes[first], sources[first]
    repeated = np.unique(hashes[~first])
    rows = len(hashes)
    del hashes, sources, order

    cached, shard, duplicated = _first_copies(cached, shards)
    found, first_shard = _look_up(cached, shard, distinct)
    missing = distinct[~found]

    held = min(params["held"], distinct.size // 10)  # at most a tenth
    training, counts = distinct[held:], _mixture_counts(source[held:], params)
    keep = counts > 0
    lowest = distinct[: held + params["fit"]]
    chosen = {
        "todo": (missing, None, None),
        "training": (training[keep], counts[keep], first_shard[held:][keep]),
        "lowest": (lowest, None, first_shard[: lowest.size]),
    }
    summary = {
        "rows": rows,
        "distinct": int(distinct.size),
        "duplicated": duplicated,
        "held": held,
        "first_missing": _whole(missing[0]) if missing.size else None,
    }
    for name, (keys_, counts_, _) in chosen.items():
        summary[name] = {
            "texts": int(keys_.size),
            "rows": int(counts_.sum()) if counts_ is not None else int(keys_.size),
            "repeated": int(_isin_sorted(repeated, keys_).sum()),
            "ranges": key_ranges(keys_),
        }
    return summary, chosen["todo"], chosen["training"], chosen["lowest"], repeated


def _source_keys(value: tuple, count: int) -> tuple[np.ndarray, np.ndarray]:
    """A piece's (keys, sources) as its scan left them, its first `count` (-1: all)."""
    hashes, sources = value
    return (hashes, sources) if count < 0 else (hashes[:count], sources[:count])


# Distinct keys a reading task takes: at least a few thousand (each opens every shard's footer),
# at most this many (the rows it holds at once), and enough tasks to spread over a cluster.
RANGE_KEYS = (1024, 65536)
RANGE_TASKS = 32


def key_ranges(keys: np.ndarray) -> list[tuple[bytes, bytes]]:
    """Sorted `keys` cut into consecutive (first, last) ranges, a reading task each."""
    low, high = RANGE_KEYS
    per = int(min(high, max(low, -(-keys.size // RANGE_TASKS))))
    starts = range(0, keys.size, per)
    return [(_whole(keys[i]), _whole(keys[min(i + per, keys.size) - 1])) for i in starts]


def _whole(key: np.bytes_) -> bytes:
    """A key as its 16 bytes: numpy drops an `S16` item's trailing zero bytes."""
    return bytes(key).ljust(HASH_BYTES, b"\0")


def _no_keys() -> np.ndarray:
    return np.empty(0, HASH_DTYPE)


def _firsts(hashes: np.ndarray) -> np.ndarray:
    """In sorted keys, whether each row is its key's first."""
    first = np.ones(len(hashes), dtype=bool)
    first[1:] = hashes[1:] != hashes[:-1]
    return first


def _first_copies(hashes: np.ndarray, shards: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The cache's distinct keys, sorted, each with the first shard (read order) holding it,
    and how many rows repeat a key an earlier shard holds."""
    order = np.lexsort((shards, hashes))
    hashes, shards = hashes[order], shards[order]
    first = _firsts(hashes)
    return hashes[first], shards[first], int((~first).sum())


def _look_up(cached: np.ndarray, shards: np.ndarray, wanted: np.ndarray):
    """Whether each wanted key is cached, and its first shard (-1 where it is not)."""
    at, found = find_sorted(cached, wanted)
    shard = shards[at] if shards.size else np.zeros(at.size, np.int32)
    return found, np.where(found, shard, -1).astype(np.int32)


def _isin_sorted(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    return find_sorted(sorted_keys, keys)[1]


def _mixture_counts(source: np.ndarray, params: dict) -> np.ndarray:
    """Times each distinct text (in key order, with its first source) is trained on per epoch,
    from its source's weight. A fractional part picks exactly that fraction of the source's
    texts for one more pass, seeded, from the texts in key order: the rows' order (which Ray
    Data does not fix) leaves the choice alone, so every worker and rerun sees the same set."""
    weights = params["weights"]
    counts = np.floor(np.asarray(weights)[source]).astype(np.int64)
    rng = np.random.default_rng(params["seed"])
    for index, weight in enumerate(weights):
        members = np.flatnonzero(source == index)
        extra = round((weight % 1) * members.size)
        counts[rng.choice(members, size=extra, replace=False)] += 1
    return counts


def select_rows(
    texts: ray.data.Dataset, chosen: Selected, repeated: ray.ObjectRef
) -> ray.data.Dataset:
    """The source rows of the texts `chosen` names, each text as many times as it says. A text
    that several rows hold is kept once: those few rows are gathered by one task, which runs
    only when the plan chose such a text."""
    rows = texts.map_batches(
        _keep_rows, fn_args=(chosen.ref, repeated, False), batch_format="pyarrow"
    )
    if not chosen.repeated:
        return rows
    several = texts.map_batches(
        _keep_rows, fn_args=(chosen.ref, repeated, True), batch_format="pyarrow"
    )
    once = ray.remote(_one_row_each).remote(chosen.ref, several.materialize().to_arrow_refs())
    return rows.union(ray.data.from_arrow_refs([once]))


def _keep_rows(
    table: pa.Table, chosen: ray.ObjectRef, repeated: ray.ObjectRef, only_repeated: bool
) -> pa.Table:
    """A source batch's rows whose text `chosen` names: those no other row shares, each as many
    times as it says; or (`only_repeated`) the others, once each."""
    # Ray Data passes object references in fn_args as they are: read here, without a copy.
    (wanted, counts, _), repeated = ray.get([chosen, repeated])
    hashes = hashes_of(table["text_hash"])
    at, hit = find_sorted(wanted, hashes)
    hit &= _isin_sorted(repeated, hashes) == only_repeated
    rows = np.flatnonzero(hit)
    if counts is not None and not only_repeated:
        rows = np.repeat(rows, counts[at[rows]])
    return table.take(rows)


def _one_row_each(chosen: Chosen, parts: list[ray.ObjectRef]) -> pa.Table:
    """One row for each text among rows that share it, repeated as `chosen` says."""
    wanted, counts, _ = chosen
    table = pa.concat_tables(ray.get(parts))
    _, first = np.unique(hashes_of(table["text_hash"]), return_index=True)
    table = table.take(np.sort(first))
    if counts is None:
        return table
    hashes = hashes_of(table["text_hash"])
    at, _ = find_sorted(wanted, hashes)
    return table.take(np.repeat(np.arange(table.num_rows), counts[at]))
