"""Fault tolerance: a Ray Train worker killed mid-run is replaced and training resumes from the
last checkpoint, with no step repeated or skipped in the history."""

import itertools
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from leaf_ray.config import load_config
from leaf_ray.recipe import distill
from leaf_ray.train.trainer import TrainingDiverged, cpu_worker_env
from tests.conftest import tiny_run_config


def train_worker_pids() -> list[int]:
    """Ray titles its worker processes `ray::<ActorClass>...`: find the Ray Train workers."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and title.startswith("ray::RayTrainWorker"):
            pids.append(int(proc.name))
    return pids


def malloc_env(pid: int) -> dict[str, str]:
    """The MALLOC_* variables a process started with."""
    pairs = (Path("/proc") / str(pid) / "environ").read_bytes().decode().split("\0")
    return dict(p.split("=", 1) for p in pairs if p.startswith("MALLOC_"))


def kill_a_worker_after_first_checkpoint(storage: Path, killed: list) -> None:
    """Kill once Ray Train has registered a checkpoint (its snapshot file lists it); a checkpoint
    folder still being written does not count. Records the worker's pid and malloc settings."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if (storage / "checkpoint_manager_snapshot.json").exists():
            pids = train_worker_pids()
            if pids:
                killed.append((pids[-1], malloc_env(pids[-1])))
                os.kill(pids[-1], signal.SIGKILL)
                return
        time.sleep(0.2)


def run_config(root: Path, texts: list[dict], tiny_teacher, name: str) -> Path:
    return tiny_run_config(
        root,
        texts,
        tiny_teacher,
        name,
        teacher={"cache_dir": "cache"},
        student={"projection_init": "random"},  # a long way to go: the loss falls steeply
        train={
            "epochs": 3,
            "cycles": 1,  # one cycle of 34 steps after the head's 11
            "head_only_ratio": 0.25,  # 11 of 45 steps: a resume from step 5 or 10 crosses it
            "batch_size": 32,
            "grad_accumulation": 2,  # 2 workers x 2 micro-batches of 8 per step
            "lr": 1e-3,
            "head_lr": 1e-2,
            "log_every": 1,
            "checkpoint_every": 5,  # mid-epoch checkpoints: a kill resumes inside an epoch
            "keep_checkpoints": 2,
            "max_failures": 1,
        },
    )


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.cluster
def test_a_killed_worker_is_replaced_and_training_resumes(
    tmp_path, tiny_teacher, demo_texts, ray_local
):
    # 512 texts: 51 held out for validation, 461 train (230 per worker): 29 micro-batches of 8,
    # so 15 steps of 2 micro-batches per epoch (the last takes one), 45 steps in 3 epochs.
    texts = demo_texts[:512]
    steady = Path(distill(load_config(run_config(tmp_path, texts, tiny_teacher, "steady"))).path)

    killed: list[tuple[int, dict[str, str]]] = []
    storage = tmp_path / "out" / ".killed.partial" / "ray_train"
    killer = threading.Thread(
        target=kill_a_worker_after_first_checkpoint, args=(storage, killed), daemon=True
    )
    killer.start()
    resumed = Path(distill(load_config(run_config(tmp_path, texts, tiny_teacher, "killed"))).path)
    killer.join(timeout=5)
    assert killed, "no worker was killed: the run ended before its first checkpoint"
    assert killed[0][1] == cpu_worker_env()  # CPU workers keep the step's buffers in the heap
    assert history(resumed)[-1]["resumes"] == 1  # Ray Train restarted it from a checkpoint
    # It restarted from the first checkpoints (steps 5 or 10), inside the first epoch (15 steps).
    resumed_from = next(r["step"] for r in history(resumed) if r["resumes"] == 1) - 1
    assert resumed_from in (5, 10), resumed_from
    assert history(steady)[-1]["resumes"] == 0
    assert_best_checkpoint_is_the_student(steady)
    assert_best_checkpoint_is_the_student(resumed)

    # Every step appears once, in order, up to the full schedule: none repeated, none skipped.
    steps = [row["step"] for row in history(resumed)]
    assert steps == list(range(1, 45 + 1))
    assert steps == [row["step"] for row in history(steady)]
    # Resumed from a checkpoint, it trains on the same batches with the same dropout as the
    # uninterrupted run: every step's loss is the steady run's, up to float rounding.
    losses = [row["loss"] for row in history(resumed)]
    assert losses == pytest.approx([row["loss"] for row in history(steady)], rel=1e-4)
    assert losses[-1] < 0.7 * losses[0]
    # The projection trains alone for 11 steps (the encoder's rate 0, the head's its own), then
    # everything in one LEAF cycle that peaks at lr and ends at lr x 0.1, the head at lr too.
    rows = history(steady)
    assert [row["lr"] for row in rows[:11]] == [0.0] * 11
    assert rows[0]["head_lr"] > 0
    assert max(row["lr"] for row in rows) == pytest.approx(1e-3)
    assert rows[-1]["lr"] == pytest.approx(1e-4)
    assert [row["head_lr"] for row in rows[11:]] == pytest.approx([row["lr"] for row in rows[11:]])


