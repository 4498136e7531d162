"""The LEAF recipe, stage by stage: teacher vectors -> student training -> evaluation -> report.

A run lives at `<run.storage>/<name>`: a local or NFS path, where it builds in `.<name>.partial`
and is renamed only when every stage has finished, or an object store (s3://, gs://), where it
is uploaded with config.yaml last. Either way a folder with a config.yaml is a complete run."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml
from ray.train import Checkpoint

from leaf_ray.cluster import connect_ray
from leaf_ray.config import LeafConfig, ModelRef, load_config
from leaf_ray.eval.models import EvalModel
from leaf_ray.eval.runner import EvalOutcome, evaluate
from leaf_ray.inputs import Inputs, check_inputs
from leaf_ray.models import resolve_model
from leaf_ray.projection import fit_student_projection
from leaf_ray.report.eval_report import write_eval
from leaf_ray.report.plots import plot_loss
from leaf_ray.run import (
    CONFIG_YAML,
    HISTORY,
    METRICS_JSONL,
    RAY_TRAIN,
    STUDENT,
    STUDENT_INIT,
    TEACHER_CACHE_JSON,
    TRAIN_STATE,
    VALIDATION_JSONL,
    RunError,
    claim,
    fetch_run,
    publish,
    push_reports,
    refuse_another_config,
    report_folder,
    unfinished_run,
    work_folder,
    write_metrics,
)
from leaf_ray.storage import Location
from leaf_ray.student import build_student
from leaf_ray.teacher.backends import teacher_prompts
from leaf_ray.teacher.local import load_teacher, load_without_weights
from leaf_ray.teacher.space import TeacherSpace
from leaf_ray.teacher.stage import embed
from leaf_ray.train.dataset import (
    TrainingSet,
    Validation,
    cached_training_set,
    streaming_training_set,
)
from leaf_ray.train.state import History
from leaf_ray.train.trainer import train_student

PRETRAINED = "pretrained"  # the evaluation's name for the student model as it was given


def distill(cfg: LeafConfig) -> Location:
    """Run every stage; return the finished run folder."""
    storage = cfg.storage()
    # Without a run.name, rerunning the same command resumes what an earlier attempt left.
    name = cfg.run.name or unfinished_run(storage, cfg.run_stem(), kept_config(cfg))
    if name and not cfg.run.name:
        print(f"leaf-ray: resuming the unfinished run {storage / name}")
    name = name or cfg.run_name()
    run = storage / name
    if run.exists() if storage.is_local else (run / CONFIG_YAML).exists():
        raise RunError(f"{run} already exists; choose another run.name")
    inputs = check_inputs(cfg)  # before anything is written
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": name})})
    work, checkpoints, config_yaml = _start(cfg, run)
    connect_ray(cfg.ray)
    # A student already in `work` (it appears whole, `_keep_student`) was trained by an earlier
    # attempt that failed in its evaluation: straight to the evaluation, no worker started again.
    if not (work / STUDENT).is_dir():
        _teacher_and_student(cfg, inputs, work, checkpoints, config_yaml)

    # 3 + 4. Evaluation and report. A run in an object store has its student there first: eval
    #    tasks on nodes that cannot see the driver's disk fetch it (and student_init) from it.
    stored = None if storage.is_local else run
    if stored:
        (run / STUDENT).upload(work / STUDENT)
    _evaluate_into(work, work, cfg, work / STUDENT, name, stored)
    publish(work, run, uploaded=(STUDENT_INIT, STUDENT))
    return run


def _teacher_and_student(
    cfg: LeafConfig, inputs: Inputs, work: Path, checkpoints: Location, config_yaml: str
) -> None:
    """The teacher stage and the student's training, into `work`."""
    # 1. Teacher: actors embed every text the cache lacks; the vectors are read from the cache.
    #    Streaming mode: the actors embed while the student trains, and nothing is cached.
    space, data = _teacher_stage(cfg, inputs, work)

    # 2. Student: layer-reduced (or pretrained) encoder + projection (fitted in closed form on a
    #    sample of the training texts), trained on Ray Train. The workers read the untrained
    #    student where every node can: the run's storage.
    init = _student_init(cfg, space, data.fit, work, checkpoints)
    (checkpoints / RAY_TRAIN / CONFIG_YAML).write(config_yaml)
    _, best = train_student(cfg, data.rows, data.num_rows, init, checkpoints, data.validation)
    _keep_student(History(checkpoints / RAY_TRAIN / HISTORY), best, work, cfg.run.name)


