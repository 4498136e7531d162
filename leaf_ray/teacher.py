"""Teacher stage: Ray Data actors embed each text with the teacher's prompt for its kind.

A teacher is a sentence-transformers model (local, bundled or hub) or a black box that only gives
vectors: precomputed vectors in a file, or an OpenAI-compatible embeddings endpoint. All three sit
behind `embed(texts, kind)`, inside the same actor, and are keyed the same way in the cache.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.transformer import Transformer
from sentence_transformers.sentence_transformer.modules import Normalize
from transformers import AutoModel

from leaf_ray.cache import FORMAT_VERSION, text_hash
from leaf_ray.cluster import node_amounts
from leaf_ray.config import ConfigError, TeacherConfig
from leaf_ray.data import KINDS, DataError, data_files, is_parquet
from leaf_ray.http_teacher import HttpEmbedder
from leaf_ray.models import files_sha256, resolve_model

PROBE_TEXTS = ["leaf-ray probe: what space do your vectors live in?", "a second probe text"]


def load_teacher(
    cfg: TeacherConfig, device: str | None = None, check_pin: bool = True
) -> SentenceTransformer:
    model = SentenceTransformer(resolve_model(cfg, check_pin), device=device, revision=cfg.revision)
    model.max_seq_length = cfg.max_seq_length
    return model


def teacher_prompts(
    cfg: TeacherConfig, model: SentenceTransformer | None = None
) -> dict[str, str | None]:
    """Config prompts win; otherwise the teacher model's own `query`/`document` prompts, if any."""
    own = model.prompts if model is not None else {}
    return {
        "query": cfg.query_prompt if cfg.query_prompt is not None else own.get("query"),
        "document": (
            cfg.document_prompt if cfg.document_prompt is not None else own.get("document")
        ),
    }


def normalizes(model: SentenceTransformer) -> bool:
    return any(isinstance(module, Normalize) for module in model)


def compute_dtype(cfg: TeacherConfig, device: str) -> torch.dtype:
    if cfg.compute_dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, cfg.compute_dtype)


class Teacher(Protocol):
    def embed(self, texts: list[str], kind: str) -> np.ndarray: ...


