"""The LEAF recipe, stage by stage: teacher vectors -> student training -> evaluation -> report.

A run lives at `<run.storage>/<name>`: a local or NFS path, where it builds in `.<name>.partial`
and is renamed only when every stage has finished, or an object store (s3://, gs://), where it
is uploaded with config.yaml last. Either way a folder with a config.yaml is a complete run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import ray
import ray.data
import yaml
from ray.train import Checkpoint

from leaf_ray.cache import TeacherCache, VerifyReport, add_text_hash, first_of_each, verify
from leaf_ray.cluster import connect_ray
from leaf_ray.config import LeafConfig, ModelRef, load_config
from leaf_ray.data import DataError, mixture_counts, read_texts
from leaf_ray.eval import Encoder, EvalOutcome, evaluate
from leaf_ray.inputs import check_inputs
from leaf_ray.models import resolve_model
from leaf_ray.projection import fit_student_projection
from leaf_ray.report import plot_loss, write_eval
from leaf_ray.run_files import (
    CONFIG_YAML,
    METRICS_JSONL,
    RAY_TRAIN,
    STUDENT,
    STUDENT_INIT,
    TEACHER_CACHE_JSON,
    TRAIN_STATE,
    VALIDATION_JSONL,
    read_metrics,
    write_metrics,
)
from leaf_ray.storage import Location
from leaf_ray.student import build_student
from leaf_ray.teacher import (
    TeacherSpace,
    cluster_stage_layout,
    embed_texts,
    load_teacher,
    load_without_weights,
    teacher_calls,
    teacher_prompts,
    teacher_space,
)
from leaf_ray.train import (
    Validation,
    held_for_epochs,
    train_student,
    trainer_resources,
)

RunFolder = TypeVar("RunFolder", Path, Location)  # a run on local disk, or wherever it is stored
PRETRAINED = "pretrained"  # the evaluation's name for the student model as it was given


logger = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A run that cannot start or be evaluated as asked."""


@dataclass(frozen=True)
class TeacherVectors:
    """The teacher's vectors for one config's texts, as committed in the cache."""

    cache: TeacherCache
    space: TeacherSpace
    hashes: np.ndarray  # one per input row (duplicates included)
    sources: np.ndarray  # each row's index in data.sources
    embedded: int  # texts this call embedded; 0 when the cache had them all
    skipped: dict[str, int]  # bad rows dropped (data.bad_rows: skip), by reason

    @property
    def unique(self) -> int:
        return int(np.unique(self.hashes).size)

    def training_set(self, cfg: LeafConfig) -> tuple[ray.data.Dataset, int, Validation | None]:
        """Rows (text_hash, kind, text, embedding) for one epoch, each distinct text as many
        times as its source's weight says, and their number; and the held-out validation texts
        with their vectors: the first hashes in sorted order (uniform, and stable across runs),
        at most a tenth of the texts."""
        held, wanted, counts = _training_plan(cfg, self.hashes, self.sources)
        copies = self.cache.later_copies()  # one scan of the cache's hashes for both reads
        validation = _validation(self.cache.read(held, copies=copies)) if held.size else None
        rows, num_rows = self.cache.read(wanted, counts, copies), int(counts.sum())
        return held_for_epochs(rows, num_rows, self.space.dimension), num_rows, validation


def embed(cfg: LeafConfig, skipped: Counter | None = None) -> TeacherVectors:
    """The teacher stage (`leaf-ray embed`): embed each distinct text the cache lacks, once.
    `skipped`: the bad rows `check_inputs` found, when the caller has checked the inputs.

    Rerunning after a crash or kill embeds only what is still missing; with the same teacher
    settings and texts, a second run embeds nothing.
    """
    space, cache, texts, skipped = _cache_and_texts(cfg, skipped)
    for shard in cache.set_aside_bad_shards():  # their texts are embedded again below
        logger.warning("teacher cache: set aside %s", shard)
    ids, hashes, sources = _row_keys(texts)
    todo = _first_rows_missing(ids, hashes, cache.hashes())
    if todo:
        chosen = _chosen_rows(texts, todo, _shared_rows(ids, hashes))
        layout = cluster_stage_layout(cfg.teacher, len(todo))
        sink = cache.sink(cfg.teacher.vector_dtype, layout.rows_per_call)
        calls = teacher_calls(chosen, layout)
        embed_texts(calls, cfg.teacher, layout).write_datasink(sink)
    missing = np.setdiff1d(np.unique(hashes.astype(str)), cache.hashes().astype(str))
    if missing.size:
        raise RunError(f"{cache.root}: {missing.size} texts still have no vector after the stage")
    return TeacherVectors(cache, space, hashes, sources, len(todo), dict(skipped))


