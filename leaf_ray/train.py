"""Student stage: Ray Train DDP workers read teacher vectors from their shard and align to them.

`train_loop` reads top to bottom like a plain PyTorch loop; Ray Train supplies the process group
(gloo on CPU, NCCL on GPU), the data shard, and checkpoint storage.
"""

from __future__ import annotations

import bisect
import itertools
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.experimental import tqdm_ray
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import batch_to_device

from leaf_ray.cluster import node_amounts
from leaf_ray.config import LeafConfig, TrainConfig
from leaf_ray.progress import LogLines, on_terminal
from leaf_ray.run_files import RAY_TRAIN, TRAIN_STATE, VALIDATION_JSONL, write_metrics
from leaf_ray.storage import Location
from leaf_ray.student import embed, freeze_unused, leaf_loss, param_groups

# Texts per length-sorting window, in batches: batches then carry little padding.
BUCKET_BATCHES = 16
# A generous size of one text in Ray's object store, for deciding whether a training set fits.
TEXT_BYTES = 2048
Validation = tuple[list[str], np.ndarray]  # held-out texts and their teacher vectors

# glibc's defaults cost CPU training a fifth of its speed at batch 256. Each of the step's large
# buffers (hundreds of MB) is a fresh mmap, zero-filled page by page every step (3M page faults,
# 5 s of system time an epoch on the 2-core test machine), and Ray Train's loop thread gets an
# arena of its own, which pays more again. One arena (the heap) and a mmap threshold above any
# buffer keep them in the heap, reused without faults once it has grown: 0 faults an epoch from
# the third, at the cost of holding the heap's high-water mark (README, Training throughput).
# On GPU, CUDA's allocator holds them.
CPU_WORKER_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(4 << 30)}


