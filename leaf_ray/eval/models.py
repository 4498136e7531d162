"""The models an evaluation scores, and the encoders mteb calls: one embeds and records what it
embeds, one serves cached vectors."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch

from leaf_ray.config import EvalConfig, TeacherConfig
from leaf_ray.eval.cache import EvalCache, VectorsFile
from leaf_ray.eval.compression import similarity
from leaf_ray.eval.tasks import SIDES, EvalTask
from leaf_ray.hashing import files_sha256
from leaf_ray.progress import quiet_weight_loading
from leaf_ray.storage import Location
from leaf_ray.teacher.backends import HttpTeacher

if TYPE_CHECKING:
    from mteb.models.model_meta import ModelMeta

NOT_MODEL = {".jsonl", ".md", ".pt"}  # in a model folder: logs, model cards, training state


@dataclass(frozen=True)
class EvalModel:
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

    def __init__(self, encoder: EvalModel, cfg: EvalConfig, folder: Path) -> None:
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
    encoder: EvalModel, cfg: EvalConfig, folder: Path
) -> tuple[Callable[[list[str], str], np.ndarray], int]:
    """(texts, side) -> vectors through a SentenceTransformer, each side with its prompt. A model
    folder this node cannot see is fetched into `folder` from its stored copy."""
    from sentence_transformers import SentenceTransformer

    model_dir = encoder.model
    if encoder.stored is not None and not Path(model_dir).is_dir():
        model_dir = str(folder / "model")
        encoder.stored.download(Path(model_dir))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quiet_weight_loading()
    model = SentenceTransformer(model_dir, device=device, revision=encoder.revision)
    model.max_seq_length = cfg.max_seq_length

    def embed(texts: list[str], side: str) -> np.ndarray:
        # "" for none: given None, `encode` would apply the model's default prompt.
        prompt = encoder.prompts.get(side) or ""
        return model.encode(texts, prompt=prompt, batch_size=cfg.batch_size, convert_to_numpy=True)

    return embed, model.get_embedding_dimension()


@ray.remote
def _embed_task(
    encoder: EvalModel, task: EvalTask, cfg: EvalConfig, cache: EvalCache, model_key: str
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
