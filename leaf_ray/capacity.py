"""`leaf-ray plan`: how many GPUs each stage should get on a cluster, how long the run takes and
how large its teacher cache grows, from measured per-GPU throughputs and the config's corpus.

Pure arithmetic: nothing is loaded, downloaded or started. Every figure it rests on is in
`FIGURES` (with where it was measured) and every assumption is a named constant, so a new
benchmark changes one number here."""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from leaf_ray.config import LeafConfig
from leaf_ray.data.sources import data_files, is_parquet, stream_lines
from leaf_ray.storage import Location


class PlanError(ValueError):
    """A plan that cannot be made: a bad --cluster, an unsized source, an unmodelled teacher."""


@dataclass(frozen=True)
class Figure:
    """One measured throughput on one H100, in sequences per second."""

    seq_per_s: float
    what: str
    source: str


# The measurements the plan rests on: all on one H100 80GB, bf16, random weights, texts of
# ~83-133 tokens (Debian descriptions, news passages); the teacher is bert-base size, the student
# MiniLM-L6-H384 + Linear 384->768. The plan assumes texts average ~100 tokens.
FIGURES: dict[str, Figure] = {
    "teacher_stage": Figure(
        5216,
        "teacher stage, marginal: used",
        "bench/results/teacher-gpu.json stage_marginal",
    ),
    "teacher_bare": Figure(
        15685,
        "teacher bare forward: ceiling",
        "bench/results/teacher-gpu.json bare",
    ),
    "teacher_bare_news": Figure(
        13023,
        "teacher bare, 133-token news",
        "bench/results/reference-h100.json",
    ),
    "train_ray_b32": Figure(
        796,
        "Ray Train step, batch 32: used",
        "bench/results/train-gpu.json ray_seq_per_s",
    ),
    "train_bare_b32": Figure(
        1435,
        "bare train step, batch 32",
        "bench/results/reference-h100.json",
    ),
    "train_bare_b256": Figure(
        6816,
        "bare train step, batch 256",
        "bench/results/reference-h100.json",
    ),
}


BARE_BATCHES = (32, 256)  # the batches of train_bare_b32 and train_bare_b256


@dataclass(frozen=True)
class GpuType:
    name: str
    vs_h100: float  # throughput relative to the measured H100
    basis: str


GPU_TYPES: dict[str, GpuType] = {
    "H100": GpuType("H100", 1.0, "measured"),
    "H200": GpuType("H200", 1.0, "H100 figures (no H200 measurement)"),
    "A100": GpuType(
        "A100",
        0.5,
        "assumed 0.5x H100 (not measured): the ratio commonly seen for BERT-size bf16 training "
        "and inference; the dense-peak ratio 312/989 TFLOP/s = 0.32 is the pessimistic bound",
    ),
}


@dataclass(frozen=True)
class TeacherSpeed:
    dim: int
    speed: float  # throughput relative to the benchmarked bert-base teacher
    basis: str


KNOWN_TEACHERS: dict[str, TeacherSpeed] = {
    "Snowflake/snowflake-arctic-embed-m-v1.5": TeacherSpeed(
        768, 1.0, "bert-base size: as measured"
    ),
    "mixedbread-ai/mxbai-embed-large-v1": TeacherSpeed(
        1024, 1 / 3, "bert-large size (335M vs 110M parameters): 1/3 of bert-base"
    ),
    "sentence-transformers/all-MiniLM-L6-v2": TeacherSpeed(
        384, 1.0, "smaller than bert-base, not scaled up: the stage runs at 0.33x its forward"
    ),
    "sentence-transformers/all-mpnet-base-v2": TeacherSpeed(
        768,
        7452 / 13023,
        "mpnet-base forward 7,452 vs bert-base 13,023 seq/s (bench/results/reference-h100.json)",
    ),
}


UNKNOWN_TEACHER_SPEED = 1.0  # a teacher not in the table is taken to be bert-base size


# No multi-GPU training was measured: DDP's all-reduce is taken to cost 10% whenever there is
# more than one trainer (within a node or across nodes); teacher actors share nothing, so they
# scale linearly, each given the CPUs the benchmark had (16 cores per GPU).
DDP_EFFICIENCY = 0.9


# A cache row besides its vector: the 32-character text_hash, the kind, and the text itself
# (~100 tokens x ~4 bytes, uncompressed; Parquet compresses the text).
CACHE_ROW_OVERHEAD_BYTES = 32 + 8 + 400


VECTOR_BYTES = {"float32": 4, "float16": 2}


