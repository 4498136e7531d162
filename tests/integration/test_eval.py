"""Eval pieces without Ray: mteb over cached vectors against an independent pytrec_eval, the
compression helpers, the BEIR reader and the eval cache."""

import numpy as np
import pytest
import pytrec_eval

from leaf_ray.data.beir import load_beir
from leaf_ray.eval.cache import Vectors
from leaf_ray.eval.compression import similarity
from leaf_ray.eval.models import _model_meta
from leaf_ray.eval.scoring import _CachedVectors
from leaf_ray.eval.tasks import resolve_tasks
from leaf_ray.storage import Location


def graded_set(root, n_queries=40, n_docs=200, seed=0):
    """A BEIR folder with graded relevance (0-3, several documents per query)."""
    import json

    rng = np.random.default_rng(seed)
    (root / "qrels").mkdir(parents=True)
    docs = [f"d{i}" for i in range(n_docs)]
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": d, "title": "", "text": f"doc {d}"}) + "\n" for d in docs)
    )
    (root / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": f"query {i}"}) + "\n" for i in range(n_queries))
    )
    lines = ["query-id\tcorpus-id\tscore"]
    for i in range(n_queries):
        for d in rng.choice(n_docs, size=4, replace=False):
            lines.append(f"q{i}\td{d}\t{rng.integers(1, 4)}")
    (root / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return root


def whole_corpus(queries: np.ndarray, docs: np.ndarray, dimension: int, quantization: str):
    """The reference compression: whole arrays, int8 calibrated by sentence-transformers itself
    on all the documents."""
    from sentence_transformers.util.quantization import quantize_embeddings

    q, d = (
        x[:, :dimension] / np.linalg.norm(x[:, :dimension], axis=1, keepdims=True)
        for x in (queries, docs)
    )
    if quantization == "int8":
        return tuple(quantize_embeddings(x, "int8", calibration_embeddings=d) for x in (q, d))
    if quantization == "binary":
        return quantize_embeddings(q, "ubinary"), quantize_embeddings(d, "ubinary")
    return q, d


def pytrec_ndcg_at_10(rs, queries: np.ndarray, docs: np.ndarray) -> float:
    """Exact search with leaf-ray's similarity, then pytrec_eval's ndcg_cut_10, query-averaged."""
    scores = similarity(queries, docs)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :100]
    doc_ids, query_ids = list(rs.corpus), list(rs.queries)
    run = {q: {doc_ids[j]: float(scores[i, j]) for j in top[i]} for i, q in enumerate(query_ids)}
    per_query = pytrec_eval.RelevanceEvaluator(rs.qrels, {"ndcg_cut.10"}).evaluate(run)
    return float(np.mean([m["ndcg_cut_10"] for m in per_query.values()]))


@pytest.mark.parametrize("stored", ["in mteb's order", "shuffled"])
@pytest.mark.parametrize("quantization", ["float32", "int8", "binary"])
def test_mteb_ndcg_equals_pytrec_eval_on_the_same_rankings(tmp_path, quantization, stored):
    """Documents stream in 64-row pieces, as stored: in mteb's order they are read once (twice
    for int8, whose calibration takes a pass); stored in another order, once more, whole."""
    import mteb

    from leaf_ray.config import EvalConfig

    folder = graded_set(tmp_path / "graded")
    (task,) = resolve_tasks(EvalConfig(datasets=[str(folder)]))
    rs = load_beir(folder)
    rng = np.random.default_rng(1)
    docs = rng.standard_normal((len(rs.corpus), 48)).astype(np.float32)
    # Queries near their most relevant document, so the scores are neither 0 nor 1.
    rel = [max(rs.qrels[q], key=rs.qrels[q].get) for q in rs.queries]
    queries = docs[[int(d[1:]) for d in rel]] + 1.5 * rng.standard_normal((len(rel), 48))
    ids = np.array(list(rs.corpus))
    rows = rng.permutation(len(ids)) if stored == "shuffled" else np.arange(len(ids))
    passes = []

    def documents():
        passes.append(1)
        for start in range(0, len(rows), 64):
            piece = rows[start : start + 64]
            yield Vectors(ids[piece].tolist(), docs[piece])

    meta = _model_meta("leaf-ray/test", "r0", 48)
    encoder = _CachedVectors(meta, Vectors(list(rs.queries), queries), documents, 32, quantization)
    result = mteb.evaluate(encoder, task.load(), cache=None, show_progress_bar=False)
    ours = pytrec_ndcg_at_10(rs, *whole_corpus(queries, docs, 32, quantization))
    assert 0.2 < ours < 0.95
    assert result.task_results[0].get_score() == pytest.approx(ours, abs=1e-4)
    assert len(passes) == 1 + (quantization == "int8") + (stored == "shuffled")


def test_a_node_that_cannot_see_a_run_model_fetches_it_from_the_run(tiny_teacher, tmp_path):
    """A run on an object store is evaluated from the driver's disk; a task elsewhere reads the
    run's copy instead (here a local store stands in for s3://)."""
    from sentence_transformers import SentenceTransformer

    from leaf_ray.config import EvalConfig
    from leaf_ray.eval.models import EvalModel, _local_embedder

    stored = Location.of(tmp_path / "store" / "run" / "student")
    stored.upload(tiny_teacher)
    unseen = EvalModel("leaf-ray/run-student", str(tmp_path / "driver" / "student"), stored=stored)
    task_dir = tmp_path / "task"
    task_dir.mkdir()
    embed, dim = _local_embedder(unseen, EvalConfig(max_seq_length=64), task_dir)
    assert dim == 32 and (task_dir / "model" / "modules.json").is_file()
    texts = ["apt package manager", "a text editor for the terminal"]
    want = SentenceTransformer(str(tiny_teacher), device="cpu").encode(texts)
    np.testing.assert_allclose(embed(texts, "document"), want, atol=1e-5)
