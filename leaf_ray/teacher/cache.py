"""The persistent teacher-embedding cache: a folder per teacher setting, Parquet shards + manifest.

    <cache_dir>/<teacher>-<key>/key.json                 everything that changes a vector
                                /shards/<uuid>.parquet        text_hash, kind, text, embedding
                                /manifest/<uuid>.json         a list of committed shards' entries
                                /set_aside/                   shards that failed their check

The cache may sit on a local or NFS path or in an object store (`leaf_ray.storage`). A shard is
written whole (a temporary name then a rename, or one object PUT), then an entry file naming it
the same way: a shard counts only once an entry names it, so a run killed at any point leaves a
cache that the next run extends (it embeds only the texts whose hash is missing). When a write
has finished, its entries are merged into one manifest file, so that a reader opens a file per
write, not per shard. Rows are keyed by a 16-byte hash of (kind, text), so a text is embedded
once however many runs, sources or students use it; each shard holds its rows sorted by it, in
small row groups, so the texts with the lowest hashes (the held-out and projection-fit samples)
are read without the rest of the vectors.

Nothing here holds a row per text in one process: shards are checked by the Ray tasks that read
them (`scan`), which leave their keys in Ray's object store for the selection
(`leaf_ray.data.selection`), and reads keep rows by searching a sorted key array there."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink
from ray.data.datasource.datasink import WriteResult

from leaf_ray.hashing import (
    HASH_DTYPE,
    HASH_TYPE,
    find_sorted,
    hashes_of,
    hashes_to_arrow,
    text_hashes,
)
from leaf_ray.run import RunError
from leaf_ray.storage import Location

FORMAT_VERSION = 2


KEY_JSON, SHARDS, MANIFEST, SET_ASIDE = "key.json", "shards", "manifest", "set_aside"


# Rows per Parquet row group: a read of a key range opens, in each shard, the groups that overlap
# it (~100 KB of 384-d float16 vectors each), not the whole shard.
ROW_GROUP_ROWS = 128


# Shards checked by one Ray task: enough to amortise a task's start, few enough to spread.
SHARDS_PER_SCAN = 16


def embedding_column(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """One fixed-size list per row: how both caches store vectors in Parquet."""
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])


def add_text_hash(table: pa.Table) -> pa.Table:
    """A `text_hash` column for rows with `kind` and `text` (a Ray Data batch function)."""
    hashes = text_hashes(table["kind"].to_pylist(), table["text"].to_pylist())
    return table.append_column("text_hash", hashes_to_arrow(hashes))


@dataclass(frozen=True)
class CacheKeys:
    """What `TeacherCache.scan` found: the committed shards in read order, those that failed
    their check (shard -> why), and, in Ray's object store, each scan task's keys: a pair of
    (hashes, the index of each row's shard among the shards that task read), with those shards'
    names."""

    entries: list[dict]
    problems: dict[str, str]
    row_problems: list[str]
    rows: int
    parts: list[tuple[ray.ObjectRef, list[str]]]

    @property
    def good(self) -> list[dict]:
        return [e for e in self.entries if e["shard"] not in self.problems]

    def ordinals(self) -> dict[str, int]:
        """Each shard's place in read order: the shard ordinals that selections name."""
        return {e["shard"]: i for i, e in enumerate(self.entries)}

    def ordinal_maps(self) -> list[tuple[ray.ObjectRef, np.ndarray]]:
        """Each scan task's keys, with the read-order ordinal of each shard it read."""
        place = self.ordinals()
        return [(ref, np.array([place[n] for n in names], np.int32)) for ref, names in self.parts]

    def __add__(self, later: CacheKeys) -> CacheKeys:
        """This scan and a later one of the shards committed since."""
        by_shard = {e["shard"]: e for e in self.entries + later.entries}
        return CacheKeys(
            sorted(by_shard.values(), key=_read_order),
            self.problems | later.problems,
            self.row_problems + later.row_problems,
            self.rows + later.rows,
            self.parts + later.parts,
        )


def _read_order(entry: dict) -> tuple[str, str]:
    return entry["keys_sha256"], entry["shard"]


@dataclass(frozen=True)
class TeacherCache:
    root: Location
    key: dict = field(compare=False)

    @classmethod
    def open(cls, cache_dir: Location, key: dict, label: str, create: bool = True) -> TeacherCache:
        """The cache folder for these teacher settings, created (with key.json) when new. The
        label (the teacher's name) only names the folder: the key decides which folder. Not
        `create`: one that is not there is an error (checking a cache makes none)."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(label).name)[:48]
        root = cache_dir / f"{slug}-{digest}"
        if not create and not (root / KEY_JSON).is_file():
            raise RunError(
                f"{root}: no teacher cache for this config's teacher settings; `leaf-ray embed` "
                "(or distill) fills it"
            )
        for sub in (SHARDS, MANIFEST):
            (root / sub).mkdir()
        if not (root / KEY_JSON).exists():
            (root / KEY_JSON).write(json.dumps({"label": label, **key}, indent=2, sort_keys=True))
        return cls(root, key)

    def entries(self) -> list[dict]:
        """The committed shards' entries in read order: by the sha256 of the keys they hold, so
        the order follows the texts, not the vectors' last bits (which differ between CPUs) nor
        the shards' random names."""
        by_shard: dict[str, dict] = {}
        for file in (self.root / MANIFEST).files(".json"):
            for entry in json.loads(file.read_text()):
                by_shard.setdefault(entry["shard"], entry)
        return sorted(by_shard.values(), key=_read_order)

    def scan(self, entries: list[dict] | None = None, rows: bool = False) -> CacheKeys:
        """Check committed shards (`entries`, default all) in Ray tasks that read them: there,
        the manifest's sha256, a readable footer, and with `rows` every row's hash and vector
        (`cache verify`). Each task leaves the keys of the shards that pass in the object store;
        only the problems come back."""
        entries = self.entries() if entries is None else entries
        dim, normalized = self.key.get("dimension"), self.key.get("normalized")
        scan = ray.remote(_scan_shards).options(num_returns=2)
        reports, parts = [], []
        for start in range(0, len(entries), SHARDS_PER_SCAN):
            part = entries[start : start + SHARDS_PER_SCAN]
            report, keys = scan.remote(self.root, part, rows, dim, normalized)
            reports.append(report)
            parts.append((keys, [e["shard"] for e in part]))
        problems, row_problems, count = {}, [], 0
        for report in ray.get(reports):
            problems |= report["problems"]
            row_problems += report["row_problems"]
            count += report["rows"]
        return CacheKeys(entries, problems, row_problems, count, parts)

    def set_aside(self, problems: dict[str, str]) -> list[str]:
        """Move shards that failed their check to set_aside/, their entries first (from then on
        they are not committed), so their texts count as missing and the next `embed` embeds
        them again. Returns each one, with why."""
        for file in (self.root / MANIFEST).files(".json"):
            entries = json.loads(file.read_text())
            kept = [e for e in entries if e["shard"] not in problems]
            if len(kept) == len(entries):
                continue
            for entry in entries:
                if entry["shard"] in problems:
                    (self.root / SET_ASIDE / f"{entry['shard']}.json").write(json.dumps([entry]))
            if kept:
                file.write(json.dumps(kept))
            else:
                file.fs.delete_file(file.path)
        moved = []
        for shard, problem in sorted(problems.items()):
            path = self.root / SHARDS / shard
            if path.is_file():
                path.move_to(self.root / SET_ASIDE / shard)
            moved.append(f"{shard}: {problem}")
        return moved

    def shard_paths(self, entries: list[dict]) -> list[str]:
        return [(self.root / SHARDS / e["shard"]).path for e in entries]

    def sink(self, vector_dtype: str, rows_per_shard: int | None) -> CacheSink:
        return CacheSink(self.root, vector_dtype, rows_per_shard)

    def read(
        self, keys: CacheKeys, selected: ray.ObjectRef, ranges: list[tuple[bytes, bytes]]
    ) -> ray.data.Dataset:
        """The rows `selected` names, from its (hashes, counts, shard ordinals) in the object
        store (`leaf_ray.data.selection`): each `counts[i]` times, from the shard that holds
        its first copy, in key order. A task per key range of `ranges` (inclusive, in order)
        reads from every shard only the row groups whose keys overlap it (rows are sorted by
        key within a shard), so the order is the keys', whichever shards the texts were
        embedded into, and a few thousand texts do not read every vector of the cache."""
        place = keys.ordinals()
        good = [(place[e["shard"]], e) for e in keys.good]
        items = [{"lo": lo, "hi": hi} for lo, hi in ranges]
        return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
            _read_range, fn_args=(self.root, good, selected), batch_size=1, batch_format="pyarrow"
        )


