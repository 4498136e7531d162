"""The training loop each Ray Train worker runs: read it top to bottom."""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.experimental import tqdm_ray
from ray.train import (
    Checkpoint,
)
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import batch_to_device

from leaf_ray.config import LeafConfig, TrainConfig
from leaf_ray.losses import gather_candidates, leaf_loss
from leaf_ray.progress import LogLines
from leaf_ray.run import TRAIN_STATE, VALIDATION_JSONL, write_metrics
from leaf_ray.student import freeze_unused, param_groups, sentence_embedding
from leaf_ray.train.batching import Batching, _length_bucketed
from leaf_ray.train.dataset import Validation
from leaf_ray.train.schedule import head_only_steps, leaf_schedule
from leaf_ray.train.state import TrainState


class NonFiniteGradient(ArithmeticError):
    """A step's loss or gradient is NaN or infinite."""


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
        step_texts: list[str] = []  # the step's texts, named if it diverges
        for i, micro in enumerate(itertools.islice(batches, start, None), start):
            features, targets = micro.features, micro.targets
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
                    predicted = sentence_embedding(model, batch_to_device(features, device))
                targets = targets.to(device)
                candidates = gather_candidates(targets, world) if tcfg.loss == "kl" else None
                loss = leaf_loss(
                    predicted.float(), targets, tcfg.loss, tcfg.kl_temperature, candidates
                )
                loss = loss / batching.step_size(i)
                loss.backward()
            window.add(loss.detach(), len(targets))
            step_texts += micro.text_hashes
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
                    where = {"step": state.step + 1, "epoch": epoch, "text_hashes": step_texts}
                    config["diverged"].write(json.dumps(where))
                return
            step_texts = []
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
            predicted.append(sentence_embedding(student, features).float())
    student.train()
    vectors, target = torch.cat(predicted), torch.from_numpy(targets).to(device)
    cosine = torch.nn.functional.cosine_similarity(vectors, target, dim=-1).mean()
    loss = leaf_loss(vectors, target, cfg.loss, cfg.kl_temperature)
    return {"val_loss": float(loss), "val_cosine": float(cosine)}


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
