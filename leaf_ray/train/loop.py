"""The training loop each Ray Train worker runs: read it top to bottom."""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from collections.abc import Iterator
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
from ray.train import Checkpoint
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import batch_to_device

from leaf_ray.config import LeafConfig, TrainConfig
from leaf_ray.losses import gather_candidates, leaf_loss
from leaf_ray.progress import LogLines, quiet_weight_loading
from leaf_ray.run import TRAIN_STATE
from leaf_ray.student import freeze_unused, param_groups, sentence_embedding
from leaf_ray.train.batching import Batching, MicroBatch, bucketed_batches
from leaf_ray.train.dataset import Validation
from leaf_ray.train.schedule import head_only_steps, leaf_schedule
from leaf_ray.train.state import History, TrainState


class NonFiniteGradient(ArithmeticError):
    """A step's loss or gradient is NaN or infinite."""


def train_loop(config: dict) -> None:
    """One Ray Train worker: DDP over its shard of the training set, from the untrained student
    or the latest checkpoint; rank 0 validates and writes every checkpoint."""
    worker = Worker(config)
    state, batching = worker.state, worker.batching
    for epoch in range(state.epoch, worker.tcfg.epochs):
        state.epoch = epoch
        for i, micro in worker.micro_batches():
            worker.forward_backward(micro, i)
            if not batching.ends_step(i):
                continue
            if not worker.optimizer_step(i):
                return  # diverged: recorded for the driver, every worker stops here
            worker.log_step()
            if worker.checkpoints_mid_epoch(i):
                worker.save(i + 1)  # the epoch's end checkpoints below
        worker.save(batching.micro_per_epoch)
        state.micro_batches_done = 0
    worker.bar.close()


