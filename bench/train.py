"""Student-training throughput through Ray Train as a ratio to a bare PyTorch loop, same script.

    .venv/bin/python bench/train.py [--batch-sizes 32 256] [--texts 2048] [--workers 1]
        [--rounds 3] [--teacher NAME_OR_DIR] [--student DIR] [--texts-file F] [--streaming]
        [--fast]

The same student (default: 3-layer MiniLM-L6 layer reduction + Linear + Normalize; or --student,
a sentence-transformers folder, + Linear into the teacher's space), the same texts with
teacher-shaped random target vectors (throughput does not depend on their values), the same
AdamW step, bf16 autocast on GPU, threads and, on CPU, malloc settings (the script re-runs
itself under the workers' `cpu_worker_env()`), and the same length-sorted batches. Each side
does WARMUP_EPOCHS epochs first (a fresh process's heap grows through two on CPU); seq/s is
measured over the whole next one (for Ray Train, its data start-up included); rounds alternate
the sides and the median is kept. --fast also runs Ray Train with `train.step: fast` and the
bare loop with a fused AdamW: `fast_vs_bare` is the fast step against the eager bare loop.
--streaming also trains fed by the teacher's actors
(streaming mode): its rate against the cached run's shows what running the teacher alongside
costs.
Writes bench/results/train-<device>.json.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import ray
import ray.data
import torch
from ray.train import Checkpoint
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import batch_to_device

from leaf_ray.config import LeafConfig, StudentConfig, TeacherConfig
from leaf_ray.hashing import first_of_each, text_hashes
from leaf_ray.losses import leaf_loss
from leaf_ray.run import HISTORY, METRICS_JSONL, RAY_TRAIN
from leaf_ray.storage import Location
from leaf_ray.student import (
    build_student,
    freeze_unused,
    param_groups,
    sentence_embedding,
)
from leaf_ray.teacher.actors import embed_texts, teacher_calls
from leaf_ray.teacher.cache import TeacherCache
from leaf_ray.teacher.layout import cluster_stage_layout
from leaf_ray.teacher.local import load_teacher
from leaf_ray.teacher.space import teacher_space
from leaf_ray.train.batching import BUCKET_BATCHES, batches_per_epoch, length_sorted_batches
from leaf_ray.train.dataset import held_for_epochs
from leaf_ray.train.resources import trainer_resources
from leaf_ray.train.state import History
from leaf_ray.train.trainer import cpu_worker_env, train_student

REPO = Path(__file__).resolve().parent.parent
# Ray Train's worker is a fresh process each run and the bare loop's is not: on CPU the worker's
# heap was still growing in its second epoch (4% slower than its third, five runs), so both
# sides are measured in their third.
WARMUP_EPOCHS = 2


def allocate_as_workers() -> None:
    """On CPU, re-run this script under the train workers' malloc settings, which glibc reads
    only at start-up: the bare loop then allocates as they do, and the ratio measures Ray alone
    (with glibc's defaults the bare loop is itself a fifth slower at batch 256)."""
    workers = cpu_worker_env()
    if torch.cuda.is_available() or workers.items() <= os.environ.items():
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], os.environ | workers)


