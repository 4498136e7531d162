"""Teacher stage: Ray Data actors embed each text with the teacher's prompt for its kind."""

from __future__ import annotations

import numpy as np
import ray
import ray.data
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.models import Normalize

from leaf_ray.config import TeacherConfig
from leaf_ray.models import resolve_model


def load_teacher(cfg: TeacherConfig, device: str | None = None) -> SentenceTransformer:
    model = SentenceTransformer(resolve_model(cfg), device=device, revision=cfg.revision)
    model.max_seq_length = cfg.max_seq_length
    return model


def teacher_prompts(cfg: TeacherConfig, model: SentenceTransformer) -> dict[str, str | None]:
    """Config prompts win; otherwise the teacher's own `query`/`document` prompts, if any."""
    return {
        "query": cfg.query_prompt if cfg.query_prompt is not None else model.prompts.get("query"),
        "document": (
            cfg.document_prompt
            if cfg.document_prompt is not None
            else model.prompts.get("document")
        ),
    }


def normalizes(model: SentenceTransformer) -> bool:
    return any(isinstance(module, Normalize) for module in model)


class TeacherEmbedder:
    """One Ray Data actor: holds the teacher on its device and embeds a batch, kind by kind."""

    def __init__(self, cfg: TeacherConfig, torch_threads: int):
        torch.set_num_threads(torch_threads)  # Ray sets OMP_NUM_THREADS=1 in workers
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cfg = cfg
        self.model = load_teacher(cfg, device)
        self.prompts = teacher_prompts(cfg, self.model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        dim = self.model.get_embedding_dimension()
        embeddings = np.empty((len(batch["text"]), dim), dtype=np.float32)
        for kind, prompt in self.prompts.items():
            rows = batch["kind"] == kind
            if rows.any():
                embeddings[rows] = self.model.encode(
                    batch["text"][rows].tolist(),
                    prompt=prompt,
                    batch_size=self.cfg.batch_size,
                    convert_to_numpy=True,
                )
        return {**batch, "embedding": embeddings}


def embed_texts(texts: ray.data.Dataset, cfg: TeacherConfig) -> ray.data.Dataset:
    """Add the teacher's `embedding` column; lazy, so it can feed training or be written out."""
    resources = ray.cluster_resources()
    if resources.get("GPU", 0):
        gpus, reserved_cpus, threads = 1, 1.0, 1
    else:
        # On CPUs the actors reserve all but one CPU, so Ray Data's read, repartition and write
        # tasks can always be scheduled (otherwise the pipeline deadlocks); torch uses them all.
        cpus = resources["CPU"]
        gpus, reserved_cpus = 0, max(cpus - 1, cpus / 2) / cfg.num_actors
        threads = max(1, round(cpus / cfg.num_actors))
    # Each actor call embeds many batches: `encode` sorts them by length, so little padding.
    rows_per_call = cfg.batch_size * 16
    return texts.repartition(target_num_rows_per_block=rows_per_call).map_batches(
        TeacherEmbedder,
        fn_constructor_kwargs={"cfg": cfg, "torch_threads": threads},
        batch_size=rows_per_call,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors, max_tasks_in_flight_per_actor=2),
        num_gpus=gpus,
        num_cpus=reserved_cpus,
    )