def _start(cfg: LeafConfig, run: Location) -> tuple[Path, Location, str]:
    """The folder the run builds in, where its checkpoints go, and its config as written.

    A local or NFS run builds beside its final folder and is renamed into place. An object store
    has no rename: the run builds in a local folder and is uploaded, config.yaml last (a folder
    without one is no run), and Ray Train writes its checkpoints there directly."""
    work = work_folder(run)
    checkpoints = Location.of(work) if run.is_local else run
    work.mkdir(parents=True, exist_ok=True)
    written = kept_config(cfg)
    refuse_another_config(checkpoints / RAY_TRAIN / CONFIG_YAML, written)
    if (work / STUDENT).is_dir():  # trained under work's config, whatever the store still holds
        refuse_another_config(Location.of(work / CONFIG_YAML), written)
    Location.of(work / CONFIG_YAML).write(written)
    claim(work)
    return work, checkpoints, written


def kept_config(cfg: LeafConfig) -> str:
    """The resolved config as a run keeps it (config.yaml)."""
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude={"source_file"}), sort_keys=False)


def _teacher_stage(cfg: LeafConfig, inputs: Inputs, work: Path) -> tuple[TeacherSpace, TrainingSet]:
    """The teacher's space and what the student trains on; the stage's note (cache, rows,
    skipped) goes into the run folder."""
    if cfg.train.data_mode == "cached":
        vectors = embed(cfg, inputs)
        space, data = vectors.space, cached_training_set(vectors)
        note = {"cache": str(vectors.cache.root), "rows": vectors.plan.rows}
        note |= {"distinct": vectors.plan.distinct, "embedded": vectors.embedded}
    else:
        space, data = streaming_training_set(cfg, inputs)
        note = {"cache": None, "streaming": True}
    note |= {"training_rows": data.num_rows, "skipped_rows": dict(inputs.skipped)}
    note |= {"validation_texts": len(data.validation[0]) if data.validation else 0}
    Location.of(work / TEACHER_CACHE_JSON).write(json.dumps(note))
    return space, data


def _student_init(
    cfg: LeafConfig, space: TeacherSpace, fit: Validation, work: Path, checkpoints: Location
) -> Checkpoint:
    """The student as training starts, its projection fitted, in the run folder and where the
    workers read it. Only layer reduction needs the teacher here: on the CPU, and not kept, so
    the driver holds no GPU memory Ray does not know of while the workers train."""
    reduces = cfg.student.init == "layer_reduction"
    teacher = load_teacher(cfg.teacher, "cpu") if reduces else None
    student = build_student(cfg.student, space, cfg.run.seed, teacher)
    del teacher
    if cfg.student.projection_init != "random":
        texts, targets = fit
        fit_student_projection(
            student, texts, targets, cfg.student.projection_init, cfg.eval.batch_size
        )
    student.save_pretrained(str(work / STUDENT_INIT))
    init = checkpoints / STUDENT_INIT
    if not init.is_local:
        init.upload(work / STUDENT_INIT)
    return Checkpoint(init.path, init.fs)


