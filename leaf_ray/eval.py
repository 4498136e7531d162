"""Evaluation stage, through mteb, fanned out on Ray.

1. One Ray task per (model, eval task) embeds the task's queries and documents, as mteb feeds
   them, unless the eval cache already holds them: vectors are keyed by the model's files and
   prompts and by the task's data, so the teacher's document embeddings are computed once and
   reused by every later student, checkpoint and mode.
2. One Ray task per (eval task, mode, dimension, precision) runs mteb's retrieval evaluation over
   those vectors (Matryoshka-truncated, quantized), and returns mteb's TaskResult.
Vectors pass from phase 1 to phase 2 through the eval cache, never through the driver: the tasks
write and read it themselves (a large corpus streams to disk as it is embedded), and each
scoring task asks Ray for the memory its vectors take.

Modes: the teacher; the pretrained student model alone, as the user had it (its own encoder and
pooling, no projection; when the student is pretrained); the student as training starts (its
projection fitted) and the distilled student; and LEAF's asymmetric mode (student queries against
the teacher's document index), before and after training.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from sentence_transformers.util.quantization import quantize_embeddings

from leaf_ray.cache import embedding_column
from leaf_ray.cluster import node_amounts
from leaf_ray.config import EvalConfig, TeacherConfig
from leaf_ray.data import load_beir
from leaf_ray.models import files_sha256
from leaf_ray.progress import progress
from leaf_ray.storage import Location
from leaf_ray.teacher import HttpTeacher

if TYPE_CHECKING:
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.models.model_meta import ModelMeta
    from mteb.results import TaskResult

# mode -> (model encoding the queries, model encoding the documents)
MODES = {
    "teacher": ("teacher", "teacher"),
    "pretrained": ("pretrained", "pretrained"),
    "student_init": ("student_init", "student_init"),
    "student": ("student", "student"),
    "asymmetric_init": ("student_init", "teacher"),
    "asymmetric": ("student", "teacher"),
}
# mode -> the mode it started from: distillation's change is the difference
STARTS = {"student_init": "pretrained", "student": "student_init", "asymmetric": "asymmetric_init"}
SIDES = ("query", "document")
NOT_MODEL = {".jsonl", ".md", ".pt"}  # in a model folder: logs, model cards, training state


class EvalError(ValueError):
    """An eval task that cannot be found or is not a retrieval task."""


@dataclass(frozen=True)
class Encoder:
    """A model to evaluate: what to load, the name mteb records, and each side's prompt."""

    name: str  # hub name, or leaf-ray/<run>-<role> for a run's students
    model: str  # local folder or hub name
    revision: str | None = None
    prompts: dict[str, str | None] = field(default_factory=dict)  # "query"/"document" -> prompt
    endpoint: TeacherConfig | None = None  # a black-box teacher embedding through its HTTP API
    # The same folder in the run's object store, for a node that cannot see `model`: a run on
    # s3:// or gs:// is evaluated from the driver's disk, and its tasks may land on any node.
    stored: Location | None = None

    def key(self, max_seq_length: int) -> str:
        """Everything that changes a vector: the files of a local model (weights, pooling,
        tokenizer; not logs, cards or training state), the hub name and revision, or the
        endpoint and model served there; the prompts; the max length."""
        digest = hashlib.sha256()
        folder = Path(self.model)
        if self.endpoint is not None:
            http = self.endpoint.http
            digest.update(json.dumps([http.url, self.model, http.dimensions]).encode())
        elif folder.is_dir():
            files = (p for p in folder.rglob("*") if p.is_file() and p.suffix not in NOT_MODEL)
            for path in sorted(files):
                digest.update(str(path.relative_to(folder)).encode())
                digest.update(files_sha256(path).encode())
        else:
            digest.update(f"{self.model}@{self.revision or 'main'}".encode())
        digest.update(json.dumps([self.prompts, max_seq_length], sort_keys=True).encode())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class EvalTask:
    """A retrieval task: a local BEIR-layout folder, or an mteb task by name."""

    name: str
    revision: str  # the data's content hash (local) or the dataset revision (mteb)
    main_score: str = "ndcg_at_10"
    folder: str | None = None
    split: str = "test"

    def load(self) -> AbsTaskRetrieval:
        import mteb

        return mteb.get_task(self.name) if self.folder is None else _local_task(self)


