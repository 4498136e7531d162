"""The LEAF recipe, stage by stage: teacher vectors -> student training -> evaluation -> report.

A run builds in `<output_dir>/.<name>.partial` and is renamed to `<output_dir>/<name>` only when
every stage has finished, so a folder without the dot is always a complete run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import ray
import ray.data
import yaml

from leaf_ray.config import LeafConfig, RayConfig, load_config
from leaf_ray.data import read_texts
from leaf_ray.eval import Encoder, evaluate
from leaf_ray.models import resolve_model
from leaf_ray.report import (
    METRICS_JSONL,
    atomic_write,
    plot_loss,
    read_metrics,
    write_eval,
    write_metrics,
)
from leaf_ray.student import build_student
from leaf_ray.teacher import embed_texts, load_teacher, teacher_prompts
from leaf_ray.train import TRAIN_STATE, train_student

CONFIG_YAML, TEACHER_VECTORS, STUDENT, STUDENT_INIT = (
    "config.yaml",
    "teacher_vectors",
    "student",
    "student_init",
)


class RunError(RuntimeError):
    """A run that cannot start or be evaluated as asked."""


def connect_ray(cfg: RayConfig) -> None:
    """Join the cluster at `address` or RAY_ADDRESS (`ray job submit` sets it), else start Ray."""
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, num_cpus=None if address else cfg.num_cpus)


def distill(cfg: LeafConfig) -> Path:
    """Run every stage; return the finished run folder."""
    output_dir = Path(cfg.run.output_dir).resolve()
    name = cfg.run_name()
    run_dir, work = output_dir / name, output_dir / f".{name}.partial"
    if run_dir.exists():
        raise RunError(f"{run_dir} already exists; choose another run.name")
    work.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": name})})
    dump = cfg.model_dump(mode="json", exclude={"source_file"})
    atomic_write(work / CONFIG_YAML, yaml.safe_dump(dump, sort_keys=False))
    connect_ray(cfg.ray)

    # 1. Teacher: actors embed every text; the vectors land in Parquet, freeing the actors.
    teacher = load_teacher(cfg.teacher)
    vectors_dir = work / TEACHER_VECTORS
    if not vectors_dir.exists():
        tmp = work / f".{TEACHER_VECTORS}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        embed_texts(read_texts(cfg.data), cfg.teacher).write_parquet(str(tmp))
        os.replace(tmp, vectors_dir)
    embedded = ray.data.read_parquet(str(vectors_dir))

    # 2. Student: layer-reduced (or pretrained) encoder + projection, trained on Ray Train.
    build_student(cfg.student, teacher, cfg.run.seed).save_pretrained(str(work / STUDENT_INIT))
    checkpoint = train_student(cfg, embedded, embedded.count(), str(work / STUDENT_INIT), work)
    with checkpoint.as_directory() as ckpt:
        shutil.copytree(
            ckpt, work / STUDENT, ignore=shutil.ignore_patterns(TRAIN_STATE, METRICS_JSONL)
        )
        history = read_metrics(Path(ckpt) / METRICS_JSONL)
    write_metrics(history, work)

    # 3 + 4. Evaluation and report.
    _evaluate_into(work, cfg, history, teacher_prompts(cfg.teacher, teacher))
    os.replace(work, run_dir)
    return run_dir


def evaluate_run(run_dir: Path, overrides: list[str] = ()) -> list[dict]:
    """Re-evaluate a finished run (the separate evaluation job), optionally with other eval sets."""
    config_file = run_dir / CONFIG_YAML
    if not config_file.is_file():
        raise RunError(f"{run_dir}: not a leaf-ray run folder (no {CONFIG_YAML})")
    cfg = load_config(config_file, overrides)
    connect_ray(cfg.ray)
    prompts = teacher_prompts(cfg.teacher, load_teacher(cfg.teacher))
    return _evaluate_into(run_dir, cfg, read_metrics(run_dir / METRICS_JSONL), prompts)


def _evaluate_into(
    run_dir: Path, cfg: LeafConfig, history: list[dict], prompts: dict[str, str | None]
) -> list[dict]:
    # Students see raw text: the teacher's prompts are part of its input, not of the space.
    models = {
        "teacher": Encoder(resolve_model(cfg.teacher), cfg.teacher.revision, prompts),
        STUDENT: Encoder(str(run_dir / STUDENT)),
        STUDENT_INIT: Encoder(str(run_dir / STUDENT_INIT)),
    }
    rows = evaluate(models, cfg.eval)
    write_eval(rows, run_dir)
    plot_loss(history, run_dir, cfg.run.name)
    return rows