def _keep_student(history: History, best: Checkpoint, work: Path, title: str) -> None:
    """The run's logs and its student (the best checkpoint by validation loss) into the run
    folder; the student folder appears whole, after the logs, copied under a temporary name."""
    rows, validations = history.read(METRICS_JSONL), history.read(VALIDATION_JSONL)
    write_metrics(rows, work)
    write_metrics(validations, work, VALIDATION_JSONL)
    plot_loss(rows, validations, work, title)
    with best.as_directory() as ckpt:
        copying = work / f".{STUDENT}.copying"
        shutil.rmtree(copying, ignore_errors=True)
        shutil.copytree(ckpt, copying, ignore=shutil.ignore_patterns(TRAIN_STATE))
        copying.rename(work / STUDENT)


def evaluate_run(
    run: Location | Path | str, overrides: list[str] = (), student: Path | None = None
) -> EvalOutcome:
    """Re-evaluate a finished run (the separate evaluation job), optionally with other eval
    settings, or another checkpoint as the student (reported in <run>/evals/<checkpoint>).
    A run in an object store is fetched to a local folder and its reports uploaded back."""
    run = run if isinstance(run, Location) else Location.of(run)
    if not (run / CONFIG_YAML).is_file():
        raise RunError(f"{run}: not a leaf-ray run folder (no {CONFIG_YAML})")
    if not (run / STUDENT / "modules.json").is_file():  # a run still building leaves none
        raise RunError(f"{run}: not a finished run (no {STUDENT}/); rerun its distill to finish it")
    if student is not None and not (student / "modules.json").is_file():
        raise RunError(f"{student}: not a sentence-transformers folder (no modules.json)")
    with tempfile.TemporaryDirectory(prefix="leaf-ray-eval-") as tmp:
        local = Path(run.path) if run.is_local else fetch_run(run, Path(tmp) / run.name)
        cfg = load_config(local / CONFIG_YAML, overrides)
        connect_ray(cfg.ray)
        out = report_folder(local, student)
        label = f"{run.name}-{student.name}" if student else run.name
        out.mkdir(parents=True, exist_ok=True)
        stored = None if run.is_local else run
        outcome = _evaluate_into(out, local, cfg, student or local / STUDENT, label, stored)
        if not run.is_local:
            push_reports(out, local, run)
        return outcome


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
) -> dict[str, EvalModel]:
    """The student, the untrained student, the pretrained model it started from (init:
    pretrained) and, when it can embed, the teacher, each named as mteb will record it. The run's
    own models name their copy in `stored`, if given."""

    def copy(folder: Path) -> Location | None:
        return stored / folder.name if stored and folder.parent == run_dir else None

    init = run_dir / STUDENT_INIT
    # Students see raw text: the teacher's prompts are part of its input, not of the space.
    models = {
        STUDENT: EvalModel(f"leaf-ray/{label}-student", str(student), stored=copy(student)),
        STUDENT_INIT: EvalModel(f"leaf-ray/{label}-student_init", str(init), stored=copy(init)),
    }
    if cfg.student.init == "pretrained":  # "is my model better than before?"
        ref = ModelRef(model=cfg.student.model, revision=cfg.student.revision)
        models[PRETRAINED] = EvalModel(_mteb_name(ref.model), resolve_model(ref), ref.revision)
    teacher_model = resolve_model(cfg.teacher)
    if cfg.teacher.backend == "http":  # through its endpoint, as in training
        name = cfg.teacher.model if "/" in cfg.teacher.model else f"api/{cfg.teacher.model}"
        prompts = teacher_prompts(cfg.teacher)
        models["teacher"] = EvalModel(name, cfg.teacher.model, None, prompts, cfg.teacher)
    # Precomputed vectors are evaluated when their model is also on disk.
    elif cfg.teacher.backend == "sentence_transformers" or Path(teacher_model).is_dir():
        prompts = teacher_prompts(cfg.teacher, load_without_weights(cfg.teacher))
        name = _mteb_name(cfg.teacher.model)
        models["teacher"] = EvalModel(name, teacher_model, cfg.teacher.revision, prompts)
    return models


def _mteb_name(model: str) -> str:
    """mteb names results by model: a hub name, or local/<folder> (its revision: its files)."""
    return f"local/{Path(model).name}" if Path(model).is_dir() else model