def _scan_shards(
    root: Location, entries: list[dict], rows: bool, dim: int | None, normalized: bool | None
) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """One scan task: each shard's check, and the hashes of those that pass with the index of
    their shard in `entries`."""
    report: dict = {"problems": {}, "row_problems": [], "rows": 0}
    hashes, ordinals = [], []
    for ordinal, entry in enumerate(entries):
        shard = root / SHARDS / entry["shard"]
        data = shard.read_bytes() if shard.is_file() else None
        problem = shard_problem(data, entry)
        columns = None if rows else ["text_hash"]
        table = None if problem else pq.read_table(pa.BufferReader(data), columns=columns)
        if table is not None and table.num_rows != entry["rows"]:
            problem = f"{table.num_rows} rows, the manifest says {entry['rows']}"
        if problem:
            report["problems"][entry["shard"]] = problem
            continue
        if rows:
            report["row_problems"] += _check_rows(entry["shard"], table, dim, normalized)
        report["rows"] += table.num_rows
        hashes.append(hashes_of(table["text_hash"]))
        ordinals.append(np.full(table.num_rows, ordinal, dtype=np.int32))
    keys = (
        np.concatenate(hashes) if hashes else np.empty(0, HASH_DTYPE),
        np.concatenate(ordinals) if ordinals else np.empty(0, np.int32),
    )
    return report, keys