def verify_cache(cfg: LeafConfig, repair: bool = False) -> tuple[VerifyReport, list[str]]:
    """`leaf-ray cache verify [--repair]`: the config's cache, and which of its texts have no
    vector; with `repair`, shards that fail their check are set aside first (and listed), for
    the next `embed` to embed their texts again."""
    _, cache, texts, _ = _cache_and_texts(cfg)
    moved = cache.set_aside_bad_shards() if repair else []
    return verify(cache, _row_keys(texts)[1]), moved


def _cache_and_texts(
    cfg: LeafConfig, skipped: Counter | None = None
) -> tuple[TeacherSpace, TeacherCache, ray.data.Dataset, Counter]:
    """The teacher's space, its cache folder, the config's texts with their row hashes, and the
    bad rows left out."""
    space, texts, skipped = _space_and_texts(cfg, skipped)
    cache = TeacherCache.open(cfg.cache_dir(), space.key, cfg.teacher.model)
    return space, cache, texts, skipped


def _space_and_texts(
    cfg: LeafConfig, skipped: Counter | None = None
) -> tuple[TeacherSpace, ray.data.Dataset, Counter]:
    """The teacher's space and the config's texts with their row hashes, on the config's Ray,
    once the inputs pass their checks (unless `skipped` says they have); and the bad rows left
    out (data.bad_rows: skip)."""
    skipped = check_inputs(cfg) if skipped is None else skipped
    connect_ray(cfg.ray)
    space = teacher_space(cfg.teacher, on_gpu=ray.cluster_resources().get("GPU", 0) > 0)
    texts = read_texts(cfg.data).map_batches(add_text_hash, batch_format="numpy")
    return space, texts, skipped