class NonFiniteGradient(ArithmeticError):
    """A step's loss or gradient is NaN or infinite."""


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
    the latest checkpoint (its history is the whole run's) and the best by validation loss (the
    latest when there is no validation)."""
    resources = ray.cluster_resources()
    gpus = gpus_per_trainer(cfg, resources.get("GPU", 0))
    # Workers reserve less CPU than they compute with, so Ray Data can always feed them.
    largest = max(node_amounts("CPU"), default=0)
    per_worker = min(round(resources["CPU"] / cfg.train.num_workers), int(largest))  # one node's
    threads = cfg.train.torch_threads or max(1, per_worker)
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
        raise TrainingDiverged(
            f"training stopped: the loss or its gradient is not finite at "
            f"{diverged.read_text()}; no student was published. Try a lower train.lr (or "
            "train.max_grad_norm) under another run.name."
        )
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


def ordered_ingest() -> ray.data.ExecutionOptions:
    """Ray Train's ingest options, with blocks kept in order: each worker's shard then comes in
    the same order every pass (the split deals blocks to the worker with fewest rows), so a
    resumed epoch skips exactly the batches already trained on."""
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def held_for_epochs(rows: ray.data.Dataset, num_rows: int, dim: int) -> ray.data.Dataset:
    """Cached vectors read once into Ray's object store when they fit in a quarter of it, in
    the cache's order, so that a rerun of the command sees the same blocks.

    Ray Data runs a dataset's plan again every epoch: re-reading the cache's Parquet shards
    delayed each epoch's first batch by 4.5-7 s on the 2-core test machine, against 0.6 s from
    the object store. Larger sets stream from the cache every epoch.
    """
    size = num_rows * (dim * 4 + TEXT_BYTES)
    if size > ray.cluster_resources().get("object_store_memory", 0) / 4:
        return rows
    rows.context.execution_options.preserve_order = True
    return rows.materialize()


def trainer_resources(cfg: LeafConfig) -> dict[str, float]:
    """What the Ray Train workers hold, all of them together."""
    gpus = gpus_per_trainer(cfg, ray.cluster_resources().get("GPU", 0))
    workers = cfg.train.num_workers
    return {"CPU": workers * cfg.train.cpus_per_worker, "GPU": workers * gpus}


def gpus_per_trainer(cfg: LeafConfig, cluster_gpus: float) -> float:
    """A GPU each when the cluster has GPUs (or use_gpu). Streaming with a local teacher on as
    many GPUs as trainers (one GPU, say), half of each: the teacher's actors take the other
    halves and the two stages take turns on every GPU (`leaf-ray plan` models the one-GPU
    case), rather than the teacher falling back to the CPUs. One trainer per GPU still: NCCL
    takes no two."""
    tcfg = cfg.train
    use_gpu = tcfg.use_gpu if tcfg.use_gpu is not None else cluster_gpus > 0
    if not use_gpu:
        return 0.0
    sharing = (
        tcfg.data_mode == "streaming"
        and cfg.teacher.backend == "sentence_transformers"
        and tcfg.num_workers == cluster_gpus
    )
    return 0.5 if sharing else 1.0


def train_loop(config: dict) -> None:
    cfg: LeafConfig = config["cfg"]
    tcfg = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["torch_threads"])  # Ray sets OMP_NUM_THREADS=1
    device = ray.train.torch.get_device()

    checkpoint = ray.train.get_checkpoint()  # set when resuming after a failure or a rerun
    # Checkpoints, the untrained student too, are read through their filesystem (local, NFS or
    # an object store): a worker on another node fetches its own copy.
    with (checkpoint or config["init"]).as_directory() as model_dir:
        student = SentenceTransformer(model_dir, device=str(device))
        state = torch.load(Path(model_dir) / TRAIN_STATE, weights_only=True) if checkpoint else None
    student.max_seq_length = cfg.student.max_seq_length
    freeze_unused(student)
    model = ray.train.torch.prepare_model(student)  # DDP when world > 1
    groups = param_groups(student, tcfg.lr, tcfg.projection_lr)
    encoder_params, head_params = (group["params"] for group in groups)
    trainable = encoder_params + head_params
    optimizer = torch.optim.AdamW(groups, weight_decay=tcfg.weight_decay)
    accumulation = tcfg.grad_accumulation
    micro_batch = tcfg.batch_size // world // accumulation
    micro_per_epoch = batches_per_epoch(config["num_rows"] // world, micro_batch)
    steps_per_epoch = -(-micro_per_epoch // accumulation)
    total_steps = steps_per_epoch * tcfg.epochs
    scheduler = leaf_schedule(optimizer, total_steps, tcfg)
    head_steps = head_only_steps(total_steps, tcfg)
    step, start_epoch, done, resumes, history, validations = 0, 0, 0, 0, [], []
    if state:  # continue the schedule and the data where the checkpoint left them
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, start_epoch, done = state["step"], state["epoch"], state["micro_batches_done"]
        history, validations = state["history"], state["validations"]
        resumes = state["resumes"] + 1
        if done == micro_per_epoch:
            start_epoch, done = start_epoch + 1, 0
    elif rank == 0 and config["validation"]:  # where held-out alignment starts: step 0
        validations.append(
            {"step": 0, "epoch": 0} | _validate(student, config["validation"], tcfg, device)
        )

    def save(epoch: int, done: int) -> None:
        position = {"step": step, "epoch": epoch, "micro_batches_done": done, "resumes": resumes}
        metrics = _validate(student, config["validation"], tcfg, device) if rank == 0 else {}
        if metrics:
            validations.append({"step": step, "epoch": epoch} | metrics)
        _report_checkpoint(student, optimizer, scheduler, position, history, validations, rank)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = None
    if rank == 0:  # the driver draws a worker's tqdm_ray bar; off a terminal, lines instead
        bars = config["terminal"]
        bar = tqdm_ray.tqdm(desc="train student", total=total_steps) if bars else None
        bar = bar or LogLines(total_steps, "train student")
        bar.update(step)
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, tcfg.epochs):
        model.train()
        tic, seen = time.perf_counter(), 0  # throughput over each logging window
        micro_batches = _length_bucketed(shard, student, micro_batch, cfg.run.seed + epoch)
        # Resuming mid-epoch: skip the micro-batches already trained on. They are the same texts:
        # blocks come in order (`ordered_ingest`) and the shuffles are seeded by epoch.
        micro_batches = itertools.islice(micro_batches, done, None)
        step_loss = torch.zeros((), device=device)
        for i, (features, targets) in enumerate(micro_batches, start=done):
            if i >= micro_per_epoch:  # the schedule and the loss scaling count on the plan
                raise RuntimeError(
                    f"epoch {epoch}: the data shard holds more than the {micro_per_epoch} "
                    f"micro-batches planned for {config['num_rows']} rows"
                )
            # A step takes `accumulation` micro-batches; the epoch's last step may take fewer.
            group = min(accumulation, micro_per_epoch - i // accumulation * accumulation)
            stepping = (i + 1) % accumulation == 0 or i + 1 == micro_per_epoch
            features = batch_to_device(features, device)
            # Dropout draws from a seed fixed by the micro-batch's place: a resumed run draws the
            # masks the uninterrupted run drew, without carrying each worker's RNG state.
            torch.manual_seed(dropout_seed(cfg.run.seed, epoch, i, rank))
            # DDP all-reduces gradients on the micro-batch that ends a step, not before.
            with nullcontext() if stepping or world == 1 else model.no_sync():
                with autocast:
                    predicted = embed(model, features)
                loss = leaf_loss(predicted.float(), targets.to(device), tcfg.loss) / group
                loss.backward()
            step_loss += loss.detach()
            seen += len(targets)
            if not stepping:
                continue
            frozen = encoder_params if step < head_steps else []
            if tcfg.freeze_projection:
                frozen = head_params
            try:
                grad_norm, (lr, head_lr) = optimizer_step(
                    optimizer, scheduler, trainable, frozen, tcfg.max_grad_norm
                )
            except NonFiniteGradient:  # every worker sees the same all-reduced gradient
                if rank == 0:
                    config["diverged"].write(f"step {step + 1} (epoch {epoch})")
                return
            step += 1
            if step % tcfg.log_every == 0 or step in (1, total_steps):  # and the last
                row = {
                    "step": step,
                    "epoch": epoch,
                    "loss": _mean_over_workers(step_loss, world),
                    "lr": lr,
                    "head_lr": head_lr,
                    "grad_norm": float(grad_norm),
                    "seq_per_s": seen * world / (time.perf_counter() - tic),
                    "resumes": resumes,  # restarts from a checkpoint so far (failures, reruns)
                }
                tic, seen = time.perf_counter(), 0
                history.append(row)
                if bar:
                    bar.set_description(f"train student  loss {row['loss']:.4f}")
            step_loss = torch.zeros((), device=device)
            if bar:
                bar.update(1)
            if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0:
                if i + 1 < micro_per_epoch:  # the epoch's end checkpoints below
                    save(epoch, i + 1)
                    tic, seen = time.perf_counter(), 0  # throughput excludes checkpointing
        save(epoch, micro_per_epoch)
        done = 0
    if bar:
        bar.close()


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainable: list[torch.nn.Parameter],
    frozen: list[torch.nn.Parameter],
    max_grad_norm: float,
) -> tuple[torch.Tensor, list[float]]:
    """Clip, step, move the schedule on; the gradient norm (on the device: read at log time)
    and each group's rate for this step.

    `frozen` parameters (the encoder in the head-only phase) have their gradients dropped: DDP
    needs every gradient computed, and AdamW skips a parameter without one, so it neither moves
    nor decays, and its optimiser state starts when it first trains."""
    for p in frozen:
        p.grad = None
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    # Read on the host every step: one NaN step would spoil the weights and every checkpoint
    # after it. Raised before the optimiser moves, so the weights stay finite.
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteGradient
    rates = [float(rate) for rate in scheduler.get_last_lr()]  # before the schedule moves on
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, rates


def dropout_seed(seed: int, epoch: int, micro_batch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, micro_batch, rank]).generate_state(1)[0])


def leaf_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """LEAF's schedule for `param_groups`' (encoder, projection) groups: `cycles` equal cycles,
    each a linear warm-up then a linear decay to `final_lr_ratio` of the peak. With a head-only
    phase, its steps are one such cycle for the projection at head_lr, the encoder's rate 0; the
    cycles then share the other steps, the projection at the encoder's rate (0 when it is
    frozen). Hand-written:
    transformers restarts only cosine schedules and has no per-group phases."""
    head_steps = head_only_steps(total_steps, cfg)
    head_phase = _cycles(head_steps, 1, cfg)
    full_phase = _cycles(total_steps - head_steps, cfg.cycles, cfg)
    head_after = cfg.lr / cfg.projection_lr if head_steps else 1.0
    if cfg.freeze_projection:
        head_after = 0.0

    def encoder(step: int) -> float:
        return 0.0 if step < head_steps else full_phase(step - head_steps)

    def head(step: int) -> float:
        return head_phase(step) if step < head_steps else head_after * full_phase(step - head_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [encoder, head])


def head_only_steps(total_steps: int, cfg: TrainConfig) -> int:
    return round(cfg.head_only_ratio * total_steps)


def _cycles(steps: int, cycles: int, cfg: TrainConfig) -> Callable[[int], float]:
    """step -> factor of the peak rate over `steps` steps in `cycles` cycles. Python numbers
    only: the factors go into checkpoints, which torch's safe loader reads."""
    bounds = np.linspace(0, steps, cycles + 1).round().astype(int).tolist()

    def factor(step: int) -> float:
        cycle = min(bisect.bisect_right(bounds, step) - 1, cycles - 1)
        length = max(1, bounds[cycle + 1] - bounds[cycle])
        into = step - bounds[cycle]
        warmup = int(cfg.warmup_ratio * length)
        if into < warmup:
            return (into + 1) / (warmup + 1)
        decayed = (into - warmup) / max(1, length - warmup - 1)  # 1 at the cycle's last step
        return 1 - (1 - cfg.final_lr_ratio) * min(1.0, decayed)

    return factor