class Worker:
    """One worker's training: the model, optimiser, schedule and data position it steps, set
    up from the untrained student or the latest checkpoint."""

    def __init__(self, config: dict):
        self.cfg: LeafConfig = config["cfg"]
        self.tcfg = tcfg = self.cfg.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(config["torch_threads"])  # Ray sets OMP_NUM_THREADS=1
        self.device = ray.train.torch.get_device()
        self.student, saved = _load_student(
            config["init"], self.cfg.student.max_seq_length, self.device
        )
        self.model = ray.train.torch.prepare_model(self.student)  # DDP when world > 1
        groups = param_groups(self.student, tcfg.lr, tcfg.projection_lr)
        self.encoder_params, self.head_params = (group["params"] for group in groups)
        fast = tcfg.step == "fast" or (tcfg.step == "auto" and self.device.type == "cuda")
        self.optimizer, self.fast = _adamw(groups, tcfg.weight_decay, fused=fast)
        self.num_rows = config["num_rows"]
        self.batching = Batching.of(tcfg, self.num_rows, self.world)
        self.total_steps = self.batching.steps_per_epoch * tcfg.epochs
        self.scheduler = leaf_schedule(self.optimizer, self.total_steps, tcfg)
        self.head_steps = head_only_steps(self.total_steps, tcfg)
        self.validation = config["validation"] if self.rank == 0 else None
        self.diverged = config["diverged"]
        self.history = History(config["history"])
        if saved:
            self.state = TrainState.restore(
                saved, self.optimizer, self.scheduler, self.batching.micro_per_epoch
            )
        else:
            self.state = TrainState()
            if self.validation:  # where held-out alignment starts: step 0
                self.state.validations.append({"step": 0, "epoch": 0} | self._validate())
        self.autocast = torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"
        )
        self.bar = _progress(self.rank, config["terminal"], self.total_steps, self.state.step)
        self.shard = ray.train.get_dataset_shard("train")
        self.window = Window(self.device)
        self.step_texts: list[str] = []  # the step's texts, named if it diverges
        # The fast step's steps since the host last read their health: (step, texts, finite).
        self.unread: list[tuple[int, list[str], torch.Tensor]] = []

    def micro_batches(self) -> Iterator[tuple[int, MicroBatch]]:
        """The epoch's micro-batches with their place in it. Resuming mid-epoch skips those
        already trained on, without tokenizing them: they are the same texts, since blocks come
        in order (`ordered_ingest`) and the shuffles are seeded by epoch."""
        epoch, start = self.state.epoch, self.state.micro_batches_done
        self.model.train()
        self.window = Window(self.device)
        b = self.batching
        seed = self.cfg.run.seed + epoch
        batches = bucketed_batches(
            self.shard, self.student, b.micro_batch, seed, b.window_batches, b.grouping, start
        )
        for i, micro in enumerate(batches, start):
            if i >= b.micro_per_epoch:  # the schedule and loss scaling count on it
                planned = b.micro_per_epoch
                raise RuntimeError(
                    f"epoch {epoch}: the data shard holds more than the {planned} micro-batches"
                    f" planned for {self.num_rows} rows"
                )
            yield i, micro

    def forward_backward(self, micro: MicroBatch, i: int) -> None:
        """Micro-batch `i`'s share of its step's gradient."""
        tcfg, targets = self.tcfg, micro.targets.to(self.device)
        # Dropout draws from a seed fixed by the micro-batch's place: a resumed run draws the
        # masks the uninterrupted run drew, without carrying each worker's RNG state.
        torch.manual_seed(dropout_seed(self.cfg.run.seed, self.state.epoch, i, self.rank))
        stepping = self.batching.ends_step(i)
        # DDP all-reduces gradients on the micro-batch that ends a step, not before.
        with nullcontext() if stepping or self.world == 1 else self.model.no_sync():
            with self.autocast:
                features = batch_to_device(micro.features, self.device)
                predicted = sentence_embedding(self.model, features)
            candidates = gather_candidates(targets, self.world) if tcfg.loss == "kl" else None
            loss = leaf_loss(predicted.float(), targets, tcfg.loss, tcfg.kl_temperature, candidates)
            loss = loss * self.batching.loss_weight(i, len(targets))
            loss.backward()
        self.window.add(loss.detach(), len(targets))
        self.step_texts += micro.text_hashes

    def optimizer_step(self, i: int) -> bool:
        """Apply the step's gradient. False once a step is found not finite (it and its texts
        recorded for the driver): on the eager path at once, before the optimiser moves; on the
        fast path after a step the host reads anyway (logged or checkpointed), the bad step
        skipped on the device meanwhile. Every worker sees the same all-reduced gradient."""
        frozen = self.encoder_params if self.state.step < self.head_steps else []
        if self.tcfg.freeze_projection:
            frozen = self.head_params
        try:
            self.grad_norm, self.rates, finite = optimizer_step(
                self.optimizer,
                self.scheduler,
                self.encoder_params + self.head_params,
                frozen,
                self.tcfg.max_grad_norm,
                on_device=self.fast,
            )
        except NonFiniteGradient:
            return self._diverged(self.state.step + 1, self.step_texts)
        self.state.step += 1
        texts, self.step_texts = self.step_texts, []
        if not self.fast:
            return True
        self.unread.append((self.state.step, texts, finite))
        if not self._host_reads(i):
            return True
        unread, self.unread = self.unread, []
        # The host waits for the device here, once for all these steps, not every step.
        healthy = torch.stack([ok for _, _, ok in unread]).tolist()
        for (step, step_texts, _), ok in zip(unread, healthy, strict=True):
            if not ok:
                return self._diverged(step, step_texts)
        return True

    def _diverged(self, step: int, texts: list[str]) -> bool:
        if self.rank == 0:
            where = {"step": step, "epoch": self.state.epoch}
            self.diverged.write(json.dumps(where | {"text_hashes": texts}))
        return False

    def _host_reads(self, i: int) -> bool:
        """Whether the host reads the device after micro-batch `i`'s step anyway: the step is
        logged or checkpointed."""
        ends_epoch = i + 1 == self.batching.micro_per_epoch
        return self.logs(self.state.step) or self.checkpoints_mid_epoch(i) or ends_epoch

    def logs(self, step: int) -> bool:
        """Whether `step` gets a history row: every `log_every`, the first and the last."""
        return step % self.tcfg.log_every == 0 or step in (1, self.total_steps)

    def checkpoints_mid_epoch(self, i: int) -> bool:
        """Whether micro-batch `i`'s step is checkpointed before the epoch's end (which always
        is)."""
        every = self.tcfg.checkpoint_every
        return (
            bool(every) and self.state.step % every == 0 and i + 1 < self.batching.micro_per_epoch
        )

    def log_step(self) -> None:
        """A history row every `log_every` steps, the first and the last; the bar moves on."""
        state = self.state
        if self.logs(state.step):
            state.history.append(self.window.row(state, self.grad_norm, self.rates, self.world))
            self.bar.set_description(f"train student  loss {state.history[-1]['loss']:.4f}")
        self.window.next_step()
        self.bar.update(1)

    def save(self, micro_batches_done: int) -> None:
        """A checkpoint after `micro_batches_done` of the epoch, validated on rank 0."""
        state = self.state
        state.micro_batches_done = micro_batches_done
        if self.validation:
            state.validations.append({"step": state.step, "epoch": state.epoch} | self._validate())
        saved = state.to_checkpoint(self.optimizer, self.scheduler)
        if self.rank == 0:
            self.history.add(saved)
        _report_checkpoint(self.student, saved, self.rank)
        self.window.restart()  # throughput excludes checkpointing

    def _validate(self) -> dict[str, float]:
        return _validate(self.student, self.validation, self.tcfg, self.device)


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
    quiet_weight_loading()
    with (checkpoint or init).as_directory() as model_dir:
        student = SentenceTransformer(model_dir, device=str(device))
        # On the CPU: the optimiser state moves to each parameter's device as it loads, and a
        # checkpoint written on GPUs loads where there are none.
        state = Path(model_dir) / TRAIN_STATE
        saved = torch.load(state, map_location="cpu", weights_only=True) if checkpoint else None
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