def assert_best_checkpoint_is_the_student(run_dir: Path) -> None:
    """Checkpoints every 5 steps and at each epoch's end, scored on held-out texts; the student
    is the best of them, and only the best two plus the latest are kept."""
    rows = (run_dir / "validation.jsonl").read_text().splitlines()
    validations = [json.loads(line) for line in rows]
    steps = [v["step"] for v in validations]
    assert steps == sorted(set(range(0, 46, 5)) | {15, 30, 45})  # 0: the student as it started
    assert validations[-1]["val_loss"] < validations[0]["val_loss"]
    assert 0 < validations[0]["val_cosine"] < validations[-1]["val_cosine"] <= 1
    validations = validations[1:]  # the checkpoints
    kept = sorted(k for k in (run_dir / "ray_train").glob("checkpoint_*") if k.is_dir())
    assert 2 <= len(kept) <= 3
    best = min(validations, key=lambda v: v["val_loss"])
    by_step = {torch.load(k / "train_state.pt")["step"]: k for k in kept}
    assert best["step"] in by_step and validations[-1]["step"] in by_step
    weights = (by_step[best["step"]] / "model.safetensors").read_bytes()
    assert (run_dir / "student" / "model.safetensors").read_bytes() == weights


def test_each_row_is_trained_once_an_epoch_in_tokenized_length_sorted_batches(
    tiny_teacher, demo_texts, ray_local
):
    """The prefetch threads tokenize each window into batches that do not overlap in length;
    every row comes once an epoch with its own vector, the one short batch last."""
    import ray.data
    from sentence_transformers import SentenceTransformer

    from leaf_ray.train.batching import TokenizedBuckets, batches_per_epoch, bucketed_batches
    from leaf_ray.train.dataset import ordered_ingest

    student = SentenceTransformer(str(tiny_teacher), device="cpu")
    texts = [row["text"] for row in demo_texts[:300]]
    ids = np.repeat(np.arange(len(texts), dtype=np.float32)[:, None], 4, axis=1)  # row i: all i

    window = TokenizedBuckets(student, 8)({"text": np.array(texts[:128]), "embedding": ids[:128]})
    assert [len(micro.targets) for micro in window] == [8] * 16
    spans = sorted(
        (min(lens), max(lens))
        for lens in ([len(texts[int(i)]) for i in micro.targets[:, 0]] for micro in window)
    )
    assert all(high <= low for (_, high), (low, _) in itertools.pairwise(spans))

    rows = [{"text": t, "embedding": v} for t, v in zip(texts, ids, strict=True)]
    rows = ray.data.from_items(rows)
    rows.context.execution_options = ordered_ingest()
    batches = list(bucketed_batches(rows.iterator(), student, 8, seed=0))
    assert len(batches) == batches_per_epoch(len(texts), 8)
    trained = [micro.targets[:, 0].int().tolist() for micro in batches]
    assert sorted(i for batch in trained for i in batch) == list(range(len(texts)))
    # 300 rows: 37 batches of 8 and the last window's short batch, last of all.
    assert [len(batch) for batch in trained] == [8] * 37 + [4]
    for (features, _, _), batch in zip(batches, trained, strict=True):
        expected = student.preprocess([texts[i] for i in batch])
        assert torch.equal(features["input_ids"], expected["input_ids"])

    def epoch(seed: int) -> list[list[int]]:
        return [
            m.targets[:, 0].int().tolist()
            for m in bucketed_batches(rows.iterator(), student, 8, seed)
        ]

    # Blocks in order: an epoch repeats with its seed, so a resume can skip what it trained.
    assert epoch(0) == trained
    assert epoch(1) != trained

    # A resumed epoch: 20 batches trained, the first window (16) is skipped untokenized, 4 of
    # the second are dropped after tokenizing it; the rest are the uninterrupted epoch's.
    tokenized: list[str] = []
    preprocess = student.preprocess
    student.preprocess = lambda texts: tokenized.extend(texts) or preprocess(texts)
    resumed = [
        m.targets[:, 0].int().tolist()
        for m in bucketed_batches(rows.iterator(), student, 8, seed=0, skip=20)
    ]
    assert resumed == trained[20:]
    first_window = {texts[i] for batch in trained[:16] for i in batch}
    assert tokenized and not first_window & set(tokenized)


