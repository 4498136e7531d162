"""Teacher-stage throughput as a ratio to a bare PyTorch forward and to `encode()`.

    .venv/bin/python bench/teacher.py [--texts 8000] [--model NAME] [--actors 1] [--rounds 3]
                                      [--texts-file F]

Measurements of the same model on the same texts and threads, in this process, with Ray started
for all of them (its background processes cost the baselines what they cost the stage):
  bare           pre-tokenized batches sorted by token length over all texts, inference_mode
                 forward + mean pooling (the ceiling)
  encode         sentence-transformers `encode()` with the same batch size
  device_thread  the actor's device thread alone (`LocalTeacher._forward`) over the calls the
                 stage makes, tokenized and padded beforehand, one after another
  in_process     the teacher actor's code (`TeacherEmbedder`) called here, without Ray, on
                 those calls as the actor gets them (texts; tokens, tokenized beforehand, where
                 tokenizer actors feed it), two at a time as in the actor
  stage          leaf-ray's Ray Data teacher stage (`embed_texts`), after one warm-up run: end
                 to end on all texts (actor start-up included), and its marginal rate from the
                 difference between runs on all texts and on the first SMALL (start-up and
                 warm-up cancel out, as the warm-up is excluded from the others); where the
                 layout has tokenizer actors (GPUs), also with the teacher actor tokenizing
  tokenizer      one tokenizer actor's code (`TeacherTokenizer`) here, on one thread as in its
                 one-CPU actor, once, on the first TOKENIZER_SAMPLE texts: its rows/s, and how
                 many such actors it takes to keep up with the bare forward
`breakdown` splits stage/bare into three factors: the device thread against the bare forward
(sorting within calls, the whole sentence-transformers module), the actor's padding (and
tokenizing, where it tokenizes) alongside it, and what Ray Data (and the tokenizer actors) add.
The runs are repeated `--rounds` times, interleaved, and each ratio is taken within a round and
reported as the median over rounds: this machine's speed drifts by 10% over minutes,
which a baseline measured minutes away from the stage would count as the stage's.
All compute in the teacher's compute dtype (bf16 autocast on GPU, float32 on CPU).
Writes bench/results/teacher-<device>.json.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar
from unittest import mock

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch

from leaf_ray.config import TeacherConfig
from leaf_ray.data.sources import KINDS
from leaf_ray.teacher.actors import TeacherEmbedder, TeacherTokenizer, embed_texts, teacher_calls
from leaf_ray.teacher.layout import cluster_stage_layout
from leaf_ray.teacher.local import UNPADDED, LocalTeacher, compute_dtype, load_teacher, tokenize

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent


def autocast(device: str, dtype: torch.dtype):
    return torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)


def bare_batches(model, texts: list[str], batch_size: int) -> list[dict]:
    """The texts tokenized and padded in batches sorted by token length over all texts (the
    least padding possible); made once, outside every timed run."""
    lengths = [len(ids) for ids in model.preprocess(texts, processing_kwargs=UNPADDED)["input_ids"]]
    order = np.argsort(lengths)[::-1]
    return [
        model.preprocess([texts[i] for i in order[s : s + batch_size]])
        for s in range(0, len(texts), batch_size)
    ]


def bare_forward(model, batches: list[dict], dtype: torch.dtype) -> float:
    """Seconds for a forward over `bare_batches` (tokenizing excluded)."""
    encoder = model[0].auto_model
    device = model.device
    tic = time.perf_counter()
    with torch.inference_mode(), autocast(device.type, dtype):
        for features in batches:
            ids, mask = features["input_ids"].to(device), features["attention_mask"].to(device)
            tokens = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            pooled = (tokens * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
            torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()
    return time.perf_counter() - tic


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU x{os.cpu_count()}"


SMALL = 256
TOKENIZER_SAMPLE = 4096  # ~1.6 s of bert-base tokenizing on one core


def run_stage(rows: list[dict], cfg: TeacherConfig) -> float:
    ds = ray.data.from_items(rows).materialize()
    layout = cluster_stage_layout(cfg)
    tic = time.perf_counter()
    out = embed_texts(teacher_calls(ds, layout), cfg, layout).materialize()
    seconds = time.perf_counter() - tic
    assert out.count() == len(rows)
    return seconds


def actor_calls(
    rows: list[dict], call_rows: int, tokenizer: TeacherTokenizer | None
) -> list[dict[str, np.ndarray]]:
    """The stage's calls as its teacher actor receives them: texts, or tokens when tokenizer
    actors feed it (tokenized here beforehand)."""
    calls = []
    for call in text_tables(rows, call_rows):
        call = tokenizer(call) if tokenizer else call
        calls.append({n: call[n].to_numpy(zero_copy_only=False) for n in call.column_names})
    return calls


def text_tables(rows: list[dict], table_rows: int) -> list[pa.Table]:
    """The rows' texts and kinds, `table_rows` at a time, as Ray Data hands them to an actor."""
    return [
        pa.Table.from_pylist(
            [{"text": r["text"], "kind": r["kind"]} for r in rows[start : start + table_rows]]
        )
        for start in range(0, len(rows), table_rows)
    ]