def resolve_tasks(cfg: EvalConfig) -> list[EvalTask]:
    """Local folders (their data is validated and hashed here) and mteb tasks or benchmarks by
    name (metadata only: nothing is downloaded until a task runs)."""
    tasks = [
        EvalTask(Path(f).name, _folder_revision(Path(f), cfg.split), folder=f, split=cfg.split)
        for f in cfg.datasets
    ]
    if cfg.mteb_tasks:
        import mteb

        for name in cfg.mteb_tasks:
            for task in _mteb_tasks(mteb, name):
                meta = task.metadata
                if meta.type != "Retrieval":
                    raise EvalError(
                        f"eval.mteb_tasks: {meta.name} is a {meta.type} task; leaf-ray "
                        "evaluates retrieval tasks (a query side and a document side)"
                    )
                revision = meta.dataset.get("revision") or "main"
                tasks.append(EvalTask(meta.name, revision, meta.main_score))
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise EvalError(f"eval: two tasks share a name: {sorted(names)}")
    return tasks


def _mteb_tasks(mteb: Any, name: str) -> list:
    try:
        return list(mteb.get_benchmark(name).tasks)
    except (KeyError, ValueError):
        pass
    try:
        return [mteb.get_task(name)]
    except (KeyError, ValueError):
        msg = f"eval.mteb_tasks: {name!r} is neither an mteb task nor a benchmark"
        raise EvalError(msg) from None


def _folder_revision(folder: Path, split: str) -> str:
    load_beir(folder, split)  # bad files fail here, naming file and line, before any Ray task
    files = [folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / f"{split}.tsv"]
    return hashlib.sha256("".join(files_sha256(f) for f in files).encode()).hexdigest()[:16]


def _local_task(spec: EvalTask) -> AbsTaskRetrieval:
    """A BEIR-layout folder as an mteb retrieval task (mteb's own loader wants the hub)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=spec.name,
            description=f"BEIR-layout folder {spec.folder}",
            type="Retrieval",
            category="t2t",
            modalities=["text"],
            dataset={"path": str(spec.folder), "revision": spec.revision},
            eval_splits=[spec.split],
            eval_langs=["eng-Latn"],
            main_score=spec.main_score,
        )

        def load_data(self, **kwargs: Any) -> None:
            rs = load_beir(spec.folder, spec.split)
            split = {
                "corpus": Dataset.from_dict({"id": [*rs.corpus], "text": [*rs.corpus.values()]}),
                "queries": Dataset.from_dict({"id": [*rs.queries], "text": [*rs.queries.values()]}),
                "relevant_docs": rs.qrels,
                "top_ranked": None,
            }
            self.dataset = {"default": {spec.split: split}}
            self.data_loaded = True

    return LocalRetrieval()


@dataclass
class Vectors:
    """One side of one task, embedded by one model: ids in mteb's order, one row each."""

    ids: list[str]
    array: np.ndarray


class VectorsFile:
    """One side's vectors, appended as mteb asks for them, to a local Parquet file (id,
    embedding) that goes into the eval cache whole once complete."""

    def __init__(self, path: Path) -> None:
        self.path, self.rows = path, 0
        self._writer: pq.ParquetWriter | None = None

    def append(self, ids: list[str], array: np.ndarray) -> None:
        embedding = embedding_column(array.astype(np.float32))
        table = pa.table({"id": pa.array(ids, pa.string()), "embedding": embedding})
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, table.schema)
        self._writer.write_table(table)
        self.rows += len(ids)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class EvalCache:
    """<root>/<task>-<data revision>/<model key>/{query,document}.parquet (id, embedding); the
    root may be a local or NFS path or an object store (`leaf_ray.storage`)."""

    def __init__(self, root: Location) -> None:
        self.root = root

    def file(self, task: EvalTask, model_key: str, side: str) -> Location:
        return self.root / f"{task.name}-{task.revision}" / model_key / f"{side}.parquet"

    def has(self, task: EvalTask, model_key: str) -> bool:
        return all(self.file(task, model_key, side).is_file() for side in SIDES)

    def shape(self, task: EvalTask, model_key: str, side: str) -> tuple[int, int]:
        """Rows and dimension, from the file's footer alone."""
        file = self.file(task, model_key, side)
        meta = pq.read_metadata(file.path, filesystem=file.fs)
        return meta.num_rows, meta.schema.to_arrow_schema().field("embedding").type.list_size

    def load(self, task: EvalTask, model_key: str, side: str) -> Vectors:
        file = self.file(task, model_key, side)
        return _vectors(pq.read_table(file.path, filesystem=file.fs))

    def stream(self, task: EvalTask, model_key: str, side: str) -> Iterator[Vectors]:
        """The side in the order it was written, a Parquet batch at a time."""
        file = self.file(task, model_key, side)
        with file.fs.open_input_file(file.path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=STREAM_ROWS):
                yield _vectors(pa.Table.from_batches([batch]))