UNDERUSED_BATCH = 8  # a per-GPU batch below this leaves a GPU mostly idle


CLUSTER_FORMS = "<nodes>x(<gpus> GPU <type>), e.g. '8x(8 GPU H100)' or '1x(1 GPU A100)'"


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu: GpuType

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def label(self) -> str:
        return f"{self.nodes}x({self.gpus_per_node} GPU {self.gpu.name})"


MAX_GPUS = 100_000  # plans search over GPU splits: a typo's 10^20 GPUs would never finish


def parse_cluster(value: str) -> Cluster:
    """`8x(8 GPU H100)`: nodes x (GPUs per node, GPU type)."""
    match = re.fullmatch(r"\s*(\d+)\s*x\s*\(\s*(\d+)\s*GPUs?\s+(\w+)\s*\)\s*", value, re.I)
    types = ", ".join(GPU_TYPES)
    if not match:
        raise PlanError(f"--cluster {value!r}: expected {CLUSTER_FORMS}; types: {types}")
    nodes, per_node, name = int(match[1]), int(match[2]), match[3].upper()
    if nodes < 1 or per_node < 1:
        raise PlanError(f"--cluster {value!r}: nodes and GPUs per node must be at least 1")
    if nodes * per_node > MAX_GPUS:
        raise PlanError(f"--cluster {value!r}: more than {MAX_GPUS:,} GPUs")
    if name not in GPU_TYPES:
        raise PlanError(f"--cluster {value!r}: unknown GPU type {match[3]!r}; types: {types}")
    return Cluster(nodes, per_node, GPU_TYPES[name])


@dataclass(frozen=True)
class Corpus:
    texts: int  # distinct texts the teacher embeds (before deduplication, which only shrinks it)
    rows_per_epoch: int  # texts x their source's weight: what one epoch trains on
    basis: str  # where the sizes came from


def corpus_size(cfg: LeafConfig) -> Corpus:
    """Sources' `limit`s; a local file without one is counted (cheap); a hub one cannot be."""
    sizes, counted = [], 0
    for index, src in enumerate(cfg.data.sources):
        if src.path is not None:
            rows = count_rows(Location.of(src.path))
            sizes.append(min(rows, src.limit) if src.limit else rows)
            counted += not src.limit
        elif src.limit:
            sizes.append(src.limit)
        else:
            raise PlanError(
                f"data.sources.{index} ({src.hf_dataset}): a hub dataset has no row count "
                "without downloading it; set its 'limit' "
                f"(e.g. data.sources.{index}.limit=1000000)"
            )
    weights = [src.weight for src in cfg.data.sources]
    rows = sum(round(n * weight) for n, weight in zip(sizes, weights, strict=True))
    basis = f"{len(sizes)} source(s): {len(sizes) - counted} by limit, {counted} counted"
    return Corpus(sum(sizes), rows, basis)


def count_rows(path: Location) -> int:
    """Rows of a JSONL(.gz)/Parquet file or folder, as `data.read_texts` would read them."""
    if not path.exists():
        raise PlanError(f"data.sources: {path}: no such file or folder")
    files = data_files(path)
    try:
        if is_parquet(path):
            rows = sum(
                pq.ParquetFile(p.fs.open_input_file(p.path)).metadata.num_rows for p in files
            )
        else:
            rows = sum(_count_lines(p) for p in files)
    except (EOFError, OSError, zlib.error, pa.ArrowException) as e:
        raise PlanError(f"data.sources: {path}: cannot be read ({e})") from None
    if not rows:
        raise PlanError(f"data.sources: {path}: no texts")
    return rows


def _count_lines(path: Location) -> int:
    with path.fs.open_input_stream(path.path, compression="detect") as f:
        return sum(1 for line in stream_lines(f) if line.strip())


def teacher_rate(gpu: GpuType, teacher: TeacherSpeed) -> float:
    """seq/s of one teacher actor on one GPU: the measured stage rate, scaled by GPU and size."""
    return FIGURES["teacher_stage"].seq_per_s * gpu.vs_h100 * teacher.speed


def bare_step_seconds(per_gpu_batch: float) -> float:
    """A bare train step's time, linear in batch through the two measured points: a fixed cost
    per step (launches, optimiser) plus a cost per sequence. It interpolates between batch 32
    and 256; outside them it extrapolates."""
    (b1, b2), r1, r2 = BARE_BATCHES, FIGURES["train_bare_b32"], FIGURES["train_bare_b256"]
    per_sequence = (b2 / r2.seq_per_s - b1 / r1.seq_per_s) / (b2 - b1)
    fixed = b1 / r1.seq_per_s - b1 * per_sequence
    return fixed + per_gpu_batch * per_sequence