class LocalTeacher:
    """A sentence-transformers model run by hand rather than through `encode()`:
    - a call is tokenized once, unpadded, by the model's own `preprocess` (prompts included),
      here or beforehand by `TeacherTokenizer` actors, then batched by exact token length, so
      batches carry almost no padding;
    - in a threaded actor the next call is tokenized and padded while this one runs on the
      device: the device thread only copies batches over and runs the model;
    - autocast (bf16 on GPU by default), and one device-to-host copy per call."""

    def __init__(self, cfg: TeacherConfig, device: str):
        self.model = load_teacher(cfg, device).eval()
        self.device, self.batch_size = device, cfg.batch_size
        self.dtype = compute_dtype(cfg, device)
        self.prompts = teacher_prompts(cfg, self.model)
        # What `preprocess` gives per call rather than per row (modality, prompt length).
        self.per_call = {
            kind: {
                name: value
                for name, value in tokenize(self.model, ["x"], self.prompts[kind]).items()
                if not isinstance(value, list)
            }
            for kind in KINDS
        }
        self.tokenizing = threading.Lock()
        # Every forward runs on this one thread: one device queue, and on CPU one OpenMP team
        # (a team per calling thread would spin against the other on the same cores).
        self.device_thread = ThreadPoolExecutor(max_workers=1)
        if device == "cuda":
            self._warm_up()

    def _warm_up(self) -> None:
        """One full batch at every padded width, longest first: measured on an H100, a call whose
        shapes are new ran at a third of the speed of the same call again (allocator growth and
        kernel selection), which would otherwise be paid during the stage."""
        sample = tokenize(self.model, ["warm up"], None)
        limit = self.model.max_seq_length
        widths = {padded_width(n, limit, True) for n in range(1, limit + 1)}
        for width in sorted(widths, reverse=True):
            features = {
                name: [values[0][:1] * width] * self.batch_size
                if isinstance(values, list)
                else values
                for name, values in sample.items()
            }
            self._forward(*self._batches(features))

    def embed(self, texts: list[str], kind: str) -> np.ndarray:
        with self.tokenizing:
            features = tokenize(self.model, texts, self.prompts[kind])
            order, batches = self._batches(features)
        return self.device_thread.submit(self._forward, order, batches).result()

    def embed_tokens(self, tokens: dict[str, np.ndarray], kind: str) -> np.ndarray:
        """Rows tokenized by `TeacherTokenizer` (one array of token values per row and name)."""
        order, batches = self._batches(tokens | self.per_call[kind])
        return self.device_thread.submit(self._forward, order, batches).result()

    def _batches(self, features: dict) -> tuple[np.ndarray, list[dict]]:
        """The rows longest first, cut into padded batches (host tensors, pinned on GPU)."""
        order = np.argsort([-len(ids) for ids in features["input_ids"]], kind="stable")
        starts = range(0, len(order), self.batch_size)
        return order, [self._pad(features, order[s : s + self.batch_size]) for s in starts]

    def _forward(self, order: np.ndarray, batches: list[dict]) -> np.ndarray:
        autocast = (
            torch.autocast(device_type=self.device, dtype=self.dtype)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        out = []
        with torch.inference_mode(), autocast:
            for batch in batches:
                on_device = {
                    name: value.to(self.device, non_blocking=True)
                    if isinstance(value, torch.Tensor)
                    else value
                    for name, value in batch.items()
                }
                out.append(self.model(on_device)["sentence_embedding"].float())
        vectors = torch.cat(out).cpu().numpy()
        result = np.empty_like(vectors)
        result[order] = vectors
        return result

    def _pad(self, features: dict, rows: np.ndarray) -> dict:
        """Pad the chosen rows to their longest, on the tokenizer's side, in one masked copy per
        name. Hand-written: the tokenizer's own `pad` is slow Python for fast tokenizers, and
        another thread may be tokenizing with that tokenizer meanwhile."""
        tokenizer = self.model.tokenizer
        lengths = np.array([len(features["input_ids"][i]) for i in rows])
        width = padded_width(int(lengths.max()), self.model.max_seq_length, self.device == "cuda")
        filled = np.arange(width) < lengths[:, None]
        if tokenizer.padding_side == "left":
            filled = filled[:, ::-1]
        batch = {}
        for name, values in features.items():
            if not isinstance(values, list | np.ndarray):  # modality, prompt_length: per call
                batch[name] = values
                continue
            fill = tokenizer.pad_token_id if name == "input_ids" else 0
            padded = np.full((len(rows), width), fill, dtype=np.int64)
            padded[filled] = np.concatenate([values[i] for i in rows])
            tensor = torch.from_numpy(padded)
            # Pinned: the copy to the device is asynchronous and overlaps the running forward.
            batch[name] = tensor.pin_memory() if self.device == "cuda" else tensor
        return batch


UNPADDED = {"text": {"padding": False}, "common": {"return_tensors": None}}
TOKENS = "_teacher_tokens."  # column prefix for token values between the tokenizer and teacher


def tokenize(model: SentenceTransformer, texts: list[str], prompt: str | None) -> dict:
    """The model's own `preprocess` (prompt, truncation, special tokens), unpadded: a list of
    values per row for each per-row name."""
    return model.preprocess(texts, prompt=prompt, processing_kwargs=UNPADDED)


def load_without_weights(cfg: TeacherConfig) -> SentenceTransformer:
    """The teacher's modules and tokenizer, its encoder built empty on the meta device: all
    `preprocess` needs, without a copy of the weights in every tokenizer actor (a 7B teacher
    would take 28 GB each). Hand-written: transformers builds empty models only through
    accelerate. Where the encoder cannot be built so (a sentence-transformers without
    `Transformer._load_model`, a model class `AutoModel` does not know), the weights load.
    Either way no vector comes from these weights: their sha256 pin is left to the actors that
    embed, rather than every tokenizer actor fetching and hashing them."""

    def empty_encoder(module: Transformer, name: str, task: str, config, *args, **kwargs):
        with torch.device("meta"):
            return AutoModel.from_config(config)

    try:
        with mock.patch.object(Transformer, "_load_model", empty_encoder):
            return load_teacher(cfg, "meta", check_pin=False)
    except (AttributeError, ValueError, KeyError):
        return load_teacher(cfg, "cpu", check_pin=False)


class TeacherTokenizer:
    """A CPU Ray Data actor that tokenizes calls for GPU teacher actors. Tokenizing in the
    teacher's process holds its GIL ~70 µs a row (transformers' and sentence-transformers'
    Python around the Rust tokenizer, profiled on CPU): a ceiling near 14k rows/s, below what
    one GPU runs bert-base at, and taken from the thread that feeds the GPU."""

    def __init__(self, cfg: TeacherConfig):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core each: the actor reserves one
        self.model = load_without_weights(cfg)
        self.prompts = teacher_prompts(cfg, self.model)

    def __call__(self, calls: pa.Table) -> pa.Table:
        kinds = calls["kind"].to_numpy(zero_copy_only=False)
        texts = calls["text"].to_pylist()
        columns: dict[str, list] = {}
        for kind in KINDS:
            rows = np.flatnonzero(kinds == kind)
            if rows.size:
                features = tokenize(self.model, [texts[i] for i in rows], self.prompts[kind])
                for name, values in features.items():
                    if isinstance(values, list):
                        column = columns.setdefault(name, [None] * len(texts))
                        for row, value in zip(rows, values, strict=True):
                            column[row] = value
        for name, column in columns.items():
            calls = calls.append_column(TOKENS + name, pa.array(column, pa.list_(pa.int32())))
        return calls


def padded_width(longest: int, limit: int, on_gpu: bool) -> int:
    """On GPU, widths in steps of 8 (up to `limit`): tensor-core friendly, and fewer distinct
    shapes to warm up. Not on CPU: on short real texts (median 13 tokens) it added 13% of
    tokens."""
    return min(-(-longest // 8) * 8, max(longest, limit)) if on_gpu else longest


class VectorsTeacher:
    """Precomputed vectors, matched to texts by the hash of (kind, text)."""

    def __init__(self, cfg: TeacherConfig):
        self.path = cfg.vectors
        table = read_vectors_file(cfg.vectors)
        hashes = [
            text_hash(k, t)
            for k, t in zip(table["kind"].to_pylist(), table["text"].to_pylist(), strict=True)
        ]
        self.row = {h: i for i, h in enumerate(hashes)}
        self.vectors = vector_rows(table, cfg.vectors)

    def embed(self, texts: list[str], kind: str) -> np.ndarray:
        rows = [self.row.get(text_hash(kind, t)) for t in texts]
        missing = [t for t, r in zip(texts, rows, strict=True) if r is None]
        if missing:
            raise DataError(
                f"teacher.vectors: {self.path}: no vector for {len(missing)} {kind} text(s), "
                f"e.g. {missing[0][:80]!r}"
            )
        return self.vectors[rows]


def read_vectors_file(path: str) -> pa.Table:
    """Parquet or JSON lines with `kind`, `text` and `embedding` (other columns are ignored)."""
    file = Path(path)
    if not file.exists():
        raise DataError(f"teacher.vectors: {path}: no such file or folder")
    try:
        if is_parquet(file):
            table = pq.read_table([str(f) for f in data_files(file)])
        else:
            table = pa.concat_tables(
                [pyarrow.json.read_json(f) for f in data_files(file)], promote_options="default"
            )
    except (pa.ArrowInvalid, OSError, ValueError) as e:  # ValueError: a folder with no files
        raise DataError(f"teacher.vectors: {path}: cannot read: {e}") from None
    absent = {"kind", "text", "embedding"} - set(table.column_names)
    if absent:
        raise DataError(f"teacher.vectors: {path}: missing column(s) {sorted(absent)}")
    return table


def vector_rows(table: pa.Table, path: str) -> np.ndarray:
    """The `embedding` column as a float32 matrix, refused with the first bad row named: no
    rows, a missing vector, a vector of another length than the first's, or a value that is
    not finite (a NaN would train the student to NaN)."""
    where = f"teacher.vectors: {path}"
    if table.num_rows == 0:
        raise DataError(f"{where}: no rows")
    column = table["embedding"].combine_chunks()
    if column.null_count:
        row = column.is_null().to_numpy(zero_copy_only=False).argmax()
        raise DataError(f"{where}: row {row + 1}: embedding: missing")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    odd = np.flatnonzero(lengths != lengths[0])
    if odd.size:
        raise DataError(
            f"{where}: row {odd[0] + 1}: embedding: {lengths[odd[0]]} values where row 1 has "
            f"{lengths[0]}" + _more(odd.size)
        )
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32)
    vectors = values.reshape(len(lengths), int(lengths[0]))
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        raise DataError(
            f"{where}: row {bad[0] + 1}: embedding: not finite (NaN or infinity)" + _more(bad.size)
        )
    return vectors


def _more(rows: int) -> str:
    return f" (and {rows - 1} more rows)" if rows > 1 else ""


def vectors_normalized(vectors: np.ndarray, path: str, declared: bool | None) -> bool:
    """Whether precomputed vectors are unit length: measured on every row, and refused when only
    some are (one stray row would otherwise decide whether the student normalises) or when
    `teacher.normalized: true` says they are and they are not."""
    unit = np.isclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-2)
    if unit.any() and not unit.all():
        row = int(np.flatnonzero(~unit)[0])
        raise DataError(
            f"teacher.vectors: {path}: row {row + 1}: embedding: norm "
            f"{np.linalg.norm(vectors[row]):.3f} where {unit.sum()} of {len(unit)} rows are unit "
            "length; fix the row, or normalise them all"
        )
    if declared and not unit.all():
        raise DataError(
            f"teacher.vectors: {path}: teacher.normalized is true, but the vectors are not unit "
            f"length (row 1: norm {np.linalg.norm(vectors[0]):.3f})"
        )
    return bool(unit.all()) if declared is None else declared


class HttpTeacher:
    """An OpenAI-compatible endpoint; prompts (from the config) are prepended to the text. One
    call at a time per actor, so `max_concurrency` and the rate limit hold per actor."""

    def __init__(self, cfg: TeacherConfig):
        http = cfg.http
        self.prompts = teacher_prompts(cfg)
        self.one_call = threading.Lock()
        key = os.environ.get(http.api_key_env) if http.api_key_env else None
        self.client = HttpEmbedder(http, cfg.model, key)

    def embed(self, texts: list[str], kind: str) -> np.ndarray:
        prompt = self.prompts[kind] or ""
        with self.one_call:
            return self.client.embed([prompt + t for t in texts])


def open_teacher(cfg: TeacherConfig, device: str = "cpu") -> Teacher:
    if cfg.backend == "vectors":
        return VectorsTeacher(cfg)
    if cfg.backend == "http":
        return HttpTeacher(cfg)
    return LocalTeacher(cfg, device)


class TeacherEmbedder:
    """One Ray Data actor: holds the teacher (on its GPU, if any) and embeds a batch, kind by
    kind, each kind with its own prompt; from the texts, or from `TeacherTokenizer`'s tokens."""

    def __init__(self, cfg: TeacherConfig, torch_threads: int):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":  # on CPU the cores belong to the forward
            os.environ["TOKENIZERS_PARALLELISM"] = "true"
            os.environ["RAYON_NUM_THREADS"] = str(torch_threads)
        torch.set_num_threads(torch_threads)  # Ray sets OMP_NUM_THREADS=1 in workers
        self.teacher = open_teacher(cfg, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = {name: v for name, v in batch.items() if name.startswith(TOKENS)}
        embeddings = None
        for kind in KINDS:
            rows = batch["kind"] == kind
            if not rows.any():
                continue
            if tokens:
                own = {name.removeprefix(TOKENS): values[rows] for name, values in tokens.items()}
                vectors = self.teacher.embed_tokens(own, kind)
            else:
                vectors = self.teacher.embed(batch["text"][rows].tolist(), kind)
            if embeddings is None:
                embeddings = np.empty((len(rows), vectors.shape[1]), dtype=np.float32)
            embeddings[rows] = vectors
        rest = {name: values for name, values in batch.items() if name not in tokens}
        return {**rest, "embedding": embeddings}


@dataclass(frozen=True)
class StageLayout:
    """How the teacher stage runs: what each teacher actor reserves and runs with, how many
    tokenizer actors feed them, and the rows in each teacher call and each input block."""

    gpus: float
    cpus: float
    torch_threads: int
    tokenizers: int
    rows_per_call: int
    rows_per_block: int


TOKENIZERS_PER_GPU = 16
BLOCKS_PER_CALL = 8  # with tokenizer actors, a block is an eighth of a teacher call


def stage_layout(
    cfg: TeacherConfig,
    free: dict[str, float],
    node_cpus: list[float],
    num_rows: int | None = None,
) -> StageLayout:
    """On GPUs, each teacher actor reserves one CPU, and tokenizer actors (one CPU each) take the
    CPUs left but one per node for Ray Data's tasks, up to 16 per teacher actor: one core
    tokenizes ~2,600 real passages a second for bert-base (measured here), one H100 runs its
    forward at 13-18k. With none to spare, a teacher actor tokenizes with the CPUs that come
    with its GPU. On CPUs the forward dwarfs tokenizing, so the actors do it themselves unless
    `tokenizer_actors` says otherwise.

    A call is sorted by token length once, so larger calls carry less padding; on GPUs they are
    smaller (the GPU waits for its first), and `num_rows`, when known, keeps calls small enough
    to give every actor work. Blocks are one call each, but for tokenizer actors: theirs are
    an eighth of a call, so that many tokenize one call's rows at once (one core takes 1.6 s
    over a 4,096-passage call, as `batch_size: 256` makes: the GPU's wait for its first)."""
    on_gpus = free.get("GPU", 0) > 0 and cfg.backend == "sentence_transformers"
    # CPUs left once each node keeps one for Ray Data and the teacher actors have theirs (on
    # CPUs, at least one between them): more tokenizer actors would wait for CPUs forever.
    spare = int(free["CPU"] - len(node_cpus) - (cfg.num_actors if on_gpus else 1))
    if (cfg.tokenizer_actors or 0) > max(spare, 0):
        raise ConfigError(
            f"teacher.tokenizer_actors: {cfg.tokenizer_actors} (a CPU each) do not fit: the "
            f"cluster has {free['CPU']:g} CPUs free for the teacher stage; at most {max(spare, 0)}"
        )
    if on_gpus:
        default = max(0, min(TOKENIZERS_PER_GPU * cfg.num_actors, spare))
        tokenizers = default if cfg.tokenizer_actors is None else cfg.tokenizer_actors
        per_gpu = max(1, int(free["CPU"] // free["GPU"]) - 1)
        gpus, cpus = min(1.0, free["GPU"] / cfg.num_actors), 1.0
        threads = 1 if tokenizers else per_gpu
    else:
        tokenizers = cfg.tokenizer_actors or 0
        cpus, threads = cpu_actor_share(free["CPU"] - tokenizers, node_cpus, cfg.num_actors)
        gpus = 0
    rows_per_call = cfg.batch_size * (16 if on_gpus else 128)
    if num_rows is not None:
        rows_per_call = max(cfg.batch_size, min(rows_per_call, -(-num_rows // cfg.num_actors)))
    rows_per_block = rows_per_call
    if tokenizers:
        rows_per_block = max(cfg.batch_size, -(-rows_per_call // BLOCKS_PER_CALL))
    return StageLayout(gpus, cpus, threads, tokenizers, rows_per_call, rows_per_block)


def cluster_stage_layout(
    cfg: TeacherConfig, num_rows: int | None = None, held_elsewhere: dict[str, float] | None = None
) -> StageLayout:
    """`stage_layout` on this Ray cluster. `held_elsewhere`: resources the trainers hold while
    the teacher streams into them (streaming mode); the teacher stage shares the rest."""
    free = dict(ray.cluster_resources())
    for name, amount in (held_elsewhere or {}).items():
        free[name] = free.get(name, 0) - amount
    return stage_layout(cfg, free, node_amounts("CPU"), num_rows)


def teacher_calls(texts: ray.data.Dataset, layout: StageLayout) -> ray.data.Dataset:
    """The texts in the layout's blocks, ready for `embed_texts`."""
    return texts.repartition(target_num_rows_per_block=layout.rows_per_block)


def embed_texts(
    calls: ray.data.Dataset, cfg: TeacherConfig, layout: StageLayout
) -> ray.data.Dataset:
    """Add the teacher's `embedding` column to `teacher_calls` blocks; lazy, so it can feed
    training or be written out."""
    if layout.tokenizers:
        calls = calls.map_batches(
            TeacherTokenizer,
            fn_constructor_kwargs={"cfg": cfg},
            batch_size=layout.rows_per_block,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=layout.tokenizers),
            num_cpus=1,
        )
    # Two calls run at once in an actor (threads): one is tokenized or padded while the other
    # computes.
    return calls.map_batches(
        TeacherEmbedder,
        fn_constructor_kwargs={"cfg": cfg, "torch_threads": layout.torch_threads},
        batch_size=layout.rows_per_call,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            size=cfg.num_actors,
            max_tasks_in_flight_per_actor=3,
            max_concurrent_calls_per_actor=2,
            enable_true_multi_threading=True,  # safe: one device thread per teacher
        ),
        num_gpus=layout.gpus,
        num_cpus=layout.cpus,  # Ray Data spreads its actors over the nodes by default
    )


def cpu_actor_share(free_cpus: float, node_cpus: list[float], num_actors: int) -> tuple[float, int]:
    """CPUs each CPU actor reserves, and its torch threads. The actors reserve all but one CPU
    per node, so Ray Data's read, repartition and write tasks (a whole CPU each) can always be
    scheduled (otherwise the pipeline deadlocks); torch uses them all. An actor lives on one
    node, so neither exceeds the largest node's (a reservation no node can meet waits forever)."""
    largest = max(node_cpus)
    share = max(free_cpus - len(node_cpus), free_cpus / 2) / num_actors
    reserved = min(share, max(largest - 1, largest / 2))
    return reserved, max(1, min(round(free_cpus / num_actors), int(largest)))


@dataclass(frozen=True)
class TeacherSpace:
    """What the student has to match, and everything that changes a vector (the cache key)."""

    key: dict

    @property
    def dimension(self) -> int:
        return self.key["dimension"]

    @property
    def normalized(self) -> bool:
        return self.key["normalized"]


def teacher_space(cfg: TeacherConfig, on_gpu: bool) -> TeacherSpace:
    """Identify the teacher without running the stage: weights hash (or endpoint, or vectors file
    hash), prompts, length, modules (pooling, normalisation), compute and storage dtypes."""
    key = {"format": FORMAT_VERSION, "vector_dtype": cfg.vector_dtype}
    if cfg.backend == "sentence_transformers":
        model = load_teacher(cfg, "cpu")
        weights = cfg.sha256 or _weights_sha256(Path(model[0].auto_model.name_or_path))
        key |= {
            # The weights, not the name or folder, say which teacher this is.
            "teacher": (
                {"weights_sha256": weights}
                if weights
                else {"model": cfg.model, "revision": cfg.revision}
            ),
            "modules": [[type(m).__name__, _module_config(m)] for m in model],
            "prompts": teacher_prompts(cfg, model),
            "max_seq_length": cfg.max_seq_length,
            "compute_dtype": str(compute_dtype(cfg, "cuda" if on_gpu else "cpu")),
            "dimension": model.get_embedding_dimension(),
            "normalized": normalizes(model),
        }
        return TeacherSpace(key)
    if cfg.backend == "vectors":
        vectors = vector_rows(read_vectors_file(cfg.vectors), cfg.vectors)
        key["teacher"] = {"vectors_sha256": files_sha256(Path(cfg.vectors))}
        key |= {
            "dimension": int(vectors.shape[1]),
            "normalized": vectors_normalized(vectors, cfg.vectors, cfg.normalized),
        }
        return TeacherSpace(key)
    probe = HttpTeacher(cfg).embed(PROBE_TEXTS, "query")
    http = cfg.http
    key["teacher"] = {"model": cfg.model, "url": http.url, "dimensions": http.dimensions}
    key["prompts"] = teacher_prompts(cfg)
    measured = bool(np.allclose(np.linalg.norm(probe, axis=1), 1.0, atol=1e-2))
    key |= {
        "dimension": int(probe.shape[1]),
        "normalized": cfg.normalized if cfg.normalized is not None else measured,
    }
    return TeacherSpace(key)


def _module_config(module: torch.nn.Module) -> dict:
    get = getattr(module, "get_config_dict", None)
    return get() if get else {}


def _weights_sha256(folder: Path) -> str | None:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return files_sha256(*files) if files else None