def in_process(embedder: TeacherEmbedder, calls: list[dict[str, np.ndarray]]) -> float:
    """Seconds for the actor's code over the stage's calls, two at a time, without Ray."""
    tic = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(embedder, calls))
    return time.perf_counter() - tic


def tokenizer_actor_rate(tokenizer: TeacherTokenizer, rows: list[dict], block_rows: int) -> float:
    """Rows/s of one tokenizer actor's code over the texts, in its blocks. Its actor holds one
    CPU, so the Rust tokenizer runs on one thread."""
    blocks = text_tables(rows, block_rows)
    with mock.patch.dict(os.environ, {"TOKENIZERS_PARALLELISM": "false"}):
        tic = time.perf_counter()
        for block in blocks:
            tokenizer(block)
        return len(rows) / (time.perf_counter() - tic)


def device_thread_calls(teacher: LocalTeacher, rows: list[dict], call_rows: int) -> list[tuple]:
    """The stage's calls, each kind of each, tokenized and padded as the device thread gets
    them; made once, outside every timed run."""
    prepared = []
    for start in range(0, len(rows), call_rows):
        call = rows[start : start + call_rows]
        for kind in KINDS:
            texts = [r["text"] for r in call if r["kind"] == kind]
            if texts:
                features = tokenize(teacher.model, texts, teacher.prompts[kind])
                prepared.append(teacher._batches(features))
    return prepared


def device_thread(teacher: LocalTeacher, prepared: list[tuple]) -> float:
    """Seconds for the device thread's work alone over `device_thread_calls`."""
    tic = time.perf_counter()
    for order, batches in prepared:
        teacher._forward(order, batches)
    return time.perf_counter() - tic