def _read_range(
    batch: pa.Table, root: Location, entries: list[tuple[int, dict]], selected: ray.ObjectRef
) -> pa.Table:
    """A Ray Data batch naming one key range: the rows of it that `selected` names, each from
    the shard holding its first copy and as many times as it says, sorted by key."""
    lo, hi = batch["lo"][0].as_py(), batch["hi"][0].as_py()
    # Ray Data passes an object reference in fn_args as it is; the arrays it names are read
    # from the object store without a copy.
    wanted, counts, first_in = ray.get(selected)
    parts = []
    for ordinal, entry in entries:
        with root.fs.open_input_file((root / SHARDS / entry["shard"]).path) as f:
            shard = pq.ParquetFile(f)
            meta = shard.metadata
            groups = [
                g
                for g in range(meta.num_row_groups)
                if meta.row_group(g).column(0).statistics.min <= hi
                and meta.row_group(g).column(0).statistics.max >= lo
            ]
            if not groups:
                continue
            table = shard.read_row_groups(groups)
        hashes = hashes_of(table["text_hash"])
        at, hit = find_sorted(wanted, hashes)
        hit &= first_in[at] == ordinal
        hit &= (hashes >= np.bytes_(lo)) & (hashes <= np.bytes_(hi))
        rows = np.flatnonzero(hit)
        parts.append(table.take(rows if counts is None else np.repeat(rows, counts[at[hit]])))
    if not parts:
        return _empty_rows()
    table = pa.concat_tables(parts)
    return table.take(np.argsort(hashes_of(table["text_hash"]), kind="stable"))


def _empty_rows() -> pa.Table:
    return pa.table(
        {
            "text_hash": pa.array([], HASH_TYPE),
            "kind": pa.array([], pa.string()),
            "text": pa.array([], pa.string()),
            "embedding": pa.array([], pa.list_(pa.float32())),
        }
    )


