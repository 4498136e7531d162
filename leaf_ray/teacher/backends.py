"""The teacher behind one call, `embed(texts, kind)`: a sentence-transformers model (local,
bundled or hub: `leaf_ray.teacher.local`) or an OpenAI-compatible embeddings endpoint. Both sit
inside the same Ray Data actor, and are keyed the same way in the cache (precomputed vectors
need no call: `leaf_ray.teacher.vectors` ingests them into the cache)."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Protocol

import numpy as np

from leaf_ray.config import TeacherConfig
from leaf_ray.teacher.http import HttpEmbedder

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


# The model's own prompt for each kind, by the names sentence-transformers' `encode_query` and
# `encode_document` look for, in their order.
PROMPT_NAMES = {"query": ("query",), "document": ("document", "passage", "corpus")}


def teacher_prompts(
    cfg: TeacherConfig, model: SentenceTransformer | None = None
) -> dict[str, str | None]:
    """Each kind's prompt (None: none). The config's wins; otherwise the one the model's
    `encode_query` / `encode_document` would prepend: its own for that kind, else its default
    prompt. Evaluation passes these to `encode` as they are, never leaving the choice to it."""
    configured = {"query": cfg.query_prompt, "document": cfg.document_prompt}
    own = model.prompts if model is not None else {}
    default = own.get(model.default_prompt_name) if model is not None else None
    prompts = {}
    for kind, names in PROMPT_NAMES.items():
        fallback = next((own[name] for name in names if name in own), default)
        prompts[kind] = configured[kind] if configured[kind] is not None else fallback
    return prompts


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
