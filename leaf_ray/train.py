"""Student stage: Ray Train DDP workers read teacher vectors from their shard and align to them.

`train_loop` reads top to bottom like a plain PyTorch loop; Ray Train supplies the process group
(gloo on CPU, NCCL on GPU), the data shard, and checkpoint storage.
"""

from __future__ import annotations

import tempfile
import time
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
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import batch_to_device

from leaf_ray.config import LeafConfig, TrainConfig
from leaf_ray.report import write_metrics
from leaf_ray.student import embed, freeze_unused, leaf_loss, param_groups

TRAIN_STATE = "train_state.pt"
# Texts per length-sorting window, in batches: batches then carry little padding.
BUCKET_BATCHES = 16


def train_student(
    cfg: LeafConfig, embedded: ray.data.Dataset, num_rows: int, init_path: str, storage: Path
) -> Checkpoint:
    """Fit the student on (text, embedding) rows; returns the final checkpoint."""
    resources = ray.cluster_resources()
    use_gpu = cfg.train.use_gpu if cfg.train.use_gpu is not None else resources.get("GPU", 0) > 0
    # Workers reserve less CPU than they compute with, so Ray Data can always feed them.
    threads = cfg.train.torch_threads or max(1, round(resources["CPU"] / cfg.train.num_workers))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": cfg,
            "init_path": init_path,
            "num_rows": num_rows,
            "torch_threads": threads,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=RunConfig(
            name="ray_train",
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
        datasets={"train": embedded.select_columns(["text", "embedding"])},
    )
    result = trainer.fit()
    return result.checkpoint


def train_loop(config: dict) -> None:
    cfg: LeafConfig = config["cfg"]
    tcfg = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.run.seed)
    torch.set_num_threads(config["torch_threads"])  # Ray sets OMP_NUM_THREADS=1
    device = ray.train.torch.get_device()

    checkpoint = ray.train.get_checkpoint()  # set when resuming after a failure or a rerun
    with checkpoint.as_directory() if checkpoint else nullcontext(config["init_path"]) as model_dir:
        student = SentenceTransformer(model_dir, device=str(device))
        state = torch.load(Path(model_dir) / TRAIN_STATE) if checkpoint else None
    student.max_seq_length = cfg.student.max_seq_length
    freeze_unused(student)
    model = ray.train.torch.prepare_model(student)  # DDP when world > 1
    groups = param_groups(student, tcfg.lr, tcfg.projection_lr)
    trainable = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=tcfg.weight_decay)
    accumulation = tcfg.grad_accumulation
    micro_batch = tcfg.batch_size // world // accumulation
    micro_per_epoch = _steps_per_epoch(config["num_rows"] // world, micro_batch)
    steps_per_epoch = -(-micro_per_epoch // accumulation)
    total_steps = steps_per_epoch * tcfg.epochs
    scheduler = leaf_schedule(optimizer, total_steps, tcfg)
    step, start_epoch, history, resumes = 0, 0, [], 0
    if state:  # continue the schedule where the checkpoint left it
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, start_epoch, history = state["step"], state["epoch"] + 1, state["history"]
        resumes = state["resumes"] + 1

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = tqdm_ray.tqdm(desc="train student", total=total_steps) if rank == 0 else None
    if bar:
        bar.update(step)
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, tcfg.epochs):
        model.train()
        tic, seen = time.perf_counter(), 0  # throughput over each logging window
        micro_batches = _length_bucketed(shard, micro_batch, cfg.run.seed + epoch)
        step_loss = torch.zeros((), device=device)
        for i, (texts, targets) in enumerate(micro_batches):
            # A step takes `accumulation` micro-batches; the epoch's last step may take fewer.
            group = min(accumulation, micro_per_epoch - i // accumulation * accumulation)
            stepping = (i + 1) % accumulation == 0 or i + 1 == micro_per_epoch
            features = batch_to_device(student.preprocess(texts), device)
            # DDP all-reduces gradients on the micro-batch that ends a step, not before.
            with nullcontext() if stepping or world == 1 else model.no_sync():
                with autocast:
                    predicted = embed(model, features)
                target = torch.from_numpy(targets).to(device)
                loss = leaf_loss(predicted.float(), target, tcfg.loss) / group
                loss.backward()
            step_loss += loss.detach()
            seen += len(texts)
            if not stepping:
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, tcfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]  # this step's rate, before the schedule moves on
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % tcfg.log_every == 0 or step == 1:
                row = {
                    "step": step,
                    "epoch": epoch,
                    "loss": _mean_over_workers(step_loss, world),
                    "lr": lr,
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
        _report_epoch(student, optimizer, scheduler, (step, epoch, resumes), history, rank)
    if bar:
        bar.close()


def leaf_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """LEAF's schedule: `cycles` equal cycles, each a linear warm-up then a linear decay to
    `final_lr_ratio` of the peak. Hand-written: transformers restarts only cosine schedules."""
    bounds = np.linspace(0, total_steps, cfg.cycles + 1).round().astype(int)

    def factor(step: int) -> float:
        cycle = min(int(np.searchsorted(bounds, step, side="right")) - 1, cfg.cycles - 1)
        length = max(1, bounds[cycle + 1] - bounds[cycle])
        into = step - bounds[cycle]
        warmup = int(cfg.warmup_ratio * length)
        if into < warmup:
            return (into + 1) / (warmup + 1)
        decayed = (into - warmup) / max(1, length - warmup - 1)  # 1 at the cycle's last step
        return float(1 - (1 - cfg.final_lr_ratio) * min(1.0, decayed))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _steps_per_epoch(rows_per_worker: int, batch: int) -> int:
    """Batches `_length_bucketed` yields for a shard this size (equal split: workers agree)."""
    window = batch * BUCKET_BATCHES
    full, rest = divmod(rows_per_worker, window)
    return full * BUCKET_BATCHES + -(-rest // batch)


def _length_bucketed(
    shard: ray.data.DataIterator, batch: int, seed: int
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Shuffled batches of similar-length texts: each window of BUCKET_BATCHES batches is sorted.

    Hand-written because Ray Data has no length-grouped batching (HF Trainer's `group_by_length`).
    Sorting by characters is a cheap proxy for tokens.
    """
    rng = np.random.default_rng(seed)
    for window in shard.iter_batches(
        batch_size=batch * BUCKET_BATCHES,
        batch_format="numpy",
        local_shuffle_buffer_size=batch * BUCKET_BATCHES * 4,
        local_shuffle_seed=seed,
    ):
        # Parquet list columns arrive as an object array of rows: stack them.
        texts, vectors = window["text"], np.stack(window["embedding"]).astype(np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        batches = [order[i : i + batch] for i in range(0, len(order), batch)]
        for idx in rng.permutation(len(batches)):
            rows = batches[idx]
            yield texts[rows].tolist(), vectors[rows]


def _mean_over_workers(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world
    return float(value)


def _report_epoch(student, optimizer, scheduler, position, history, rank) -> None:
    """Rank 0 writes a loadable sentence-transformers folder plus the state needed to resume."""
    step, epoch, resumes = position
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            student.save_pretrained(tmp)
            state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "epoch": epoch,
                "resumes": resumes,
                "history": history,
            }
            torch.save(state, Path(tmp) / TRAIN_STATE)
            write_metrics(history, Path(tmp))
            checkpoint = Checkpoint.from_directory(tmp)
        last = history[-1] if history else {}
        ray.train.report({"epoch": epoch, "step": step, "loss": last.get("loss")}, checkpoint)