def train_rate(gpu: GpuType, per_gpu_batch: float) -> float:
    """seq/s of one trainer: Ray Train's measured rate at batch 32, and at other batches the
    bare rate scaled by the same Ray Train / bare ratio (796 / 1,435)."""
    ray_over_bare = FIGURES["train_ray_b32"].seq_per_s / FIGURES["train_bare_b32"].seq_per_s
    return gpu.vs_h100 * ray_over_bare * per_gpu_batch / bare_step_seconds(per_gpu_batch)


def ddp_efficiency(trainers: int) -> float:
    return 1.0 if trainers == 1 else DDP_EFFICIENCY


def trainer_counts(cfg: LeafConfig, gpus: int) -> list[int]:
    """Trainer counts that split the global batch evenly (the config's own rule), up to `gpus`."""
    parts = cfg.train.grad_accumulation
    return [g for g in range(1, gpus + 1) if cfg.train.batch_size % (g * parts) == 0]


def per_gpu_batch(cfg: LeafConfig, trainers: int) -> float:
    return cfg.train.batch_size / (trainers * cfg.train.grad_accumulation)


def training_rate(cfg: LeafConfig, gpu: GpuType, trainers: int) -> float:
    """seq/s of `trainers` DDP workers sharing the global batch."""
    return trainers * train_rate(gpu, per_gpu_batch(cfg, trainers)) * ddp_efficiency(trainers)


def cache_gib(texts: int, dim: int, vector_dtype: str) -> float:
    return texts * (dim * VECTOR_BYTES[vector_dtype] + CACHE_ROW_OVERHEAD_BYTES) / 2**30


@dataclass(frozen=True)
class Plan:
    mode: str  # train.data_mode
    cluster: Cluster
    teacher_name: str
    teacher: TeacherSpeed
    dim_basis: str
    corpus: Corpus
    epochs: int
    teacher_gpus: int
    trainer_gpus: int
    per_gpu_batch: float
    shared_gpu: bool  # streaming on one GPU: both stages take turns on it
    teacher_rate: float  # seq/s, all teacher GPUs
    train_rate: float  # seq/s, all trainers, DDP efficiency included
    teacher_rows: int
    train_rows: int
    cache_gib: float  # what cached mode writes (streaming writes nothing)

    @property
    def teacher_hours(self) -> float:
        return self.teacher_rows / self.teacher_rate / 3600

    @property
    def train_hours(self) -> float:
        return self.train_rows / self.train_rate / 3600

    @property
    def wall_hours(self) -> float:
        """cached: one stage after the other; streaming: concurrent, the slower one sets the
        pace (on a shared GPU they take turns, so their times add)."""
        if self.mode == "cached" or self.shared_gpu:
            return self.teacher_hours + self.train_hours
        return max(self.teacher_hours, self.train_hours)

    @property
    def gpu_hours(self) -> float:
        return self.cluster.gpus * self.wall_hours

    @property
    def bottleneck(self) -> str:
        return "teacher" if self.teacher_hours > self.train_hours else "train"


def teacher_for(cfg: LeafConfig, teacher_dim: int | None) -> tuple[TeacherSpeed, str]:
    """The teacher's output dim and speed: the known table, or --teacher-dim (bert-base speed)."""
    if cfg.teacher.backend != "sentence_transformers":
        raise PlanError(
            f"teacher: a {cfg.teacher.backend} teacher's throughput is not measured; "
            "plan models a local sentence-transformers teacher"
        )
    known = KNOWN_TEACHERS.get(cfg.teacher.model)
    if teacher_dim:
        speed, basis = (known.speed, known.basis) if known else (UNKNOWN_TEACHER_SPEED, "")
        return TeacherSpeed(teacher_dim, speed, basis or "assumed bert-base size"), "--teacher-dim"
    if known is None:
        names = ", ".join(KNOWN_TEACHERS)
        raise PlanError(
            f"teacher.model {cfg.teacher.model!r}: output size unknown; pass --teacher-dim "
            f"(known teachers: {names})"
        )
    return known, "known-teacher table"


def plan_run(cfg: LeafConfig, cluster: Cluster, teacher_dim: int | None = None) -> Plan:
    """The plan for the config's own data_mode."""
    return plan_mode(cfg, cluster, cfg.train.data_mode, teacher_dim)


