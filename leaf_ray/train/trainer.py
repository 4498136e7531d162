"""Ray Train's TorchTrainer over `train_loop`: workers, resources, resume, and the result."""

from __future__ import annotations

import json
import os
import threading
import uuid

import ray
import ray.data
import ray.train
import ray.train.torch
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from leaf_ray.cluster import node_amounts, torch_threads
from leaf_ray.config import LeafConfig
from leaf_ray.data.sources import SHOWN, locate_texts
from leaf_ray.progress import on_terminal
from leaf_ray.run import HISTORY, RAY_TRAIN, RunError
from leaf_ray.storage import Location
from leaf_ray.train.dataset import Validation, ordered_ingest
from leaf_ray.train.loop import train_loop
from leaf_ray.train.resources import gpus_per_trainer

# glibc's defaults cost CPU training a fifth of its speed at batch 256. Each of the step's large
# buffers (hundreds of MB) is a fresh mmap, zero-filled page by page every step (3M page faults,
# 5 s of system time an epoch on the 2-core test machine), and Ray Train's loop thread gets an
# arena of its own, which pays more again. One arena (the heap) and a mmap threshold above any
# buffer keep them in the heap, reused without faults once it has grown: 0 faults an epoch from
# the third, at the cost of holding the heap's high-water mark (docs/benchmarks.md, Training
# throughput).
# On GPU, CUDA's allocator holds them.
CPU_WORKER_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(4 << 30)}


class TrainingDiverged(RuntimeError):
    """Training stopped on a non-finite step; the message says which."""


def cpu_worker_env() -> dict[str, str]:
    """CPU_WORKER_ENV under the job's own values: a user who sets these (say, to give the heap's
    memory back at the cost of speed) keeps them."""
    return {name: os.environ.get(name, value) for name, value in CPU_WORKER_ENV.items()}


def train_student(
    cfg: LeafConfig,
    embedded: ray.data.Dataset,
    num_rows: int,
    init: Checkpoint,
    storage: Location,
    validation: Validation | None = None,
) -> tuple[Checkpoint, Checkpoint]:
    """Fit the student on rows with `text` and `embedding` columns (others ride along). Returns
    the latest checkpoint and the best by validation loss (the latest when there is no
    validation); the run's history is in `History(storage / RAY_TRAIN / HISTORY)`."""
    if num_rows < cfg.train.num_workers:  # a worker without a row would train nothing
        raise RunError(
            f"{num_rows} training text(s) for train.num_workers={cfg.train.num_workers}: each "
            "worker needs at least one; add texts or lower train.num_workers"
        )
    resources = ray.cluster_resources()
    gpus = gpus_per_trainer(cfg, resources.get("GPU", 0))
    # Workers reserve less CPU than they compute with, so Ray Data can always feed them.
    workers = cfg.train.num_workers
    threads = cfg.train.torch_threads or torch_threads(
        resources["CPU"], node_amounts("CPU"), workers
    )
    # Where a worker that stops on a non-finite step says so: Ray Train's result keeps only
    # metrics reported with a checkpoint, and an exception would be retried into the same step.
    diverged = storage / RAY_TRAIN / f"diverged-{uuid.uuid4().hex}.txt"
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": cfg,
            "init": init,
            "num_rows": num_rows,
            "torch_threads": threads,
            "validation": validation,
            "diverged": diverged,
            "history": storage / RAY_TRAIN / HISTORY,
            "terminal": on_terminal(),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker}
            | ({"GPU": gpus} if gpus else {}),
            placement_strategy=cfg.train.placement_strategy,
        ),
        run_config=RunConfig(
            name=RAY_TRAIN,
            storage_path=storage.path,
            storage_filesystem=storage.fs,
            # The best `keep_checkpoints` by validation loss; Ray Train also keeps the latest.
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute="val_loss" if validation else None,
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            worker_runtime_env={"env_vars": cpu_worker_env()} if gpus == 0 else None,
        ),
        # No select_columns here: on a materialized set it would be a task again every epoch.
        datasets={"train": embedded},
        dataset_config=DataConfig(execution_options=ordered_ingest()),
    )
    result = fit_off_the_main_thread(trainer)
    if diverged.exists():
        raise TrainingDiverged(_diverged_message(json.loads(diverged.read_text()), cfg))
    if not validation:
        return result.checkpoint, result.checkpoint
    best = min(result.best_checkpoints, key=lambda kept: kept[1]["val_loss"])[0]
    return result.checkpoint, best


def fit_off_the_main_thread(trainer: TorchTrainer) -> ray.train.Result:
    """`trainer.fit()`, called from another thread. In the main thread Ray Train installs a
    SIGINT handler that turns Ctrl-C into an abort of its own (the driver then fails on a dead
    actor) and leaves it installed after fit returns, swallowing a Ctrl-C in the evaluation.
    Elsewhere it installs none: Ctrl-C reaches the CLI as KeyboardInterrupt in every stage, and
    the checkpoints already written resume the run."""
    outcome: dict[str, object] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # handed to the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    thread.join()  # a lock wait: Ctrl-C interrupts it
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _diverged_message(where: dict, cfg: LeafConfig) -> str:
    """The step that diverged, and where its first texts are in the sources (read again on the
    driver: only a run that diverges pays for it)."""
    texts = locate_texts(cfg.data, where["text_hashes"][:SHOWN])
    named = f"; its texts include {', '.join(texts)}" if texts else ""
    return (
        f"training stopped: the loss or its gradient is not finite at step {where['step']} "
        f"(epoch {where['epoch']}){named}; no student was published. Try a lower train.lr (or "
        "train.max_grad_norm) under another run.name."
    )