class CacheSink(Datasink):
    """Ray Data sink: a write task commits a shard per `rows_per_shard` rows it is given, each
    then an entry file naming it; the finished write merges its entries into one manifest file.
    `rows_per_shard` None: a shard per block, and blocks are not gathered into larger writes
    (where the sink fuses with the task that makes the rows, gathering rows would gather those
    tasks' inputs: every piece of a file into one task)."""

    def __init__(self, root: Location, vector_dtype: str, rows_per_shard: int | None):
        self.root, self.vector_dtype, self.rows_per_shard = root, vector_dtype, rows_per_shard

    @property
    def min_rows_per_write(self) -> int | None:
        return self.rows_per_shard

    def write(self, blocks: Iterable[Block], ctx) -> list[dict]:
        """The task's rows as shards, holding at most one shard's rows (and a block) at once."""
        entries, pending, rows = [], [], 0
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            pending.append(table)
            rows += table.num_rows
            if rows and (self.rows_per_shard is None or rows >= self.rows_per_shard):
                entries.append(self._commit(pa.concat_tables(pending, promote_options="default")))
                pending, rows = [], 0
        if rows:
            entries.append(self._commit(pa.concat_tables(pending, promote_options="default")))
        return entries

    def _commit(self, rows: pa.Table) -> dict:
        """One shard, written whole, then its entry."""
        hashes = hashes_of(rows["text_hash"])
        # A text listed twice reaches the sink twice: keep one; rows sorted by their key.
        distinct, first = np.unique(hashes, return_index=True)
        rows = rows.take(first)
        vectors = vector_matrix(rows["embedding"]).astype(self.vector_dtype)
        shard = pa.table(
            {
                "text_hash": hashes_to_arrow(distinct),
                "kind": rows["kind"].cast(pa.string()),
                "text": rows["text"].cast(pa.string()),
                "embedding": embedding_column(vectors),
            }
        )
        out = pa.BufferOutputStream()
        pq.write_table(shard, out, row_group_size=ROW_GROUP_ROWS)
        data = out.getvalue().to_pybytes()
        name = f"{uuid.uuid4().hex}.parquet"
        (self.root / SHARDS / name).write(data)
        entry = {
            "shard": name,
            "rows": shard.num_rows,
            "sha256": hashlib.sha256(data).hexdigest(),
            "keys_sha256": hashlib.sha256(distinct.tobytes()).hexdigest(),
        }
        (self.root / MANIFEST / f"{name}.json").write(json.dumps([entry]))
        return entry

    def on_write_complete(self, write_result: WriteResult[list[dict]]) -> None:
        """One manifest file for the whole write; then the per-shard ones it replaces."""
        entries = [e for written in write_result.write_returns for e in written]
        if not entries:
            return
        (self.root / MANIFEST / f"{uuid.uuid4().hex}.json").write(json.dumps(entries))
        for entry in entries:
            single = self.root / MANIFEST / f"{entry['shard']}.json"
            single.fs.delete_file(single.path)


def vector_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A column of equal-length vectors (lists, or Ray's tensor type) as a matrix."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(column.type, pa.ExtensionType):  # Ray Data's tensors, from numpy batches
        return np.asarray(column.to_numpy())
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), -1)


@dataclass
class VerifyReport:
    rows: int = 0
    shards: int = 0
    missing: int = 0  # texts of the given data with no vector
    # Rows whose hash an earlier shard holds (two embeds at once, a retried write): every
    # read skips them, so they are counted, not failed.
    duplicated: int = 0
    corrupt: list[str] = field(default_factory=list)  # shards or rows that fail a check
    orphans: list[str] = field(default_factory=list)  # shards never committed (harmless)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt)


def orphans(cache: TeacherCache, entries: list[dict]) -> list[str]:
    """Shard files no entry names: written by a task killed before its entry (harmless)."""
    committed = {e["shard"] for e in entries}
    return [s.name for s in (cache.root / SHARDS).files(".parquet") if s.name not in committed]


def shard_problem(data: bytes | None, entry: dict) -> str | None:
    """Why a committed shard (its bytes; None when absent) cannot be read as its manifest
    entry says, or None."""
    if data is None:
        return "in the manifest but missing"
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return "sha256 differs from the manifest"
    try:
        pq.ParquetFile(pa.BufferReader(data)).metadata  # noqa: B018 - the footer parses
    except (pa.ArrowException, OSError) as e:
        return f"not a readable Parquet file ({e})"
    return None


def _check_rows(shard: str, table: pa.Table, dim: int | None, normalized: bool | None) -> list:
    problems = []
    expected = text_hashes(table["kind"].to_pylist(), table["text"].to_pylist())
    for i in np.flatnonzero(expected != hashes_of(table["text_hash"])):
        problems.append(f"{shard}: row {i}: text_hash does not match its kind and text")
    vectors = vector_matrix(table["embedding"]).astype(np.float32)
    if dim is not None and vectors.shape[1:] != (dim,):
        problems.append(f"{shard}: vectors of shape {vectors.shape[1:]}, expected ({dim},)")
        return problems
    bad = ~np.isfinite(vectors).all(axis=1)
    if normalized:
        norms = np.linalg.norm(vectors, axis=1)
        bad |= np.abs(norms - 1) > 1e-2  # float16 storage keeps norms within ~1e-3
    for i in np.where(bad)[0]:
        problems.append(f"{shard}: row {i}: vector not finite or not unit length")
    return problems