def _joined(parts: list[Vectors]) -> Vectors:
    return Vectors(
        [i for part in parts for i in part.ids], np.concatenate([p.array for p in parts])
    )


def _vectors(table: pa.Table) -> Vectors:
    array = table.column("embedding").combine_chunks().flatten().to_numpy()
    return Vectors(table.column("id").to_pylist(), array.reshape(len(table), -1))


def _model_meta(
    name: str, revision: str, dim: int | None, setting: dict | None = None
) -> ModelMeta:
    """A real name and revision, so mteb's result folders never mix models, runs or settings."""
    from mteb.models.model_meta import ModelMeta

    return ModelMeta(
        loader=None,
        name=name,
        revision=revision,
        release_date=None,
        languages=None,
        n_parameters=None,
        memory_usage_mb=None,
        max_tokens=None,
        embed_dim=dim,
        license=None,
        open_weights=None,
        public_training_code=None,
        public_training_data=None,
        framework=["Sentence Transformers"],
        similarity_fn_name="cosine",
        use_instructions=False,
        training_datasets=None,
        experiment_kwargs=setting,
    )


class _LeafSimilarity:
    """mteb's similarity hooks: leaf-ray's `similarity`, which handles int8 and packed bits."""

    def similarity(self, a: np.ndarray, b: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(similarity(np.asarray(a), np.asarray(b)))

    def similarity_pairwise(self, a: np.ndarray, b: np.ndarray) -> torch.Tensor:
        raise NotImplementedError("retrieval tasks only")


class _RecordingEncoder:
    """mteb's encoder protocol over a model (a SentenceTransformer, or a black-box teacher's
    endpoint), writing every vector it returns. Its run only records: mteb's search still
    asks for scores, which are discarded, so they are zeros rather than a product of every
    query with every document (minutes to hours on CPU for a corpus of millions)."""

    def similarity(self, a: np.ndarray, b: np.ndarray) -> torch.Tensor:
        return torch.zeros(len(a), len(b))

    def similarity_pairwise(self, a: np.ndarray, b: np.ndarray) -> torch.Tensor:
        return torch.zeros(len(a))

    def __init__(self, encoder: Encoder, cfg: EvalConfig, folder: Path) -> None:
        self.files = {side: VectorsFile(folder / f"{side}.parquet") for side in SIDES}
        if encoder.endpoint is not None:  # its prompts and requests, as in training
            self.embed = HttpTeacher(encoder.endpoint).embed
            dim = encoder.endpoint.http.dimensions
        else:
            self.embed, dim = _local_embedder(encoder, cfg, folder)
        self.mteb_model_meta = _model_meta(encoder.name, encoder.revision or "local", dim)

    def encode(self, inputs: Any, *, prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
        side = prompt_type.value
        data = inputs.dataset
        array = self.embed(list(data["text"]), side)
        self.files[side].append(list(data["id"]), array)
        return array


def _local_embedder(
    encoder: Encoder, cfg: EvalConfig, folder: Path
) -> tuple[Callable[[list[str], str], np.ndarray], int]:
    """(texts, side) -> vectors through a SentenceTransformer, each side with its prompt. A model
    folder this node cannot see is fetched into `folder` from its stored copy."""
    from sentence_transformers import SentenceTransformer

    model_dir = encoder.model
    if encoder.stored is not None and not Path(model_dir).is_dir():
        model_dir = str(folder / "model")
        encoder.stored.download(Path(model_dir))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = SentenceTransformer(model_dir, device=device, revision=encoder.revision)
    model.max_seq_length = cfg.max_seq_length

    def embed(texts: list[str], side: str) -> np.ndarray:
        prompt = encoder.prompts.get(side)
        return model.encode(texts, prompt=prompt, batch_size=cfg.batch_size, convert_to_numpy=True)

    return embed, model.get_embedding_dimension()


@ray.remote
def _embed_task(
    encoder: Encoder, task: EvalTask, cfg: EvalConfig, cache: EvalCache, model_key: str
) -> int:
    """Run mteb once with the real model; what it encoded goes into the eval cache, for every
    score task to read. Returns the number of texts embedded."""
    import datasets
    import mteb

    datasets.disable_progress_bars()
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources()["CPU"])))
    with tempfile.TemporaryDirectory(prefix="leaf-ray-eval-") as folder:
        recorder = _RecordingEncoder(encoder, cfg, Path(folder))
        mteb.evaluate(recorder, task.load(), cache=None, show_progress_bar=False)
        for side, file in recorder.files.items():  # each whole or absent: a kill leaves a miss
            file.close()
            cache.file(task, model_key, side).put(file.path)
        return sum(file.rows for file in recorder.files.values())