def batches_per_epoch(rows_per_worker: int, batch: int) -> int:
    """Batches `_length_bucketed` yields for a shard this size (equal split: workers agree)."""
    window = batch * BUCKET_BATCHES
    full, rest = divmod(rows_per_worker, window)
    return full * BUCKET_BATCHES + -(-rest // batch)


class TokenizedBuckets(NumpyBatchCollateFn):
    """A window of rows as its batches of similar-length texts, tokenized, with their targets.

    Ray Data calls it in its prefetch threads, so tokenizing (Rust, GIL released) overlaps the
    training step instead of taking its place; on a GPU it is a large part of a small batch's step.
    Every call tokenizes with the same settings, so the threads and validation share the tokenizer.
    """

    def __init__(self, student: SentenceTransformer, batch: int):
        self.student, self.batch = student, batch

    def __call__(self, window: dict[str, np.ndarray]) -> list[tuple[dict, torch.Tensor]]:
        # Parquet list columns arrive as an object array of rows: stack them.
        texts, vectors = window["text"], np.stack(window["embedding"]).astype(np.float32)
        return [
            (self.student.preprocess(texts[rows].tolist()), torch.from_numpy(vectors[rows]))
            for rows in length_sorted_batches(texts, self.batch)
        ]


def length_sorted_batches(texts: np.ndarray, batch: int) -> list[np.ndarray]:
    """Row indices in batches of similar-length texts (characters: a cheap proxy for tokens)."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def _length_bucketed(
    shard: ray.data.DataIterator, student: SentenceTransformer, batch: int, seed: int
) -> Iterator[tuple[dict, torch.Tensor]]:
    """Shuffled, tokenized batches: each window of BUCKET_BATCHES batches is length-sorted.

    Hand-written because Ray Data has no length-grouped batching (HF Trainer's `group_by_length`).
    """
    rng = np.random.default_rng(seed)
    for batches in shard.iter_torch_batches(
        batch_size=batch * BUCKET_BATCHES,
        collate_fn=TokenizedBuckets(student, batch),
        prefetch_batches=2,  # two windows tokenized ahead, on two threads
        local_shuffle_buffer_size=batch * BUCKET_BATCHES * 4,
        local_shuffle_seed=seed,
    ):
        for idx in rng.permutation(len(batches)):
            yield batches[idx]


def _mean_over_workers(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world
    return float(value)


def _validate(
    student: SentenceTransformer, validation: Validation | None, cfg: TrainConfig, device
) -> dict[str, float]:
    """Held-out alignment: the training loss and the mean cosine to the teacher's vectors."""
    if not validation:
        return {}
    texts, targets = validation
    student.eval()
    predicted = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.inference_mode(), autocast:
        for start in range(0, len(texts), cfg.batch_size):
            features = batch_to_device(
                student.preprocess(texts[start : start + cfg.batch_size]), device
            )
            predicted.append(embed(student, features).float())
    student.train()
    vectors, target = torch.cat(predicted), torch.from_numpy(targets).to(device)
    cosine = torch.nn.functional.cosine_similarity(vectors, target, dim=-1).mean()
    return {"val_loss": float(leaf_loss(vectors, target, cfg.loss)), "val_cosine": float(cosine)}


def _report_checkpoint(
    student, optimizer, scheduler, position: dict, history, validations, rank: int
) -> None:
    """Rank 0 writes a loadable sentence-transformers folder plus the state needed to resume:
    optimiser, schedule, and the data position (epoch and micro-batches done in it)."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            student.save_pretrained(tmp)
            state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history,
                "validations": validations,
                **position,
            }
            torch.save(state, Path(tmp) / TRAIN_STATE)
            write_metrics(history, Path(tmp))
            write_metrics(validations, Path(tmp), VALIDATION_JSONL)
            checkpoint = Checkpoint.from_directory(tmp)
        last = history[-1] if history else {}
        metrics = {"epoch": position["epoch"], "step": position["step"], "loss": last.get("loss")}
        ray.train.report(
            metrics | (validations[-1] if validations and rank == 0 else {}), checkpoint
        )
