"""The teacher's space: what a student must match, and everything that changes a vector (the
cache key)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from leaf_ray.config import TeacherConfig
from leaf_ray.hashing import files_sha256
from leaf_ray.teacher.backends import HttpTeacher, teacher_prompts
from leaf_ray.teacher.cache import FORMAT_VERSION
from leaf_ray.teacher.local import compute_dtype, load_teacher, normalizes
from leaf_ray.teacher.vectors import read_vectors_file, vector_rows, vectors_normalized

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
