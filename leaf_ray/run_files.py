"""A run folder's file names, one source for every stage that writes or reads them, and its
metrics files (JSON lines).

    <run.storage>/<name>/config.yaml, student/, student_init/, teacher_cache.json,
        metrics.jsonl, validation.jsonl, loss_curve.png, eval.md, eval.json, eval_*.png,
        mteb/, ray_train/ (checkpoints, each with train_state.pt)
"""

from __future__ import annotations

import json
from pathlib import Path

from leaf_ray.storage import Location

CONFIG_YAML = "config.yaml"  # last in: a folder with one is a finished run
STUDENT, STUDENT_INIT = "student", "student_init"
TEACHER_CACHE_JSON = "teacher_cache.json"  # the teacher stage's note: cache, rows, rows skipped
METRICS_JSONL, VALIDATION_JSONL = "metrics.jsonl", "validation.jsonl"
LOSS_PNG = "loss_curve.png"
EVAL_JSON, EVAL_MD, MTEB_DIR = "eval.json", "eval.md", "mteb"
COMPRESSION_PNG, QUANTIZATION_PNG = "eval_compression.png", "eval_quantization.png"
RAY_TRAIN = "ray_train"  # Ray Train's run name: its folder in the run's storage
TRAIN_STATE = "train_state.pt"  # in each checkpoint: optimiser, schedule, position, history


def write_metrics(rows: list[dict], run_dir: Path, name: str = METRICS_JSONL) -> None:
    Location.of(run_dir / name).write("".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(path: Path | Location) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