def test_cached_vectors_are_read_once_when_they_fit_in_the_object_store(ray_local):
    import ray.data
    from ray.data.dataset import MaterializedDataset

    from leaf_ray.train.dataset import held_for_epochs

    rows = ray.data.range(1000).map(lambda row: {"text": str(row["id"]), "embedding": [0.0] * 8})
    small = held_for_epochs(rows, 1000, 8)
    assert isinstance(small, MaterializedDataset)
    assert sorted(int(r["text"]) for r in small.take_all()) == list(range(1000))
    store = ray.cluster_resources()["object_store_memory"]
    assert held_for_epochs(rows, int(store), 8) is rows  # too large: read again every epoch


@pytest.mark.parametrize(("step", "workers"), [("eager", 1), ("fast", 2)])
def test_training_stops_on_a_non_finite_step_and_publishes_nothing(
    tmp_path, tiny_teacher, demo_texts, shared_caches, ray_local, step, workers
):
    """A rate this large overflows the weights to infinity within a step or two: the workers
    stop at the first non-finite gradient, which never reaches the weights. Eager: found as it
    happens; fast: skipped on the device and found at the next logged step. Every worker stops
    at the same step because each sees the same all-reduced gradient, on either path: two
    workers once are enough to show it."""
    train = {"epochs": 2, "cycles": 1, "batch_size": 16, "lr": 1e30, "warmup_ratio": 0}
    train |= {"num_workers": workers}
    config = tiny_run_config(
        tmp_path,
        demo_texts[:200],
        tiny_teacher,
        "diverges",
        shared_caches,
        train=train | {"step": step},
    )
    with pytest.raises(TrainingDiverged, match=r"not finite at step \d+ \(epoch 0\)") as stop:
        distill(load_config(config))
    # It names where the step's texts are: the first few, by file and line.
    named = re.findall(r"texts\.jsonl:(\d+)", str(stop.value))
    assert 1 <= len(named) <= 5 and all(1 <= int(line) <= 200 for line in named), stop.value
    out = tmp_path / "out"
    assert not (out / "diverges").exists()
    assert not list((out / ".diverges.partial").glob("student"))  # none copied out either


def test_kl_training_over_two_workers_ranks_held_out_texts_as_the_teacher_does(
    tmp_path, tiny_teacher, demo_texts, shared_caches, ray_local
):
    """`loss: kl` across DDP workers (each ranks the whole batch's teacher vectors, gathered), on
    batches of teacher neighbours: the held-out divergence from the teacher's ranking falls, and
    so does the training loss. In streaming mode: the teacher embeds while the student trains
    (2 CPUs: 1 for the trainers, 1 for the teacher's actor, no deadlock), every epoch, and
    nothing is cached."""
    config = tiny_run_config(
        tmp_path,
        demo_texts[:400],
        tiny_teacher,
        "kl",
        shared_caches,
        teacher={"cache_dir": str(tmp_path / "unused")},
        student={"projection_init": "random"},  # far from the teacher's ranking at first
        train={
            "data_mode": "streaming",
            "epochs": 2,
            "cycles": 1,
            "batch_size": 16,
            "lr": 1e-3,
            "loss": "kl",
            "batching": "neighbours",
            "neighbour_window": 64,  # 8 batches of 8 a window: 180 rows a worker, 3 windows
        },
    )
    run_dir = Path(distill(load_config(config)).path)
    note = json.loads((run_dir / "teacher_cache.json").read_text())
    assert note["streaming"] and note["cache"] is None and note["training_rows"] == 360
    assert not (tmp_path / "unused").exists()
    validations = [
        json.loads(line) for line in (run_dir / "validation.jsonl").read_text().splitlines()
    ]
    assert validations[-1]["val_loss"] < 0.8 * validations[0]["val_loss"]
    losses = [row["loss"] for row in history(run_dir)]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