def built_here(make: Callable[[], T]) -> T:
    """An actor's object, built here; the tokenizer settings it makes stay with it (the
    baselines keep theirs)."""
    saved = {name: os.environ.get(name) for name in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    made = make()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    return made


def baselines(
    model, texts: list[str], batches: list[dict], batch_size: int, dtype: torch.dtype
) -> tuple[float, float]:
    bare = bare_forward(model, batches, dtype)
    tic = time.perf_counter()
    with autocast(model.device.type, dtype):
        model.encode(texts, batch_size=batch_size)
    return bare, time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=8000)
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--texts-file", type=Path, default=REPO / "data" / "demo" / "train.jsonl.gz"
    )
    args = parser.parse_args()

    with gzip.open(args.texts_file, "rt") as f:
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
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_teacher(cfg, device)
    dtype = compute_dtype(cfg, device)
    warm_up = texts[:SMALL]
    baselines(model, warm_up, bare_batches(model, warm_up, args.batch_size), args.batch_size, dtype)
    batches = bare_batches(model, texts, args.batch_size)

    ray.init(num_cpus=cpus, include_dashboard=False)
    run_stage(rows[:SMALL], cfg)  # warm-up: worker processes, imports, file cache
    layout = cluster_stage_layout(cfg)
    call_rows = layout.rows_per_call
    # With tokenizer actors, the stage is also measured with its teacher actor tokenizing.
    in_actor = cfg.model_copy(update={"tokenizer_actors": 0}) if layout.tokenizers else None
    if in_actor:
        run_stage(rows[:SMALL], in_actor)
    embedder = built_here(lambda: TeacherEmbedder(cfg, layout.torch_threads))
    tokenizer = built_here(lambda: TeacherTokenizer(cfg))
    sample = rows[:TOKENIZER_SAMPLE]
    tokenizer_rate = tokenizer_actor_rate(tokenizer, sample, layout.rows_per_block)
    calls = actor_calls(rows, call_rows, tokenizer if layout.tokenizers else None)
    prepared = device_thread_calls(embedder.teacher, rows, call_rows)
    in_process(embedder, calls[:1])  # warm-up
    setting = {
        "model": args.model,
        "texts_file": args.texts_file.name,
        "compute_dtype": str(dtype),
        "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length,
        "actors": args.actors,
        "tokenizer_actors": layout.tokenizers,
        "threads": cpus,
        "device": device_name(),
        "command": " ".join(["python", *sys.argv]),
    }
    out_file = REPO / "bench" / "results" / f"teacher-{'gpu' if device == 'cuda' else 'cpu'}.json"
    rounds: list[dict] = []
    for _ in range(args.rounds):
        bare, encode = baselines(model, texts, batches, args.batch_size, dtype)
        alone = device_thread(embedder.teacher, prepared)
        here = in_process(embedder, calls)
        small, stage = run_stage(rows[:SMALL], cfg), run_stage(rows, cfg)
        times = {
            "bare": bare,
            "encode": encode,
            "device_thread": alone,
            "in_process": here,
            "stage_small": small,
            "stage": stage,
        }
        if in_actor:
            times["in_actor_small"] = run_stage(rows[:SMALL], in_actor)
            times["in_actor"] = run_stage(rows, in_actor)
        rounds.append(times)
        # Written after each round: a run cut short by a time limit keeps what it measured.
        result = summary(rounds, len(texts)) | setting
        result["tokenizer_actor_seq_per_s"] = tokenizer_rate
        result["tokenizer_actors_for_bare_rate"] = result["seq_per_s"]["bare"] / tokenizer_rate
        out_file.write_text(json.dumps(result, indent=2) + "\n")
    ray.shutdown()
    print(json.dumps(result, indent=2))


def summary(rounds: list[dict], n: int) -> dict:
    """Rates and ratios, each ratio taken within a round, as medians over rounds."""

    def median(values: list[float]) -> float:
        return float(np.median(values))

    def marginal(r: dict, stage: str = "stage") -> float:
        return (n - SMALL) / (r[stage] - r[f"{stage}_small"])

    in_actor = {}
    if "in_actor" in rounds[0]:
        in_actor["stage_tokenizing_in_actor_marginal_vs_bare"] = median(
            [marginal(r, "in_actor") * r["bare"] / n for r in rounds]
        )
    return {
        "texts": n,
        "rounds": len(rounds),
        "seq_per_s": {
            "bare": median([n / r["bare"] for r in rounds]),
            "encode": median([n / r["encode"] for r in rounds]),
            "device_thread": median([n / r["device_thread"] for r in rounds]),
            "in_process": median([n / r["in_process"] for r in rounds]),
            "stage_end_to_end": median([n / r["stage"] for r in rounds]),
            "stage_marginal": median([marginal(r) for r in rounds]),
        },
        "stage_marginal_vs_bare": median([marginal(r) * r["bare"] / n for r in rounds]),
        "stage_marginal_vs_encode": median([marginal(r) * r["encode"] / n for r in rounds]),
        "breakdown": {
            "device_thread_vs_bare": median([r["bare"] / r["device_thread"] for r in rounds]),
            "in_process_vs_device_thread": median(
                [r["device_thread"] / r["in_process"] for r in rounds]
            ),
            "stage_marginal_vs_in_process": median(
                [marginal(r) * r["in_process"] / n for r in rounds]
            ),
        },
        "stage_end_to_end_vs_bare": median([r["bare"] / r["stage"] for r in rounds]),
        **in_actor,
        "seconds_per_round": rounds,
    }


if __name__ == "__main__":
    main()
