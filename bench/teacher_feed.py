"""How much of a GPU the teacher stage's GPU layout keeps busy, measured on any machine.

    .venv/bin/python bench/teacher_feed.py [--rate 13000] [--texts 96000] [--tokenized-here]
                                           [--cpus N] [--model NAME] [--rounds 2]

Ray is started declaring one GPU, so `embed_texts` lays the stage out as on a GPU machine
(tokenizer actors, as the CPUs allow, feeding a teacher actor that pads and runs the model). The
teacher actor's device thread is replaced by a stand-in that takes 1/RATE s a row and releases
the GIL, as a CUDA forward does (RATE: a bert-base forward on an H100 runs 13,023 rows/s). The
ratio reported is the stage's marginal rate (a run on all texts minus one on the first SMALL,
so start-up cancels out) to RATE: the share of such a GPU's time the stage keeps it busy.

`--tokenized-here` tokenizes the texts in this process beforehand and runs the stage without
tokenizer actors: what Ray Data and the teacher actor's own work (converting, sorting, padding)
cost at the GPU's rate. Without it the tokenizer actors are part of the measurement, and on a
machine with fewer cores than a GPU machine has they, not Ray, set the rate.
Writes bench/results/teacher-feed-<tokenized-here|tokenizer-actors>-cpu.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import itertools
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow as pa
import ray
import ray.data

import leaf_ray.teacher.actors
from leaf_ray.config import TeacherConfig
from leaf_ray.teacher.actors import TeacherEmbedder, TeacherTokenizer, embed_texts, teacher_calls
from leaf_ray.teacher.layout import StageLayout, cluster_stage_layout

REPO = Path(__file__).resolve().parent.parent
SMALL = 2048


def stand_in(rate: float) -> type[TeacherEmbedder]:
    """`TeacherEmbedder` whose device thread waits 1/rate s a row instead of running the model."""

    class StandInEmbedder(TeacherEmbedder):
        def __init__(self, cfg: TeacherConfig, torch_threads: int):
            super().__init__(cfg, torch_threads)
            dimension = self.teacher.model.get_embedding_dimension()

            def forward(order: np.ndarray, batches: list[dict]) -> np.ndarray:
                time.sleep(len(order) / rate)
                return np.zeros((len(order), dimension), np.float32)

            self.teacher._forward = forward

    return StandInEmbedder


def run_stage(table: pa.Table, cfg: TeacherConfig, layout: StageLayout, rate: float) -> float:
    """Seconds for the stage over `table` (one block, as a file read gives), actors started
    within."""
    texts = ray.data.from_arrow(table).materialize()
    with mock.patch.object(leaf_ray.teacher.actors, "TeacherEmbedder", stand_in(rate)):
        stage = embed_texts(teacher_calls(texts, layout), cfg, layout)
    tic = time.perf_counter()
    rows = stage.materialize().count()
    seconds = time.perf_counter() - tic
    assert rows == table.num_rows
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=13023)
    parser.add_argument("--texts", type=int, default=96000)
    parser.add_argument("--tokenized-here", action="store_true")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs Ray declares")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--texts-file", type=Path, default=REPO / "data" / "demo" / "train.jsonl.gz"
    )
    args = parser.parse_args()

    with gzip.open(args.texts_file, "rt") as f:
        rows = [json.loads(line) for line in f]
    rows = list(itertools.islice(itertools.cycle(rows), args.texts))  # repeated: same work
    table = pa.table({"kind": [r["kind"] for r in rows], "text": [r["text"] for r in rows]})
    cfg = TeacherConfig(
        model=args.model, batch_size=args.batch_size, max_seq_length=args.max_seq_length
    )
    ray.init(num_cpus=args.cpus, num_gpus=1, include_dashboard=False)
    layout = cluster_stage_layout(cfg)
    if args.tokenized_here:
        table = TeacherTokenizer(cfg)(table)
        layout = dataclasses.replace(layout, tokenizers=0, rows_per_block=layout.rows_per_call)
    run_stage(table.slice(0, SMALL), cfg, layout, args.rate)  # warm-up: workers, imports
    rounds = []
    for _ in range(args.rounds):
        small = run_stage(table.slice(0, SMALL), cfg, layout, args.rate)
        whole = run_stage(table, cfg, layout, args.rate)
        rounds.append({"small": small, "all": whole})
        print(json.dumps(rounds[-1]), flush=True)
    ray.shutdown()
    marginal = [(len(rows) - SMALL) / (r["all"] - r["small"]) for r in rounds]
    mode = "tokenized-here" if args.tokenized_here else "tokenizer-actors"
    result = {
        "rate": args.rate,
        "texts": len(rows),
        "texts_file": args.texts_file.name,
        "model": args.model,
        "layout": dataclasses.asdict(layout),
        "cpus_declared": args.cpus,
        "cpus_here": os.cpu_count(),
        "marginal_seq_per_s": float(np.median(marginal)),
        "marginal_vs_rate": float(np.median(marginal)) / args.rate,
        "seconds_per_round": rounds,
        "command": " ".join(["python", *sys.argv]),
    }
    out_file = REPO / "bench" / "results" / f"teacher-feed-{mode}-cpu.json"
    out_file.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