def _row_keys(texts: ray.data.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _first_ids(ids: np.ndarray, hashes: np.ndarray) -> dict[str, str]:
    """text_hash -> the id of its first row: the one row that stands for the text."""
    first = first_of_each(hashes)
    return dict(zip(hashes[first].tolist(), ids[first].tolist(), strict=True))


def _first_rows_missing(ids: np.ndarray, hashes: np.ndarray, cached: np.ndarray) -> dict:
    """text_hash -> (id of its first row, 1), for each distinct text not in the cache."""
    cached = set(cached.astype(str).tolist())
    return {h: (i, 1) for h, i in _first_ids(ids, hashes).items() if h not in cached}


def _shared_rows(ids: np.ndarray, hashes: np.ndarray) -> set[tuple[str, str]]:
    """(text_hash, id) pairs more than one row has: a text repeated in a source without ids,
    whose id is its content hash."""
    pairs, counts = np.unique(np.char.add(np.char.add(hashes, "\n"), ids), return_counts=True)
    return {tuple(pair.split("\n", 1)) for pair in pairs[counts > 1].tolist()}


def _chosen_rows(
    texts: ray.data.Dataset, plan: dict, shared: set[tuple[str, str]]
) -> ray.data.Dataset:
    """The rows `plan` names (text_hash -> (id, times)), each repeated `times` times. Rows that
    name the same pair (`_shared_rows`) are one text: kept once, through Ray Data's group-by,
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


def _training_plan(
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


def _validation(rows: ray.data.Dataset) -> Validation:
    """The held-out texts and their teacher vectors, gathered on the driver (a few hundred)."""
    rows = rows.take_all()
    texts = [r["text"] for r in rows]
    return texts, np.stack([r["embedding"] for r in rows]).astype(np.float32)


def streaming_training_set(
    cfg: LeafConfig, skipped: Counter | None = None
) -> tuple[TeacherSpace, ray.data.Dataset, int, Validation | None]:
    """Streaming mode: teacher actors embed the texts while the trainers consume them, every
    epoch; nothing is cached. The texts (not vectors) are gathered first, so reading and hashing
    are done before the trainers hold their CPUs; the teacher's actors share what the trainers
    leave (on GPUs: the GPUs they leave, fractions when fewer than actors; none: the CPUs)."""
    space, texts, _ = _space_and_texts(cfg, skipped)
    ids, hashes, sources = _row_keys(texts)
    held, wanted, counts = _training_plan(cfg, hashes, sources)
    id_of, shared = _first_ids(ids, hashes), _shared_rows(ids, hashes)
    validation = None
    if held.size:
        plan = {h: (id_of[h], 1) for h in held.tolist()}
        layout = cluster_stage_layout(cfg.teacher, held.size)
        calls = teacher_calls(_chosen_rows(texts, plan, shared), layout)
        validation = _validation(embed_texts(calls, cfg.teacher, layout))
    plan = {h: (id_of[h], c) for h, c in zip(wanted.tolist(), counts.tolist(), strict=True) if c}
    num_rows = int(counts.sum())
    chosen = _chosen_rows(texts, plan, shared)
    layout = cluster_stage_layout(cfg.teacher, num_rows, held_elsewhere=trainer_resources(cfg))
    calls = teacher_calls(chosen, layout).materialize()
    stream = embed_texts(calls, cfg.teacher, layout)
    return space, stream, num_rows, validation


def distill(cfg: LeafConfig) -> Location:
    """Run every stage; return the finished run folder."""
    storage, name = cfg.storage(), cfg.run_name()
    run = storage / name
    if run.exists() if storage.is_local else (run / CONFIG_YAML).exists():
        raise RunError(f"{run} already exists; choose another run.name")
    skipped = check_inputs(cfg)  # before anything is written or started
    # A local or NFS run builds beside its final folder and is renamed into place. An object
    # store has no rename: the run builds in a local folder and is uploaded, config.yaml last (a
    # folder without one is no run), and Ray Train writes its checkpoints there directly.
    if storage.is_local:
        work = Path(storage.path) / f".{name}.partial"
        checkpoints = Location.of(work)
    else:
        work = Path(tempfile.gettempdir()) / "leaf-ray" / f"{name}.partial"
        checkpoints = run
    work.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": name})})
    config_yaml = yaml.safe_dump(
        cfg.model_dump(mode="json", exclude={"source_file"}), sort_keys=False
    )
    trained_with = checkpoints / RAY_TRAIN / CONFIG_YAML
    _refuse_another_config(trained_with, config_yaml)
    Location.of(work / CONFIG_YAML).write(config_yaml)

    # 1. Teacher: actors embed every text the cache lacks; the vectors are read from the cache.
    #    Streaming mode: the actors embed while the student trains, and nothing is cached.
    if cfg.train.data_mode == "cached":
        vectors = embed(cfg, skipped)
        space = vectors.space
        training_set, training_rows, validation = vectors.training_set(cfg)
        note = {"cache": str(vectors.cache.root), "rows": len(vectors.hashes)}
        note |= {"distinct": vectors.unique, "embedded": vectors.embedded}
    else:
        space, training_set, training_rows, validation = streaming_training_set(cfg, skipped)
        note = {"cache": None, "streaming": True}
    note |= {"training_rows": training_rows, "skipped_rows": dict(skipped)}
    note |= {"validation_texts": len(validation[0]) if validation else 0}
    Location.of(work / TEACHER_CACHE_JSON).write(json.dumps(note))

    # 2. Student: layer-reduced (or pretrained) encoder + projection (fitted in closed form on a
    #    sample of the training set), trained on Ray Train. The workers read the untrained
    #    student where every node can: the run's storage.
    #    Only layer reduction needs the teacher here: on the CPU, and not kept, so the driver
    #    holds no GPU memory Ray does not know of while the workers train.
    reduces = cfg.student.init == "layer_reduction"
    teacher = load_teacher(cfg.teacher, "cpu") if reduces else None
    student = build_student(cfg.student, space, cfg.run.seed, teacher)
    del teacher
    if cfg.student.projection_init != "random":
        s = cfg.student
        fit_student_projection(
            student, training_set, s.projection_init, s.projection_fit_texts, cfg.eval.batch_size
        )
    student.save_pretrained(str(work / STUDENT_INIT))
    init = checkpoints / STUDENT_INIT
    if not storage.is_local:
        init.upload(work / STUDENT_INIT)
    trained_with.write(config_yaml)
    latest, best = train_student(
        cfg,
        training_set,
        training_rows,
        Checkpoint(init.path, init.fs),
        checkpoints,
        validation,
    )
    with latest.as_directory() as ckpt:  # the whole run's logs
        history = read_metrics(Path(ckpt) / METRICS_JSONL)
        validations = read_metrics(Path(ckpt) / VALIDATION_JSONL)
    write_metrics(history, work)
    write_metrics(validations, work, VALIDATION_JSONL)
    plot_loss(history, validations, work, cfg.run.name)
    with best.as_directory() as ckpt:  # the student: the best checkpoint by validation loss
        # Copied under a temporary name, so a student folder in the run is always whole (and
        # the logs above are already beside it).
        logs = (TRAIN_STATE, METRICS_JSONL, VALIDATION_JSONL)
        copying = work / f".{STUDENT}.copying"
        shutil.rmtree(copying, ignore_errors=True)
        shutil.copytree(ckpt, copying, ignore=shutil.ignore_patterns(*logs))
        shutil.rmtree(work / STUDENT, ignore_errors=True)  # a rerun after a failed evaluation
        copying.rename(work / STUDENT)

    # 3 + 4. Evaluation and report. A run in an object store has its student there first: eval
    #    tasks on nodes that cannot see the driver's disk fetch it (and student_init) from it.
    stored = None if storage.is_local else run
    if stored:
        (run / STUDENT).upload(work / STUDENT)
    _evaluate_into(work, work, cfg, work / STUDENT, name, stored)
    _publish(work, run, uploaded=(STUDENT_INIT, STUDENT))
    return run


def _refuse_another_config(trained_with: Location, config_yaml: str) -> None:
    """A rerun under the same run.name resumes the checkpoints Ray Train finds there. Their step
    and data position count by the config that wrote them, so resuming under another one would
    mix two schedules silently: refuse, naming what changed. Where Ray runs (`ray`) and how the
    finished student is evaluated (`eval`) may change."""
    if not trained_with.exists():
        return
    before = _dotted(yaml.safe_load(trained_with.read_text()))
    now = _dotted(yaml.safe_load(config_yaml))
    changed = sorted(
        key
        for key in before.keys() | now.keys()
        if before.get(key) != now.get(key) and not key.startswith(("ray.", "eval."))
    )
    if changed:
        raise RunError(
            f"{trained_with}: this run has checkpoints from another config ({', '.join(changed)} "
            "changed). Rerun it with that config to resume it, or choose another run.name."
        )


def _dotted(tree: dict, prefix: str = "") -> dict:
    """A nested mapping flattened to `a.b.c` keys (lists are compared whole)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _dotted(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _publish(work: Path, run: Location, uploaded: tuple[str, ...]) -> None:
    """Make the finished run visible at once: a rename, or an upload with config.yaml last.
    `uploaded`: folders of `work` already in an object store's `run` (for workers and tasks)."""
    if run.is_local:
        os.replace(work, run.path)
        return
    for folder in uploaded:
        shutil.rmtree(work / folder)
    config = (work / CONFIG_YAML).read_bytes()
    (work / CONFIG_YAML).unlink()
    run.upload(work)
    (run / CONFIG_YAML).write(config)
    shutil.rmtree(work)


def evaluate_run(
    run: Location | Path | str, overrides: list[str] = (), student: Path | None = None
) -> EvalOutcome:
    """Re-evaluate a finished run (the separate evaluation job), optionally with other eval
    settings, or another checkpoint as the student (reported in <run>/evals/<checkpoint>).
    A run in an object store is fetched to a local folder and its reports uploaded back."""
    run = run if isinstance(run, Location) else Location.of(run)
    if not (run / CONFIG_YAML).is_file():
        raise RunError(f"{run}: not a leaf-ray run folder (no {CONFIG_YAML})")
    if student is not None and not (student / "modules.json").is_file():
        raise RunError(f"{student}: not a sentence-transformers folder (no modules.json)")
    with tempfile.TemporaryDirectory(prefix="leaf-ray-eval-") as tmp:
        local = Path(run.path) if run.is_local else _fetch_run(run, Path(tmp) / run.name)
        cfg = load_config(local / CONFIG_YAML, overrides)
        connect_ray(cfg.ray)
        out = report_folder(local, student)
        label = f"{run.name}-{student.name}" if student else run.name
        out.mkdir(parents=True, exist_ok=True)
        stored = None if run.is_local else run
        outcome = _evaluate_into(out, local, cfg, student or local / STUDENT, label, stored)
        if not run.is_local:
            _push_reports(out, local, run)
        return outcome


def report_folder(run: RunFolder, student: Path | None) -> RunFolder:
    """Where an evaluation's reports go: the run folder, or <run>/evals/<checkpoint> when another
    checkpoint stands in for the student."""
    return run / "evals" / student.name if student else run


RUN_INPUTS = (CONFIG_YAML, STUDENT, STUDENT_INIT)  # what an evaluation reads from a run


def _fetch_run(run: Location, local: Path) -> Path:
    Location.of(local / CONFIG_YAML).write((run / CONFIG_YAML).read_bytes())
    for model in (STUDENT, STUDENT_INIT):
        (run / model).download(local / model)
    return local


def _push_reports(out: Path, local: Path, run: Location) -> None:
    for report in out.iterdir():
        if report.name in RUN_INPUTS:
            continue
        target = run / str(report.relative_to(local))
        if report.is_dir():
            target.upload(report)
        else:
            target.write(report.read_bytes())


def _evaluate_into(
    out: Path,
    run_dir: Path,
    cfg: LeafConfig,
    student: Path,
    label: str,
    stored: Location | None = None,
) -> EvalOutcome:
    """Evaluate `student` beside the run's teacher and untrained student; reports go to `out`.
    `stored`: the run in its object store, where other nodes fetch its models."""
    models = eval_models(cfg, run_dir, student, label, stored)
    outcome = evaluate(models, cfg.eval, cfg.eval_cache_dir(), label)
    write_eval(outcome, out)
    return outcome


def eval_models(
    cfg: LeafConfig, run_dir: Path, student: Path, label: str, stored: Location | None = None
) -> dict[str, Encoder]:
    """The student, the untrained student, the pretrained model it started from (init:
    pretrained) and, when it can embed, the teacher, each named as mteb will record it. The run's
    own models name their copy in `stored`, if given."""

    def copy(folder: Path) -> Location | None:
        return stored / folder.name if stored and folder.parent == run_dir else None

    init = run_dir / STUDENT_INIT
    # Students see raw text: the teacher's prompts are part of its input, not of the space.
    models = {
        STUDENT: Encoder(f"leaf-ray/{label}-student", str(student), stored=copy(student)),
        STUDENT_INIT: Encoder(f"leaf-ray/{label}-student_init", str(init), stored=copy(init)),
    }
    if cfg.student.init == "pretrained":  # "is my model better than before?"
        ref = ModelRef(model=cfg.student.model, revision=cfg.student.revision)
        models[PRETRAINED] = Encoder(_mteb_name(ref.model), resolve_model(ref), ref.revision)
    teacher_model = resolve_model(cfg.teacher)
    if cfg.teacher.backend == "http":  # through its endpoint, as in training
        name = cfg.teacher.model if "/" in cfg.teacher.model else f"api/{cfg.teacher.model}"
        prompts = teacher_prompts(cfg.teacher)
        models["teacher"] = Encoder(name, cfg.teacher.model, None, prompts, cfg.teacher)
    # Precomputed vectors are evaluated when their model is also on disk.
    elif cfg.teacher.backend == "sentence_transformers" or Path(teacher_model).is_dir():
        prompts = teacher_prompts(cfg.teacher, load_without_weights(cfg.teacher))
        name = _mteb_name(cfg.teacher.model)
        models["teacher"] = Encoder(name, teacher_model, cfg.teacher.revision, prompts)
    return models


def _mteb_name(model: str) -> str:
    """mteb names results by model: a hub name, or local/<folder> (its revision: its files)."""
    return f"local/{Path(model).name}" if Path(model).is_dir() else model
