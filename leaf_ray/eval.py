"""Evaluation stage: Ray tasks embed each eval set once per model, then every mode is scored.

Modes compare the teacher, the distilled student, the student before distillation, and LEAF's
asymmetric mode (student queries against the teacher's document index). The teacher's document
embeddings are computed once and shared by every mode that needs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytrec_eval
import ray
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.util.quantization import quantize_embeddings

from leaf_ray.config import EvalConfig
from leaf_ray.data import RetrievalSet, load_beir

# mode -> (model encoding the queries, model encoding the documents)
MODES = {
    "teacher": ("teacher", "teacher"),
    "student": ("student", "student"),
    "student_init": ("student_init", "student_init"),
    "asymmetric": ("student", "teacher"),
    "asymmetric_init": ("student_init", "teacher"),
}


@dataclass(frozen=True)
class Encoder:
    """What an eval task needs to load a model and encode each side with the right prompt."""

    model: str  # local folder or hub name
    revision: str | None = None
    prompts: dict[str, str | None] = field(default_factory=dict)  # "query"/"document" -> prompt


@ray.remote
def _encode(
    spec: Encoder, side: str, texts: list[str], batch_size: int, max_seq_length: int
) -> np.ndarray:
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources()["CPU"])))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = SentenceTransformer(spec.model, device=device, revision=spec.revision)
    encoder.max_seq_length = max_seq_length
    prompt = spec.prompts.get(side)
    return encoder.encode(texts, prompt=prompt, batch_size=batch_size, convert_to_numpy=True)


def evaluate(models: dict[str, Encoder], cfg: EvalConfig) -> list[dict]:
    """nDCG@10 for every mode whose models are given (teacher, student, student_init), on every
    eval set; one row per (set, mode)."""
    gpus = ray.cluster_resources().get("GPU", 0)
    encode = _encode.options(num_cpus=1, num_gpus=1 if gpus else 0)
    sets = [load_beir(folder, cfg.split) for folder in cfg.datasets]
    modes = {m: qd for m, qd in MODES.items() if set(qd) <= set(models)}
    futures = {}
    for rs in sets:
        for q_model, d_model in modes.values():
            for side, model, texts in (
                ("query", q_model, rs.queries),
                ("document", d_model, rs.corpus),
            ):
                key = (rs.name, model, side)
                if key not in futures:  # each (set, model, side) is embedded once
                    futures[key] = encode.remote(
                        models[model],
                        side,
                        list(texts.values()),
                        cfg.batch_size,
                        cfg.max_seq_length,
                    )
    vectors = dict(zip(futures, ray.get(list(futures.values())), strict=True))
    rows = []
    for rs in sets:
        for mode, (q_model, d_model) in modes.items():
            queries = vectors[(rs.name, q_model, "query")]
            docs = vectors[(rs.name, d_model, "document")]
            full = min(queries.shape[1], docs.shape[1])
            for dimension in [full, *(d for d in cfg.dimensions if d < full)]:
                for quantization in cfg.quantizations:
                    q, d = compress(queries, docs, dimension, quantization)
                    row = {"dataset": rs.name, "mode": mode, "dimension": dimension}
                    row |= {"quantization": quantization, "full": dimension == full}
                    rows.append(row | {"ndcg_at_10": ndcg_at_10(rs, q, d, cfg.top_k)})
    # Retention: against the teacher at the same size and precision.
    teacher = {
        (r["dataset"], r["dimension"], r["quantization"]): r["ndcg_at_10"]
        for r in rows
        if r["mode"] == "teacher"
    }
    for r in rows:
        base = teacher.get((r["dataset"], r["dimension"], r["quantization"]))
        r["retention"] = r["ndcg_at_10"] / base if base else None
    return rows


def compress(
    queries: np.ndarray, docs: np.ndarray, dimension: int, quantization: str
) -> tuple[np.ndarray, np.ndarray]:
    """Matryoshka truncation to the first `dimension` values, renormalised; then int8 calibrated
    on the documents' ranges, or sign bits packed 8 to a byte (sentence-transformers' own
    quantizer, as a vector index would store them)."""
    q, d = (_unit(x[:, :dimension]) for x in (queries, docs))
    if quantization == "int8":
        return tuple(quantize_embeddings(x, "int8", calibration_embeddings=d) for x in (q, d))
    if quantization == "binary":
        return quantize_embeddings(q, "ubinary"), quantize_embeddings(d, "ubinary")
    return q, d


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# Set bits per byte value, for Hamming distances between packed sign bits.
POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.int64)


def similarity(queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """Cosine for floats, integer dot product for int8, minus Hamming distance for packed bits."""
    if queries.dtype == np.uint8:  # hand-written: numpy has no popcount over packed rows
        return -np.stack([POPCOUNT[np.bitwise_xor(q, docs)].sum(1) for q in queries])
    if queries.dtype == np.int8:
        return queries.astype(np.int32) @ docs.astype(np.int32).T
    return _unit(queries) @ _unit(docs).T


def ndcg_at_10(rs: RetrievalSet, queries: np.ndarray, docs: np.ndarray, top_k: int = 100) -> float:
    """Exact search (`similarity`), then pytrec_eval's ndcg_cut_10 (as mteb reports it),
    query-averaged."""
    if queries.shape[1] != docs.shape[1]:
        raise ValueError(f"query dim {queries.shape[1]} != document dim {docs.shape[1]}")
    scores = similarity(queries, docs).astype(np.float64)
    k = min(top_k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    doc_ids, query_ids = list(rs.corpus), list(rs.queries)
    run = {
        qid: {doc_ids[j]: float(scores[i, j]) for j in top[i]} for i, qid in enumerate(query_ids)
    }
    per_query = pytrec_eval.RelevanceEvaluator(rs.qrels, {"ndcg_cut.10"}).evaluate(run)
    return float(np.mean([m["ndcg_cut_10"] for m in per_query.values()]))
