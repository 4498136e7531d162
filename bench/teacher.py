"""Teacher-stage throughput as a ratio to a bare PyTorch forward and to `encode()`.

    .venv/bin/python bench/teacher.py [--texts 4000] [--model NAME] [--actors 1]

Three measurements of the same model on the same texts and threads, in this process:
  bare    pre-tokenized, length-sorted batches, inference_mode forward + mean pooling (the ceiling)
  encode  sentence-transformers `encode()` with the same batch size
  stage   leaf-ray's Ray Data teacher stage (`embed_texts`, materialised), Ray already started:
          end to end on all texts (actor start-up included), and its marginal rate from the
          difference between runs on half and all of the texts (start-up cancels out)
Writes bench/results/teacher-<device>.json.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import ray
import ray.data
import torch

from leaf_ray.config import TeacherConfig
from leaf_ray.teacher import embed_texts, load_teacher

REPO = Path(__file__).resolve().parent.parent


def bare_forward(model, texts: list[str], batch_size: int) -> float:
    """Seconds for a forward over pre-tokenized, length-sorted batches (tokenizing excluded)."""
    order = np.argsort([-len(t) for t in texts])
    batches = [
        model.preprocess([texts[i] for i in order[s : s + batch_size]])
        for s in range(0, len(texts), batch_size)
    ]
    encoder = model[0].auto_model
    device = model.device
    tic = time.perf_counter()
    with torch.inference_mode():
        for features in batches:
            ids, mask = features["input_ids"].to(device), features["attention_mask"].to(device)
            tokens = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            pooled = (tokens * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
            torch.nn.functional.normalize(pooled, dim=-1).cpu()
    return time.perf_counter() - tic


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU x{os.cpu_count()}"


def run_stage(rows: list[dict], cfg: TeacherConfig) -> float:
    ds = ray.data.from_items(rows).materialize()
    tic = time.perf_counter()
    out = embed_texts(ds, cfg).materialize()
    seconds = time.perf_counter() - tic
    assert out.count() == len(rows)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=4000)
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--actors", type=int, default=1)
    args = parser.parse_args()

    with gzip.open(REPO / "data" / "demo" / "train.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in itertools.islice(f, args.texts)]
    texts = [r["text"] for r in rows]
    cpus = os.cpu_count() or 1
    torch.set_num_threads(cpus)
    cfg = TeacherConfig(
        model=args.model,
        max_seq_length=args.max_seq_length,
        batch_size=args.batch_size,
        num_actors=args.actors,
    )
    model = load_teacher(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    model.encode(texts[:256], batch_size=args.batch_size)  # warm-up

    bare = bare_forward(model, texts, args.batch_size)
    tic = time.perf_counter()
    model.encode(texts, batch_size=args.batch_size)
    encode = time.perf_counter() - tic
    del model

    ray.init(num_cpus=cpus, include_dashboard=False)
    n, half = len(texts), len(texts) // 2
    stage_half = run_stage(rows[:half], cfg)
    stage = run_stage(rows, cfg)
    ray.shutdown()

    result = {
        "model": args.model,
        "texts": n,
        "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length,
        "actors": args.actors,
        "threads": cpus,
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "seq_per_s": {
            "bare": n / bare,
            "encode": n / encode,
            "stage_end_to_end": n / stage,
            "stage_marginal": (n - half) / (stage - stage_half),
        },
        "stage_marginal_vs_bare": bare / n * (n - half) / (stage - stage_half),
        "stage_marginal_vs_encode": encode / n * (n - half) / (stage - stage_half),
        "stage_end_to_end_vs_bare": bare / stage,
    }
    print(json.dumps(result, indent=2))
    kind = "gpu" if torch.cuda.is_available() else "cpu"
    out_file = REPO / "bench" / "results" / f"teacher-{kind}.json"
    out_file.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