def bare_loop(
    init: str, texts: np.ndarray, targets: np.ndarray, batch: int, fused: bool = False
) -> float:
    """seq/s of a plain loop, the epoch after the warm-up, over batches made as `train_loop`
    makes them: rows shuffled anew each epoch, length-sorted in windows of BUCKET_BATCHES
    batches (so the measured epoch meets batch shapes the others did not, as Ray Train's does).
    It tokenizes inline, as plain loops do; `fused`: AdamW's fused kernel."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    student = SentenceTransformer(init, device=device)
    freeze_unused(student)
    student.train()  # dropout on, as in `train_loop` (a loaded model starts in eval mode)
    groups = param_groups(student, 2e-4, 1e-2)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01, fused=fused or None)
    window = batch * BUCKET_BATCHES
    for epoch in range(WARMUP_EPOCHS + 1):  # the last is measured
        shuffled = np.random.default_rng(epoch).permutation(len(texts))
        windows = [shuffled[start : start + window] for start in range(0, len(texts), window)]
        batches = [rows[b] for rows in windows for b in length_sorted_batches(texts[rows], batch)]
        tic = time.perf_counter()
        for rows in batches:
            features = batch_to_device(student.preprocess(texts[rows].tolist()), device)
            with autocast:
                predicted = sentence_embedding(student, features)
            loss = leaf_loss(predicted.float(), torch.from_numpy(targets[rows]).to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - tic
    return len(texts) / seconds


def ray_train(cfg: LeafConfig, init: str, ds: ray.data.Dataset, rows: int, storage: Path) -> float:
    """seq/s through `train_student` over its whole epoch after the warm-up, from the loop's
    own log: the config logs once an epoch, so that row's window is the epoch, data start-up
    included."""
    train_student(cfg, ds, rows, Checkpoint.from_directory(init), Location.of(storage))
    history = History(Location.of(storage) / RAY_TRAIN / HISTORY).read(METRICS_JSONL)
    (measured,) = [r["seq_per_s"] for r in history if r["epoch"] == WARMUP_EPOCHS]
    return measured


def cached_vectors(
    items: list[dict], hashes: np.ndarray, targets: np.ndarray, root: Path
) -> ray.data.Dataset:
    """The texts and their vectors as cached mode trains on them: from the teacher cache's
    Parquet shards (one here, as a CPU teacher actor writes for 2,048 texts)."""
    cache = TeacherCache.open(Location.of(root), {"bench": "random vectors"}, "bench")
    rows = [
        {"text_hash": h, "kind": i["kind"], "text": i["text"], "embedding": v}
        for h, i, v in zip(hashes, items, targets, strict=True)
    ]
    ray.data.from_items(rows).write_datasink(cache.sink("float32", len(rows)))
    wanted = np.sort(hashes)
    every = ray.put((wanted, None, np.zeros(len(hashes), np.int32)))  # all, from the one shard
    ranges = [(bytes(wanted[0]).ljust(16, b"\0"), bytes(wanted[-1]).ljust(16, b"\0"))]
    return held_for_epochs(cache.read(cache.scan(), every, ranges), len(rows), targets.shape[1])


def streaming_train(cfg: LeafConfig, init: str, items: list[dict], storage: Path) -> float:
    """seq/s of the same training fed by the teacher's actors as they embed (streaming mode)."""
    streaming = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"data_mode": "streaming"})}
    )
    layout = cluster_stage_layout(cfg.teacher, len(items), trainer_resources(streaming))
    texts = ray.data.from_items([{"text": i["text"], "kind": i["kind"]} for i in items])
    calls = teacher_calls(texts, layout).materialize()
    return ray_train(streaming, init, embed_texts(calls, cfg.teacher, layout), len(items), storage)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--texts", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="median of this many")
    parser.add_argument("--teacher", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--student", help="pretrained student folder (default: layer reduction)")
    parser.add_argument(
        "--texts-file", type=Path, default=REPO / "data" / "demo" / "train.jsonl.gz"
    )
    parser.add_argument(
        "--streaming", action="store_true", help="also train fed by the teacher, end to end"
    )
    parser.add_argument(
        "--fast", action="store_true", help="also train.step=fast, and the bare loop fused"
    )
    args = parser.parse_args()
    allocate_as_workers()

    with gzip.open(args.texts_file, "rt") as f:
        items = [json.loads(line) for line in itertools.islice(f, args.texts)]
    hashes = text_hashes([i["kind"] for i in items], [i["text"] for i in items])
    distinct = first_of_each(hashes)  # each (kind, text) once, as the teacher cache holds it
    items, hashes = [items[k] for k in distinct], hashes[distinct]
    texts = np.array([item["text"] for item in items])
    teacher_cfg = TeacherConfig(model=args.teacher, max_seq_length=128)
    teacher = load_teacher(teacher_cfg, "cpu")
    dim = teacher.get_embedding_dimension()
    rng = np.random.default_rng(0)
    targets = rng.standard_normal((len(texts), dim)).astype(np.float32)
    targets /= np.linalg.norm(targets, axis=1, keepdims=True)
    storage = Path(tempfile.mkdtemp(prefix="leaf-ray-bench-train-"))  # fresh: no run to resume
    init = str(storage / "student_init")
    space = teacher_space(teacher_cfg, on_gpu=False)
    student_cfg = (
        StudentConfig(init="pretrained", model=args.student) if args.student else StudentConfig()
    )
    build_student(student_cfg, space, 0, teacher).save_pretrained(init)
    cpus = os.cpu_count() or 1
    torch.set_num_threads(cpus)

    ray.init(num_cpus=cpus, include_dashboard=False)
    cached = cached_vectors(items, hashes, targets, storage / "cache")
    results: list[dict] = []
    kind = "gpu" if torch.cuda.is_available() else "cpu"
    out = {
        "teacher": args.teacher,
        "student": args.student or "layer_reduction",
        "texts": len(texts),
        "workers": args.workers,
        "threads": cpus,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "malloc_env": cpu_worker_env() if kind == "cpu" else None,
        "results": results,
        "command": " ".join(["python", *sys.argv]),
    }
    out_file = REPO / "bench" / "results" / f"train-{kind}.json"
    for batch in args.batch_sizes:
        rows_per_worker, micro_batch = len(texts) // args.workers, batch // args.workers
        cfg = LeafConfig.model_validate(
            {
                "data": {"sources": [{"path": "unused"}]},
                "teacher": teacher_cfg.model_dump(),
                "train": {
                    "num_workers": args.workers,
                    "cpus_per_worker": max(0.5, (cpus - 1) / args.workers),
                    "torch_threads": cpus // args.workers,
                    "epochs": WARMUP_EPOCHS + 1,
                    "cycles": 1,
                    "batch_size": batch,
                    "lr": 2e-4,
                    "head_lr": 1e-2,
                    "step": "eager",  # the baseline side; --fast runs "fast" too
                    # One rate window an epoch: the same batches as the bare loop's epoch.
                    "log_every": batches_per_epoch(rows_per_worker, micro_batch),
                },
            }
        )
        rounds = []
        for r in range(args.rounds):  # interleaved: a slow spell of the machine hits both sides
            bare = bare_loop(init, texts, targets, batch)
            through_ray = ray_train(cfg, init, cached, len(items), storage / f"b{batch}-{r}")
            rounds.append(
                {"bare_seq_per_s": bare, "ray_seq_per_s": through_ray, "ratio": through_ray / bare}
            )
            if args.fast:
                fast_cfg = cfg.model_copy(
                    update={"train": cfg.train.model_copy(update={"step": "fast"})}
                )
                fast = ray_train(fast_cfg, init, cached, len(items), storage / f"f{batch}-{r}")
                rounds[-1] |= {
                    "bare_fused_seq_per_s": bare_loop(init, texts, targets, batch, fused=True),
                    "ray_fast_seq_per_s": fast,
                    "fast_vs_bare": fast / bare,
                }
            if args.streaming:
                streamed = streaming_train(cfg, init, items, storage / f"s{batch}-{r}")
                rounds[-1] |= {
                    "streaming_seq_per_s": streamed,
                    "streaming_vs_cached": streamed / through_ray,
                }
            print(json.dumps({"batch": batch, "round": r} | rounds[-1]), flush=True)
        results.append({"batch": batch} | {k: median(r[k] for r in rounds) for k in rounds[0]})
        results[-1]["rounds"] = rounds
        # Written after each batch size: a run cut short by a time limit keeps what it measured.
        out_file.write_text(json.dumps(out, indent=2) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
