"""The run folder: its file names (one source for every stage that writes or reads them), its
metrics files (JSON lines), and its life: built under a temporary name, then renamed (local, NFS)
or uploaded with config.yaml last (object stores); a rerun's config checked against the
checkpoints' own; fetched and pushed back for a re-evaluation.

    <run.storage>/<name>/config.yaml, student/, student_init/, teacher_cache.json,
        metrics.jsonl, validation.jsonl, loss_curve.png, eval.md, eval.json, eval_*.png,
        mteb/, ray_train/ (checkpoints, each with train_state.pt)"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import TypeVar

import yaml

from leaf_ray.storage import Location

CONFIG_YAML = "config.yaml"  # last in: a folder with one is a finished run
STUDENT, STUDENT_INIT = "student", "student_init"
TEACHER_CACHE_JSON = "teacher_cache.json"  # the teacher stage's note: cache, rows, rows skipped
METRICS_JSONL, VALIDATION_JSONL = "metrics.jsonl", "validation.jsonl"
LOSS_PNG = "loss_curve.png"
EVAL_JSON, EVAL_MD, MTEB_DIR = "eval.json", "eval.md", "mteb"
COMPRESSION_PNG, QUANTIZATION_PNG = "eval_compression.png", "eval_quantization.png"
RAY_TRAIN = "ray_train"  # Ray Train's run name: its folder in the run's storage
HISTORY = "history"  # in RAY_TRAIN: the training history, a file per checkpoint
TRAIN_STATE = "train_state.pt"  # in each checkpoint: optimiser, schedule, position
SETTINGS = ("ray.", "eval.")  # config sections that may change between attempts at one run

RunPath = TypeVar("RunPath", Path, Location)  # a run on local disk, or wherever it is stored


class RunError(RuntimeError):
    """A run that cannot start or be evaluated as asked."""


def refuse_another_config(trained_with: Location, config_yaml: str) -> None:
    """A rerun under the same run.name resumes what an earlier attempt left: the checkpoints Ray
    Train finds there, or the student it trained (when its evaluation failed). Their steps and
    data position count by the config they were written under, so going on under another one
    would mix two runs silently: refuse, naming what changed. Where Ray runs (`ray`) and how the
    finished student is evaluated (`eval`) may change."""
    if not trained_with.exists():
        return
    changed = _changed(trained_with.read_text(), config_yaml)
    if changed:
        raise RunError(
            f"{trained_with}: this run was started under another config ({', '.join(changed)} "
            "changed). Rerun it with that config to resume it, or choose another run.name."
        )


def _changed(before_yaml: str, now_yaml: str) -> list[str]:
    """The keys (`a.b.c`) whose values differ between two configs of one run, beside those that
    may (its `ray` and `eval` sections)."""
    before, now = (_dotted(yaml.safe_load(text)) for text in (before_yaml, now_yaml))
    return sorted(
        key
        for key in before.keys() | now.keys()
        if before.get(key) != now.get(key) and not key.startswith(SETTINGS)
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


def work_folder(run: Location) -> Path:
    """Where `run` builds: beside it under a hidden name on a local or NFS path (renamed when
    done); for an object store, a local temporary folder named by the run's whole URI, endpoint
    included, so that runs of one name in two stores (or one bucket name on two servers) never
    share one."""
    if run.is_local:
        return Path(run.path).parent / f".{run.name}.partial"
    key = hashlib.sha256(f"{run}{run.endpoint}".encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "leaf-ray" / f"{run.name}-{key}.partial"


DRIVER = ".driver"  # in a work folder: "<host> <pid>" of the driver building it


def claim(work: Path) -> None:
    """Mark `work` as being built by this process, so a rerun elsewhere does not take it."""
    (work / DRIVER).write_text(f"{socket.gethostname()} {os.getpid()}")


def unfinished_run(storage: Location, stem: str, config_yaml: str) -> str | None:
    """The newest run named `<stem>-<timestamp>` that an earlier attempt left unfinished in
    `storage` under this config (its `ray` and `eval` aside), for a rerun without a run.name to
    resume it; None when there is none. Found by its work folder: beside it (local, NFS), or
    this machine's (object stores). One whose driver still runs on this machine is not taken."""
    pattern = re.compile(rf"\.?({re.escape(stem)}-\d{{8}}-\d{{6}})(-[0-9a-f]{{12}})?\.partial")
    folder = Path(storage.path) if storage.is_local else work_folder(storage / "x").parent
    found = []
    for work in folder.glob(f"*{stem}-*.partial") if folder.is_dir() else ():
        match = pattern.fullmatch(work.name)
        if not match or work_folder(storage / match[1]) != work or _driving(work):
            continue
        kept = work / CONFIG_YAML  # named by its first attempt, where this config has none
        if kept.is_file() and set(_changed(kept.read_text(), config_yaml)) <= {"run.name"}:
            found.append(match[1])
    return max(found, default=None)  # names sort by their timestamps


def _driving(work: Path) -> bool:
    """Whether a process on this machine is building `work` now."""
    driver = work / DRIVER
    host, _, pid = driver.read_text().partition(" ") if driver.is_file() else ("", "", "")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def publish(work: Path, run: Location, uploaded: tuple[str, ...]) -> None:
    """Make the finished run visible at once: a rename, or an upload with config.yaml last.
    `uploaded`: folders of `work` already in an object store's `run` (for workers and tasks)."""
    (work / DRIVER).unlink(missing_ok=True)
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


def report_folder(run: RunPath, student: Path | None) -> RunPath:
    """Where an evaluation's reports go: the run folder, or <run>/evals/<checkpoint> when another
    checkpoint stands in for the student."""
    return run / "evals" / student.name if student else run


RUN_INPUTS = (CONFIG_YAML, STUDENT, STUDENT_INIT)  # what an evaluation reads from a run


def fetch_run(run: Location, local: Path) -> Path:
    Location.of(local / CONFIG_YAML).write((run / CONFIG_YAML).read_bytes())
    for model in (STUDENT, STUDENT_INIT):
        (run / model).download(local / model)
    return local


def push_reports(out: Path, local: Path, run: Location) -> None:
    for report in out.iterdir():
        if report.name in RUN_INPUTS:
            continue
        target = run / str(report.relative_to(local))
        if report.is_dir():
            target.upload(report)
        else:
            target.write(report.read_bytes())


def write_metrics(rows: list[dict], run_dir: Path, name: str = METRICS_JSONL) -> None:
    Location.of(run_dir / name).write("".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(path: Path | Location) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
