"""The teacher's space: what a student must match, and everything that changes a vector (the
cache key)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from leaf_ray.config import TeacherConfig
from leaf_ray.teacher.backends import HttpTeacher, teacher_prompts
from leaf_ray.teacher.cache import FORMAT_VERSION
from leaf_ray.teacher.local import compute_dtype, load_teacher, normalizes
from leaf_ray.teacher.vectors import check_vectors, fingerprint

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

PROBE_TEXTS = ["leaf-ray probe: what space do your vectors live in?", "a second probe text"]


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
        key |= {
            # The weights and vocabulary as loaded, not the name or folder, say which teacher
            # this is: every module's (a Dense head's too), from a folder or the hub alike.
            "teacher": {
                "parameters_sha256": _parameters_sha256(model),
                "tokenizer_sha256": _tokenizer_sha256(model),
            },
            "modules": [[type(m).__name__, _module_config(m)] for m in model],
            "prompts": teacher_prompts(cfg, model),
            "max_seq_length": cfg.max_seq_length,
            "compute_dtype": str(compute_dtype(cfg, "cuda" if on_gpu else "cpu")),
            "dimension": model.get_embedding_dimension(),
            "normalized": normalizes(model),
        }
        return TeacherSpace(key)
    if cfg.backend == "vectors":
        checked = check_vectors(cfg)  # a Ray Data job over the file, once per version
        key["teacher"] = {"vectors": fingerprint(cfg.vectors)}
        key |= {"dimension": checked.dimension, "normalized": checked.normalized}
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


def _parameters_sha256(model: torch.nn.Module) -> str:
    """One sha256 over every parameter and buffer: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _tokenizer_sha256(model: SentenceTransformer) -> str | None:
    """The fast tokenizer's definition (vocabulary, normaliser, special tokens), without the
    truncation and padding state that each call sets."""
    backend = getattr(getattr(model, "tokenizer", None), "backend_tokenizer", None)
    if backend is None:
        return None
    definition = json.loads(backend.to_str())
    definition.pop("truncation", None)
    definition.pop("padding", None)
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
