"""The teacher behind one call, `embed(texts, kind)`: a sentence-transformers model (local,
bundled or hub: `leaf_ray.teacher.local`), precomputed vectors in a file, or an OpenAI-compatible
embeddings endpoint. All three sit inside the same Ray Data actor, and are keyed the same way in
the cache."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Protocol

import numpy as np

from leaf_ray.config import TeacherConfig
from leaf_ray.teacher.http import HttpEmbedder

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


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


class Teacher(Protocol):
    def embed(self, texts: list[str], kind: str) -> np.ndarray: ...


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
