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
from dataclasses import asdict, dataclass, field, fields
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


@dataclass
class TrainState:
    """Where training stands, saved in every checkpoint beside the optimiser and the schedule.
    Plain Python values only, so a checkpoint loads with torch's safe loader."""

    step: int = 0
    epoch: int = 0
    micro_batches_done: int = 0  # in `epoch`: a mid-epoch checkpoint resumes inside it
    resumes: int = 0  # restarts from a checkpoint so far (failures, reruns)
    history: list[dict] = field(default_factory=list)  # a row per logged step
    validations: list[dict] = field(default_factory=list)  # a row per checkpoint (and step 0)

    @classmethod
    def restore(
        cls,
        saved: dict,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        micro_per_epoch: int,
    ) -> TrainState:
        """Continue the schedule and the data where the checkpoint left them."""
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = cls(**{f.name: saved[f.name] for f in fields(cls)})
        state.resumes += 1
        if state.micro_batches_done == micro_per_epoch:  # saved at the epoch's end
            state.epoch, state.micro_batches_done = state.epoch + 1, 0
        return state

    def to_checkpoint(
        self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
    ) -> dict:
        saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        return saved | asdict(self)


@dataclass(frozen=True)
class Batching:
    """How a worker cuts the global batch: micro-batches per step (gradient accumulation) and
    per epoch, from the rows its shard holds."""

    micro_batch: int
    accumulation: int
    micro_per_epoch: int

    @classmethod
    def of(cls, tcfg: TrainConfig, num_rows: int, world: int) -> Batching:
        micro = tcfg.batch_size // world // tcfg.grad_accumulation
        return cls(micro, tcfg.grad_accumulation, batches_per_epoch(num_rows // world, micro))

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.micro_per_epoch // self.accumulation)

    def step_size(self, i: int) -> int:
        """Micro-batches in the step micro-batch `i` belongs to: an epoch's last may be short."""
        first = i // self.accumulation * self.accumulation
        return min(self.accumulation, self.micro_per_epoch - first)

    def ends_step(self, i: int) -> bool:
        return (i + 1) % self.accumulation == 0 or i + 1 == self.micro_per_epoch


def train_loop(config: dict) -> None:
    """One Ray Train worker: DDP over its shard of the training set, from the untrained student
    or the latest checkpoint; rank 0 validates and writes every checkpoint."""
    cfg: LeafConfig = config["cfg"]
    tcfg = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["torch_threads"])  # Ray sets OMP_NUM_THREADS=1
    device = ray.train.torch.get_device()
    student, saved = _load_student(config["init"], cfg.student.max_seq_length, device)
    model = ray.train.torch.prepare_model(student)  # DDP when world > 1
    groups = param_groups(student, tcfg.lr, tcfg.projection_lr)
    encoder_params, head_params = (group["params"] for group in groups)
    optimizer = torch.optim.AdamW(groups, weight_decay=tcfg.weight_decay)
    batching = Batching.of(tcfg, config["num_rows"], world)
    total_steps = batching.steps_per_epoch * tcfg.epochs
    scheduler = leaf_schedule(optimizer, total_steps, tcfg)
    head_steps = head_only_steps(total_steps, tcfg)
    validation = config["validation"] if rank == 0 else None
    if saved:
        state = TrainState.restore(saved, optimizer, scheduler, batching.micro_per_epoch)
    else:
        state = TrainState()
        if validation:  # where held-out alignment starts: step 0
            state.validations.append(
                {"step": 0, "epoch": 0} | _validate(student, validation, tcfg, device)
            )

    def save(done: int) -> None:
        state.micro_batches_done = done
        if validation:
            metrics = _validate(student, validation, tcfg, device)
            state.validations.append({"step": state.step, "epoch": state.epoch} | metrics)
        _report_checkpoint(student, state.to_checkpoint(optimizer, scheduler), rank)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = _progress(rank, config["terminal"], total_steps, state.step)
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(state.epoch, tcfg.epochs):
        state.epoch = epoch
        model.train()
        window = Window(device)  # the step's loss, and throughput between logged steps
        batches = _length_bucketed(shard, student, batching.micro_batch, cfg.run.seed + epoch)
        # Resuming mid-epoch: skip the micro-batches already trained on. They are the same texts:
        # blocks come in order (`ordered_ingest`) and the shuffles are seeded by epoch.
        start = state.micro_batches_done
        for i, (features, targets) in enumerate(itertools.islice(batches, start, None), start):
            if i >= batching.micro_per_epoch:  # the schedule and the loss scaling count on it
                raise RuntimeError(
                    f"epoch {epoch}: the data shard holds more than the {batching.micro_per_epoch}"
                    f" micro-batches planned for {config['num_rows']} rows"
                )
            stepping = batching.ends_step(i)
            # Dropout draws from a seed fixed by the micro-batch's place: a resumed run draws the
            # masks the uninterrupted run drew, without carrying each worker's RNG state.
            torch.manual_seed(dropout_seed(cfg.run.seed, epoch, i, rank))
            # DDP all-reduces gradients on the micro-batch that ends a step, not before.
            with nullcontext() if stepping or world == 1 else model.no_sync():
                with autocast:
                    predicted = embed(model, batch_to_device(features, device))
                loss = leaf_loss(predicted.float(), targets.to(device), tcfg.loss)
                loss = loss / batching.step_size(i)
                loss.backward()
            window.add(loss.detach(), len(targets))
            if not stepping:
                continue
            frozen = encoder_params if state.step < head_steps else []
            if tcfg.freeze_projection:
                frozen = head_params
            try:
                grad_norm, rates = optimizer_step(
                    optimizer, scheduler, encoder_params + head_params, frozen, tcfg.max_grad_norm
                )
            except NonFiniteGradient:  # every worker sees the same all-reduced gradient
                if rank == 0:
                    config["diverged"].write(f"step {state.step + 1} (epoch {epoch})")
                return
            state.step += 1
            if state.step % tcfg.log_every == 0 or state.step in (1, total_steps):  # and the last
                state.history.append(window.row(state, grad_norm, rates, world))
                bar.set_description(f"train student  loss {state.history[-1]['loss']:.4f}")
            window.next_step()
            bar.update(1)
            if tcfg.checkpoint_every and state.step % tcfg.checkpoint_every == 0:
                if i + 1 < batching.micro_per_epoch:  # the epoch's end checkpoints below
                    save(i + 1)
                    window.restart()  # throughput excludes checkpointing
        save(batching.micro_per_epoch)
        state.micro_batches_done = 0
    bar.close()


class Window:
    """The current step's loss (on the device: read only when logged) and the throughput since
    the last logged step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss = torch.zeros((), device=device)
        self.restart()

    def restart(self) -> None:
        self.tic, self.seen = time.perf_counter(), 0

    def add(self, loss: torch.Tensor, rows: int) -> None:
        self.loss += loss
        self.seen += rows

    def next_step(self) -> None:
        self.loss = torch.zeros((), device=self.device)

    def row(self, state: TrainState, grad_norm: torch.Tensor, rates: list[float], world: int):
        """The history row of a logged step; the throughput window starts again."""
        row = {
            "step": state.step,
            "epoch": state.epoch,
            "loss": _mean_over_workers(self.loss, world),
            "lr": rates[0],
            "head_lr": rates[1],
            "grad_norm": float(grad_norm),
            "seq_per_s": self.seen * world / (time.perf_counter() - self.tic),
            "resumes": state.resumes,
        }
        self.restart()
        return row


def _load_student(
    init: Checkpoint, max_seq_length: int, device: torch.device
) -> tuple[SentenceTransformer, dict | None]:
    """The latest checkpoint's student and saved state (when resuming after a failure or a
    rerun), else the untrained student. Read through its filesystem (local, NFS or an object
    store): a worker on another node fetches its own copy."""
    checkpoint = ray.train.get_checkpoint()
    with (checkpoint or init).as_directory() as model_dir:
        student = SentenceTransformer(model_dir, device=str(device))
        saved = torch.load(Path(model_dir) / TRAIN_STATE, weights_only=True) if checkpoint else None
    student.max_seq_length = max_seq_length
    freeze_unused(student)
    return student, saved


def _progress(rank: int, terminal: bool, total: int, done: int) -> tqdm_ray.tqdm | LogLines:
    """Rank 0's progress: a tqdm_ray bar the driver draws on its terminal, else log lines."""
    if rank != 0:
        return LogLines(total, "", done, quiet=True)
    bar = tqdm_ray.tqdm(desc="train student", total=total) if terminal else None
    bar = bar or LogLines(total, "train student")
    bar.update(done)
    return bar


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


def _report_checkpoint(student: SentenceTransformer, saved: dict, rank: int) -> None:
    """Rank 0 writes a loadable sentence-transformers folder plus `saved` (TrainState's
    checkpoint: optimiser, schedule, data position, history); every rank reports."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            student.save_pretrained(tmp)
            torch.save(saved, Path(tmp) / TRAIN_STATE)
            write_metrics(saved["history"], Path(tmp))
            write_metrics(saved["validations"], Path(tmp), VALIDATION_JSONL)
            checkpoint = Checkpoint.from_directory(tmp)
        history, validations = saved["history"], saved["validations"]
        last = history[-1] if history else {}
        metrics = {"epoch": saved["epoch"], "step": saved["step"], "loss": last.get("loss")}
        ray.train.report(
            metrics | (validations[-1] if validations and rank == 0 else {}), checkpoint
        )
