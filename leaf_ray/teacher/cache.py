"""The persistent teacher-embedding cache: a folder per teacher setting, Parquet shards + manifest.

    <cache_dir>/<teacher>-<key>/key.json                      everything that changes a vector
                                /shards/<uuid>.parquet             text_hash, kind, text, embedding
                                /manifest/<uuid>.parquet.json      rows and sha256 of one shard
                                /set_aside/                        shards that failed their check

The cache may sit on a local or NFS path or in an object store (`leaf_ray.storage`). A shard is
written whole (a temporary name then a rename, or one object PUT), then its manifest entry the
same way: a shard counts only once its entry exists, so a run killed at any point leaves a cache
that the next run extends (it embeds only the texts whose hash is missing). Rows are keyed by a
hash of (kind, text), so a text is embedded once however many runs, sources or students use it."""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray.data
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink

from leaf_ray.hashing import first_of_each, text_hash
from leaf_ray.run import RunError
from leaf_ray.storage import Location

FORMAT_VERSION = 1


KEY_JSON, SHARDS, MANIFEST, SET_ASIDE = "key.json", "shards", "manifest", "set_aside"


TEXT_COLUMNS = ("text_hash", "kind", "text")


def embedding_column(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """One fixed-size list per row: how both caches store vectors in Parquet."""
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])