# The devices Ray Train gives workers, where torch (>= 2.4) has a fused AdamW.
FUSED_DEVICES = ("cpu", "cuda")


def _adamw(groups: list[dict], weight_decay: float, fused: bool) -> tuple[torch.optim.AdamW, bool]:
    """AdamW, fused into one kernel where asked and the parameters' device has it; whether it
    is fused."""
    params = [p for group in groups for p in group["params"]]
    if fused and not all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params):
        warnings.warn(
            "train.step fast: no fused AdamW on this device; the eager step instead", stacklevel=2
        )
        fused = False
    return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=fused or None), fused


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainable: list[torch.nn.Parameter],
    frozen: list[torch.nn.Parameter],
    max_grad_norm: float,
    on_device: bool = False,
) -> tuple[torch.Tensor, list[float], torch.Tensor]:
    """Clip, step, move the schedule on; the gradient norm and whether it is finite (both on
    the device: read at log time), and each group's rate for this step.

    A non-finite gradient must not reach the weights: one NaN step would spoil them and every
    checkpoint after it. By default the host reads the norm every step and raises
    NonFiniteGradient before the optimiser moves. `on_device` (a fused AdamW): the optimiser
    skips the step on the device where the norm is not finite (the `found_inf` GradScaler
    gives fused optimisers), so the host does not wait for the device every step.

    `frozen` parameters (the encoder in the head-only phase) have their gradients dropped: DDP
    needs every gradient computed, and AdamW skips a parameter without one, so it neither moves
    nor decays, and its optimiser state starts when it first trains."""
    for p in frozen:
        p.grad = None
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    finite = torch.isfinite(grad_norm)
    if on_device:
        optimizer.found_inf = (~finite).float()
    elif not finite:
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteGradient
    rates = [float(rate) for rate in scheduler.get_last_lr()]  # before the schedule moves on
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, rates, finite


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
    # A copy: the validation arrays come from Ray's object store, read-only.
    vectors, target = torch.cat(predicted), torch.tensor(targets, device=device)
    cosine = torch.nn.functional.cosine_similarity(vectors, target, dim=-1).mean()
    loss = leaf_loss(vectors, target, cfg.loss, cfg.kl_temperature)
    return {"val_loss": float(loss), "val_cosine": float(cosine)}


def _report_checkpoint(student: SentenceTransformer, saved: dict, rank: int) -> None:
    """Rank 0 writes a loadable sentence-transformers folder plus `saved` (TrainState's
    checkpoint: optimiser, schedule, data position, the history since the checkpoint before);
    every rank reports."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            student.save_pretrained(tmp)
            torch.save(saved, Path(tmp) / TRAIN_STATE)
            checkpoint = Checkpoint.from_directory(tmp)
        history, validations = saved["history"], saved["validations"]
        last = history[-1] if history else {}
        metrics = {"epoch": saved["epoch"], "step": saved["step"], "loss": last.get("loss")}
        ray.train.report(
            metrics | (validations[-1] if validations and rank == 0 else {}), checkpoint
        )