class _CachedVectors(_LeafSimilarity):
    """mteb's encoder protocol over vectors already computed, truncated and quantized as asked.
    It has no model, so it cannot run one.

    The queries are held whole. The documents are read chunk by chunk in the order they were
    written, which is the order mteb asks for them (its corpus order, 50,000 at a time): a
    scoring task holds one chunk of a large corpus, not all of it. Asked in another order
    (e.g. a reranking task), it reads them whole and looks them up by id."""

    def __init__(
        self,
        meta: ModelMeta,
        queries: Vectors,
        documents: Callable[[], Iterator[Vectors]],
        dimension: int,
        quantization: str,
    ) -> None:
        self.mteb_model_meta = meta
        self.documents, self.dimension, self.quantization = documents, dimension, quantization
        # int8 is calibrated on the whole corpus: its ranges take one pass before the search.
        self.ranges = (
            int8_ranges(truncate(chunk.array, dimension) for chunk in documents())
            if quantization == "int8"
            else None
        )
        self.queries = dict(zip(queries.ids, range(len(queries.ids)), strict=True))
        self.query_array = self._compress(queries.array)
        self.in_order: Iterator[Vectors] | None = None
        self.pending: Vectors | None = None  # read past the last chunk mteb asked for
        self.by_id: tuple[dict[str, int], np.ndarray] | None = None

    def encode(self, inputs: Any, *, prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
        ids = list(inputs.dataset["id"])
        if prompt_type.value == "query":
            return self.query_array[[self.queries[i] for i in ids]]
        return self._compress(self._document_vectors(ids))

    def _document_vectors(self, ids: list[str]) -> np.ndarray:
        if self.by_id is None:
            chunk = self._next_in_order(len(ids))
            if chunk.ids == ids:
                return chunk.array
            whole = _joined(list(self.documents()))  # asked out of order: look them up by id
            self.by_id = dict(zip(whole.ids, range(len(whole.ids)), strict=True)), whole.array
        rows, array = self.by_id
        return array[[rows[i] for i in ids]]

    def _next_in_order(self, n: int) -> Vectors:
        """The next `n` documents as stored, across the stream's batches."""
        if self.in_order is None:
            self.in_order = self.documents()
        parts = [self.pending] if self.pending else []
        have = sum(len(part.ids) for part in parts)
        while have < n and (part := next(self.in_order, None)) is not None:
            parts.append(part)
            have += len(part.ids)
        read = _joined(parts)
        self.pending = Vectors(read.ids[n:], read.array[n:])
        return Vectors(read.ids[:n], read.array[:n])

    def _compress(self, vectors: np.ndarray) -> np.ndarray:
        return quantize(truncate(vectors, self.dimension), self.quantization, self.ranges)


# Rows per Parquet batch when documents are streamed; mteb searches its corpus 50,000 at a time.
STREAM_ROWS = 16_384
MTEB_CORPUS_CHUNK = 50_000


@ray.remote(num_cpus=1)
def _score_task(
    task: EvalTask,
    meta: ModelMeta,
    cache: EvalCache,
    keys: tuple[str, str],
    dimension: int,
    quantization: str,
) -> TaskResult:
    """mteb's evaluation of `task` over the cached vectors of `keys` (queries', documents')."""
    import datasets
    import mteb

    datasets.disable_progress_bars()
    (q_key, d_key), (q_side, d_side) = keys, SIDES
    queries = cache.load(task, q_key, q_side)
    documents = functools.partial(cache.stream, task, d_key, d_side)
    encoder = _CachedVectors(meta, queries, documents, dimension, quantization)
    result = mteb.evaluate(encoder, task.load(), cache=None, show_progress_bar=False)
    return result.task_results[0]


def _score_memory(shapes: list[tuple[int, int]], largest_node: float) -> int:
    """Bytes a scoring task holds: the queries' vectors and their compressed copy, one corpus
    chunk of documents (read, truncated, compressed) and its scores against every query
    (float32 products, then float64); capped at the largest node's memory so that a big task
    runs alone rather than never."""
    (queries, q_dim), (documents, d_dim) = shapes
    chunk = min(documents, MTEB_CORPUS_CHUNK) + STREAM_ROWS
    need = 2 * 4 * queries * q_dim + 3 * 4 * chunk * d_dim + (4 + 8) * queries * chunk
    return int(min(need, largest_node))


@dataclass
class EvalOutcome:
    rows: list[dict]  # one per (task, mode, dimension, precision), with retention
    embedded: dict[str, int]  # texts each model embedded now (0: all from the eval cache)
    results: list[tuple[ModelMeta, TaskResult]]  # mteb's, to save in mteb's layout


def evaluate(
    models: dict[str, Encoder], cfg: EvalConfig, cache_root: Location, label: str
) -> EvalOutcome:
    """Every mode whose models are given, on every task, at every size and precision asked."""
    tasks = resolve_tasks(cfg)
    modes = {m: qd for m, qd in MODES.items() if set(qd) <= set(models)}
    # The teacher first: the largest model should not be the last task left running.
    roles = sorted({role for qd in modes.values() for role in qd}, key=lambda r: r != "teacher")
    keys = {role: models[role].key(cfg.max_seq_length) for role in roles}
    cache = EvalCache(cache_root)
    embedded = _embed_missing(models, keys, tasks, cfg, cache)

    shape = functools.cache(cache.shape)  # a footer read once, though modes share sides
    largest_node = max(node_amounts("memory"), default=0)
    jobs = {}
    for task in tasks:
        for mode, (q_role, d_role) in modes.items():
            pair = (keys[q_role], keys[d_role])
            shapes = [shape(task, pair[0], "query"), shape(task, pair[1], "document")]
            full = min(dim for _, dim in shapes)
            score = _score_task.options(memory=_score_memory(shapes, largest_node))
            name = models["teacher"].name if mode == "teacher" else f"leaf-ray/{label}-{mode}"
            revision = pair[0] if q_role == d_role else "-".join(pair)
            for dimension in [full, *(d for d in cfg.dimensions if d < full)]:
                for quantization in cfg.quantizations:
                    setting = None
                    if (dimension, quantization) != (full, "float32"):
                        setting = {"dimension": dimension, "quantization": quantization}
                    meta = _model_meta(name, revision, dimension, setting)
                    row = {"dataset": task.name, "mode": mode, "dimension": dimension}
                    row |= {"quantization": quantization, "full": dimension == full}
                    row |= {"metric": task.main_score, "model": name, "revision": revision}
                    ref = score.remote(task, meta, cache, pair, dimension, quantization)
                    jobs[ref] = (row, meta)
    results = dict(_as_completed(jobs, "scoring"))
    rows = [row | {"score": results[ref].get_score()} for ref, (row, _) in jobs.items()]
    _add_retention(rows)
    _add_change(rows)
    return EvalOutcome(rows, embedded, [(meta, results[ref]) for ref, (_, meta) in jobs.items()])


def _embed_missing(
    models: dict[str, Encoder],
    keys: dict[str, str],
    tasks: list[EvalTask],
    cfg: EvalConfig,
    cache: EvalCache,
) -> dict[str, int]:
    """Embed every (role, task) the eval cache lacks, each as a Ray task that writes its vectors
    there; role -> texts embedded now (0: all from the cache)."""
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    todo = [(role, task) for task in tasks for role in keys if not cache.has(task, keys[role])]
    cpus = embed_task_cpus(len(todo), resources["CPU"], max(node_amounts("CPU"))) if todo else 1

    def embed(role: str) -> Any:  # a model's task takes a GPU when there are some; an API's not
        if gpus > 0 and models[role].endpoint is None:
            return _embed_task.options(num_cpus=1, num_gpus=1)
        return _embed_task.options(num_cpus=cpus, num_gpus=0)

    # The teacher first (its order in `keys`).
    jobs = {
        embed(role).remote(models[role], task, cfg, cache, keys[role]): (role, task)
        for role, task in todo
    }
    embedded = dict.fromkeys(keys, 0)
    for ref, texts in _as_completed(jobs, "embedding"):
        embedded[jobs[ref][0]] += texts
    return embedded


def embed_task_cpus(jobs: int, cpus: float, largest_node: float) -> int:
    """CPUs for each embedding task off GPUs: an equal share of the cluster's, within one node,
    at least one. A task's torch threads are its CPUs, so fewer tasks than CPUs (one model on
    one task, say) use them all instead of a thread each."""
    return max(1, min(int(cpus // jobs), int(largest_node)))


def _as_completed(jobs: dict[ray.ObjectRef, Any], what: str) -> Iterator[tuple[ray.ObjectRef, Any]]:
    """(ref, result) as each task finishes, with a progress bar; a failed task names itself."""
    pending = list(jobs)
    with progress(total=len(jobs), desc=f"eval: {what}", unit="task") as bar:
        while pending:
            (ready,), pending = ray.wait(pending, num_returns=1)
            try:
                result = ray.get(ready)
            except ray.exceptions.RayTaskError as e:  # e.g. an mteb task offline: say which
                cause = e.cause if e.cause is not None else e
                raise EvalError(
                    f"eval: {what} {_describe(jobs[ready])} failed: {cause!r}"
                ) from None
            bar.update(1)
            yield ready, result


def _describe(job: tuple) -> str:
    first, second = job
    if isinstance(second, EvalTask):  # (role, task): an embedding job
        return f"{second.name} with the {first}"
    return (
        f"{first['dataset']}, {first['mode']}, {first['dimension']} dims, {first['quantization']}"
    )


def _add_retention(rows: list[dict]) -> None:
    """Against the teacher at the same size and precision."""
    teacher = {
        (r["dataset"], r["dimension"], r["quantization"]): r["score"]
        for r in rows
        if r["mode"] == "teacher"
    }
    for r in rows:
        base = teacher.get((r["dataset"], r["dimension"], r["quantization"]))
        r["retention"] = r["score"] / base if base else None


def _add_change(rows: list[dict]) -> None:
    """Against the mode it started from (`STARTS`) at the same size and precision (full size
    for full size: the pretrained model's may differ from the projection's)."""

    def setting(r: dict) -> tuple:
        return r["dataset"], "full" if r["full"] else r["dimension"], r["quantization"]

    score = {(r["mode"], *setting(r)): r["score"] for r in rows}
    for r in rows:
        start = (STARTS.get(r["mode"]), *setting(r))
        r["change"] = r["score"] - score[start] if start in score else None


def truncate(vectors: np.ndarray, dimension: int) -> np.ndarray:
    """Matryoshka truncation to the first `dimension` values, renormalised."""
    return _unit(vectors[:, :dimension])


def int8_ranges(documents: Iterable[np.ndarray]) -> np.ndarray:
    """Per-dimension minimum and maximum over the (truncated) documents, chunk by chunk: the
    calibration `quantize_embeddings` would compute from them all at once."""
    low = high = None
    for chunk in documents:
        lo, hi = chunk.min(axis=0), chunk.max(axis=0)
        low = lo if low is None else np.minimum(low, lo)
        high = hi if high is None else np.maximum(high, hi)
    return np.vstack([low, high])


def quantize(vectors: np.ndarray, quantization: str, ranges: np.ndarray | None) -> np.ndarray:
    """int8 within the documents' `ranges`, or sign bits packed 8 to a byte: sentence-transformers'
    own quantizer, as a vector index would store them."""
    if quantization == "int8":
        return quantize_embeddings(vectors, "int8", ranges=ranges)
    if quantization == "binary":
        return quantize_embeddings(vectors, "ubinary")
    return vectors


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def similarity(queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """Cosine for floats, integer dot product for int8, minus Hamming distance for packed bits;
    float64 either way (exact for every integer score)."""
    if queries.dtype == np.uint8:
        # On 0/1 bits, Hamming(q, d) = |q| + |d| - 2 q.d: one BLAS product, exact in float32
        # (sums below 2^24), where a popcount per (query, document) pair was a Python loop.
        q, d = (np.unpackbits(x, axis=1).astype(np.float32) for x in (queries, docs))
        hamming = q.sum(1)[:, None] + d.sum(1)[None, :] - 2 * (q @ d.T)
        return -hamming.astype(np.float64)
    if queries.dtype == np.int8:
        return (queries.astype(np.int64) @ docs.astype(np.int64).T).astype(np.float64)
    return (_unit(queries) @ _unit(docs).T).astype(np.float64)