def plan_mode(cfg: LeafConfig, cluster: Cluster, mode: str, teacher_dim: int | None) -> Plan:
    teacher, dim_basis = teacher_for(cfg, teacher_dim)
    corpus = corpus_size(cfg)
    if mode == "cached":
        teacher_gpus, trainers = cached_split(cfg, cluster)
    else:
        teacher_gpus, trainers = streaming_split(cfg, cluster, teacher)
    shared = mode == "streaming" and cluster.gpus == 1
    train_rows = cfg.train.epochs * corpus.rows_per_epoch
    return Plan(
        mode=mode,
        cluster=cluster,
        teacher_name=cfg.teacher.model,
        teacher=teacher,
        dim_basis=dim_basis,
        corpus=corpus,
        epochs=cfg.train.epochs,
        teacher_gpus=teacher_gpus,
        trainer_gpus=trainers,
        per_gpu_batch=per_gpu_batch(cfg, trainers),
        shared_gpu=shared,
        teacher_rate=teacher_gpus * teacher_rate(cluster.gpu, teacher),
        train_rate=training_rate(cfg, cluster.gpu, trainers),
        teacher_rows=corpus.texts if mode == "cached" else train_rows,
        train_rows=train_rows,
        cache_gib=cache_gib(corpus.texts, teacher.dim, cfg.teacher.vector_dtype),
    )


def cached_split(cfg: LeafConfig, cluster: Cluster) -> tuple[int, int]:
    """cached: the teacher first, on every GPU; then training on the trainer count (a divisor of
    the batch, up to every GPU) that trains fastest: more trainers split the same global batch,
    so past a point their fixed per-step cost and DDP's make them no faster."""
    trainers = max(
        trainer_counts(cfg, cluster.gpus), key=lambda g: (training_rate(cfg, cluster.gpu, g), -g)
    )
    return cluster.gpus, trainers


def streaming_split(cfg: LeafConfig, cluster: Cluster, teacher: TeacherSpeed) -> tuple[int, int]:
    """streaming: teacher actors and trainers run at once on disjoint GPUs, so the pipeline runs
    at the slower side's rate; the split (g_t + g_s = all GPUs, each at least 1) maximises it.
    One GPU: both stages share it."""
    if cluster.gpus == 1:
        return 1, 1
    per_actor = teacher_rate(cluster.gpu, teacher)

    def pipeline_rate(trainers: int) -> tuple[float, int]:
        teachers = cluster.gpus - trainers
        return min(teachers * per_actor, training_rate(cfg, cluster.gpu, trainers)), -trainers

    # One trainer always divides the batch (the config checks batch_size % grad_accumulation).
    trainers = max(trainer_counts(cfg, cluster.gpus - 1), key=pipeline_rate)
    return cluster.gpus - trainers, trainers


def notes(plan: Plan) -> list[str]:
    """Where GPUs sit idle, and what would use them."""
    out = []
    if plan.per_gpu_batch < UNDERUSED_BATCH:
        out.append(
            f"per-GPU batch {plan.per_gpu_batch:g} < {UNDERUSED_BATCH}: each trainer GPU is "
            "mostly idle; raise train.batch_size or use fewer trainers"
        )
    if plan.per_gpu_batch > max(BARE_BATCHES):
        out.append(
            f"per-GPU batch {plan.per_gpu_batch:g} > {max(BARE_BATCHES)}, the largest measured: "
            "its training rate is extrapolated"
        )
    if plan.mode == "cached" and plan.trainer_gpus < plan.cluster.gpus:
        fixed_ms = bare_step_seconds(0) * 1000
        per_sequence_ms = (bare_step_seconds(1) - bare_step_seconds(0)) * 1000
        out.append(
            f"training uses {plan.trainer_gpus} of {plan.cluster.gpus} GPUs: more trainers "
            f"splitting the same global batch are no faster (a bare step costs {fixed_ms:.1f} ms "
            f"plus {per_sequence_ms:.3f} ms per sequence); raise train.batch_size to use more"
        )
    if plan.mode == "streaming" and not plan.shared_gpu and plan.bottleneck == "train":
        needed = math.ceil(plan.train_rate / (plan.teacher_rate / plan.teacher_gpus))
        out.append(
            f"the teacher keeps up with {needed} of its {plan.teacher_gpus} GPU(s); "
            "the rest wait on the trainers"
        )
    return out


def overrides(plan: Plan) -> str:
    """The config overrides that run this split."""
    return f"teacher.num_actors={plan.teacher_gpus} train.num_workers={plan.trainer_gpus}"