def add_text_hash(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    hashes = [text_hash(k, t) for k, t in zip(batch["kind"], batch["text"], strict=True)]
    return {**batch, "text_hash": np.array(hashes, dtype=object)}


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
        return [json.loads(f.read_text()) for f in (self.root / MANIFEST).files(".json")]

    def set_aside_bad_shards(self) -> list[str]:
        """Check every committed shard against its manifest entry (there, same sha256, a
        readable Parquet file) before its rows are trusted. A shard that fails is moved to
        set_aside/ with its entry, entry first (from then on it is not committed), so its texts
        count as missing and the next `embed` embeds them again. Returns each one, with why."""
        moved = []
        for entry in self.entries():
            shard = self.root / SHARDS / entry["shard"]
            problem = shard_problem(shard.read_bytes() if shard.is_file() else None, entry)
            if problem is None:
                continue
            name = f"{entry['shard']}.json"
            (self.root / MANIFEST / name).move_to(self.root / SET_ASIDE / name)
            if shard.is_file():
                shard.move_to(self.root / SET_ASIDE / entry["shard"])
            moved.append(f"{entry['shard']}: {problem}")
        return moved

    def shard_paths(self) -> list[str]:
        """The committed shards in the order of their contents' sha256, not of their names
        (random): a cache embedded again from scratch is read in the same order, so a run on it
        trains on the same batches."""
        entries = sorted(self.entries(), key=lambda entry: entry["sha256"])
        return [(self.root / SHARDS / e["shard"]).path for e in entries]

    def hashes(self) -> np.ndarray:
        """Hashes of every committed row (a text may appear twice if two runs raced)."""
        return self._committed()["text_hash"].to_numpy(zero_copy_only=False)

    def later_copies(self) -> dict[str, set[str]]:
        """Shard name -> the hashes in it that an earlier shard (read order) holds too: texts
        two runs embedded at once, both committed. Reads skip them, so a text comes once."""
        committed = self._committed()
        hashes = committed["text_hash"].to_numpy(zero_copy_only=False).astype(str)
        later = np.ones(len(hashes), dtype=bool)
        later[first_of_each(hashes)] = False
        copies: dict[str, set[str]] = {}
        for path, h in zip(
            committed["__filename"].to_numpy(zero_copy_only=False)[later],
            hashes[later],
            strict=True,
        ):
            copies.setdefault(posixpath.basename(path), set()).add(h)
        return copies

    def _committed(self) -> pa.Table:
        """text_hash and shard path of every committed row, shards in read order."""
        paths = self.shard_paths()
        if not paths:
            return pa.table(
                {"text_hash": pa.array([], pa.string()), "__filename": pa.array([], pa.string())}
            )
        shards = pads.dataset(paths, format="parquet", filesystem=self.root.fs)
        return shards.to_table(columns=["text_hash", "__filename"])

    def sink(self, vector_dtype: str, rows_per_shard: int) -> CacheSink:
        return CacheSink(self.root, vector_dtype, rows_per_shard)

    def read(
        self,
        wanted: np.ndarray,
        counts: np.ndarray | None = None,
        copies: dict[str, set[str]] | None = None,
    ) -> ray.data.Dataset:
        """The committed rows whose hash is in `wanted`: each once, or `counts[i]` times for
        `wanted[i]` (then `wanted` must be sorted and distinct, as `mixture_counts` gives)."""
        if counts is None:
            wanted, counts = np.unique(wanted.astype(str)), None
        if copies is None:  # callers reading twice pass `later_copies()` once
            copies = self.later_copies()  # usually none: then rows need not say their shard
        shards = ray.data.read_parquet(
            self.shard_paths(), filesystem=self.root.fs, include_paths=bool(copies)
        )
        return shards.map_batches(
            _keep_wanted, fn_args=(wanted.astype(str), counts, copies), batch_format="pyarrow"
        )


def _keep_wanted(
    table: pa.Table, wanted: np.ndarray, counts: np.ndarray | None, copies: dict[str, set[str]]
) -> pa.Table:
    if copies:  # a block may hold several shards' rows: drop each row another shard holds first
        paths = table.column("path").to_pylist()
        hashes = table.column("text_hash").to_pylist()
        first = [
            h not in copies.get(posixpath.basename(p), ())
            for p, h in zip(paths, hashes, strict=True)
        ]
        table = table.filter(pa.array(first)).drop_columns(["path"])
    if not len(wanted):
        return table.slice(0, 0)
    hashes = table.column("text_hash").to_numpy(zero_copy_only=False).astype(str)
    first = first_of_each(hashes)  # a hash written twice is read once
    at = np.minimum(np.searchsorted(wanted, hashes[first]), len(wanted) - 1)
    hit = wanted[at] == hashes[first]
    rows = first[hit]
    return table.take(rows if counts is None else np.repeat(rows, counts[at[hit]]))


class CacheSink(Datasink):
    """Ray Data sink: each write task commits one shard, then its manifest entry."""

    def __init__(self, root: Location, vector_dtype: str, rows_per_shard: int):
        self.root, self.vector_dtype, self.rows_per_shard = root, vector_dtype, rows_per_shard

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_shard

    def write(self, blocks: Iterable[Block], ctx) -> int:
        batches = [BlockAccessor.for_block(b).to_batch_format("numpy") for b in blocks]
        batches = [b for b in batches if len(b["text_hash"])]
        if not batches:
            return 0
        columns = {c: np.concatenate([b[c] for b in batches]) for c in TEXT_COLUMNS}
        vectors = np.concatenate([b["embedding"] for b in batches]).astype(self.vector_dtype)
        # A text listed twice with the same id reaches the sink twice: keep one.
        first = first_of_each(columns["text_hash"].astype(str))
        shard = pa.table(
            {
                **{c: pa.array(v[first].astype(str), pa.string()) for c, v in columns.items()},
                "embedding": embedding_column(vectors[first]),
            }
        )
        sink = pa.BufferOutputStream()
        pq.write_table(shard, sink)
        data = sink.getvalue().to_pybytes()
        name = f"{uuid.uuid4().hex}.parquet"
        (self.root / SHARDS / name).write(data)
        entry = {"shard": name, "rows": shard.num_rows, "sha256": hashlib.sha256(data).hexdigest()}
        (self.root / MANIFEST / f"{name}.json").write(json.dumps(entry))
        return shard.num_rows


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


def verify(cache: TeacherCache, wanted: np.ndarray | None = None) -> VerifyReport:
    """Re-read every committed shard: checksum, row count, hash of (kind, text), vector sanity,
    duplicates across shards; and, given the hashes a dataset needs, what is missing."""
    report = VerifyReport()
    dim, normalized = cache.key.get("dimension"), cache.key.get("normalized")
    seen: set[str] = set()
    committed = set()
    for entry in cache.entries():
        shard = cache.root / SHARDS / entry["shard"]
        committed.add(entry["shard"])
        report.shards += 1
        data = shard.read_bytes() if shard.is_file() else None
        problem = shard_problem(data, entry)
        if problem:
            report.corrupt.append(f"{entry['shard']}: {problem}")
            continue
        table = pq.read_table(pa.BufferReader(data))
        if table.num_rows != entry["rows"]:
            report.corrupt.append(
                f"{entry['shard']}: {table.num_rows} rows, the manifest says {entry['rows']}"
            )
        report.corrupt += _check_rows(entry["shard"], table, dim, normalized)
        for h in table.column("text_hash").to_pylist():
            report.duplicated += h in seen
            seen.add(h)
        report.rows += table.num_rows
    shards = (cache.root / SHARDS).files(".parquet")
    report.orphans = [s.name for s in shards if s.name not in committed]
    if wanted is not None:
        report.missing = int(np.setdiff1d(np.unique(wanted.astype(str)), list(seen)).size)
    return report


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
    rows = table.to_pydict()
    triples = zip(rows["text_hash"], rows["kind"], rows["text"], strict=True)
    for i, (h, kind, text) in enumerate(triples):
        if text_hash(kind, text) != h:
            problems.append(f"{shard}: row {i}: text_hash does not match its kind and text")
    vectors = np.asarray(rows["embedding"], dtype=np.float32)
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
