"""Evaluation without Ray: task keys, the eval cache, BEIR folders, truncation, quantization."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from leaf_ray.cluster import cpu_share
from leaf_ray.data.beir import load_beir
from leaf_ray.data.sources import DataError
from leaf_ray.eval.cache import EvalCache, Vectors, VectorsFile
from leaf_ray.eval.compression import int8_ranges, quantize, similarity, truncate
from leaf_ray.eval.scoring import _CachedVectors
from leaf_ray.eval.tasks import EvalError, EvalTask, resolve_tasks
from leaf_ray.storage import Location
from tests.integration.test_eval import graded_set, whole_corpus


def test_eval_tasks_are_keyed_by_their_data_and_bad_names_are_named(tmp_path):
    from leaf_ray.config import EvalConfig
    from leaf_ray.eval.tasks import EvalError

    folder = graded_set(tmp_path / "graded")
    (before,) = resolve_tasks(EvalConfig(datasets=[str(folder)]))
    with (folder / "queries.jsonl").open("a") as f:
        f.write('{"_id": "extra", "text": "one more query"}\n')
    (after,) = resolve_tasks(EvalConfig(datasets=[str(folder)]))
    assert before.name == after.name == "graded" and before.revision != after.revision
    with pytest.raises(EvalError, match="'NoSuchTask' is neither an mteb task nor a benchmark"):
        resolve_tasks(EvalConfig(mteb_tasks=["NoSuchTask"]))
    with pytest.raises(EvalError, match="STS12 is a STS task"):
        resolve_tasks(EvalConfig(mteb_tasks=["STS12"]))
    (scifact,) = resolve_tasks(EvalConfig(mteb_tasks=["SciFact"]))  # metadata only: offline
    assert scifact.folder is None and scifact.main_score == "ndcg_at_10"


def test_eval_cache_round_trips_vectors_written_piece_by_piece(tmp_path):
    task = EvalTask("graded", "rev0")
    cache = EvalCache(Location.of(tmp_path / "cache"))
    assert not cache.has(task, "model0")
    sides = {
        "query": (["q0", "q1", "q2", "q3"], np.arange(12, dtype=np.float32).reshape(4, 3)),
        "document": (["d0"], np.ones((1, 3), dtype=np.float32)),
    }
    for side, (ids, array) in sides.items():
        file = VectorsFile(tmp_path / f"{side}.parquet")
        for start in range(0, len(ids), 3):  # in pieces, as mteb asks
            file.append(ids[start : start + 3], array[start : start + 3])
        file.close()
        assert file.rows == len(ids)
        assert not cache.has(task, "model0")  # one side alone is a miss
        cache.file(task, "model0", side).put(file.path)
    assert cache.has(task, "model0")
    assert cache.shape(task, "model0", "query") == (4, 3)
    loaded = cache.load(task, "model0", "query")
    assert loaded.ids == ["q0", "q1", "q2", "q3"]
    np.testing.assert_array_equal(loaded.array, sides["query"][1])
    assert cache.load(task, "model0", "document").ids == ["d0"]
    streamed = list(cache.stream(task, "model0", "query"))
    assert [i for part in streamed for i in part.ids] == loaded.ids
    np.testing.assert_array_equal(np.concatenate([p.array for p in streamed]), loaded.array)
    assert not cache.has(EvalTask("graded", "rev1"), "model0")  # other data: a miss
    # Nothing but the two files: no temporary names left behind.
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()) == [
        "document.parquet",
        "query.parquet",
    ]


def test_load_beir_reads_the_demo_set_and_names_bad_lines(tmp_path):
    from tests.conftest import DEMO_DATA

    rs = load_beir(DEMO_DATA / "debian_desc")
    assert (len(rs.queries), len(rs.corpus)) == (300, 2000)
    assert all(d in rs.corpus for rel in rs.qrels.values() for d in rel)

    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d", "text": "x"}\n{"_id": "e"}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "q", "text": "y"}\n')
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq\td\t1\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:2: missing \['text'\]"):
        load_beir(tmp_path)
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d", "text": "x"}\n')
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq\tzz\t1\n")
    with pytest.raises(DataError, match=r"test.tsv:2: unknown query or corpus id"):
        load_beir(tmp_path)
    (tmp_path / "qrels" / "test.tsv").write_text("q\td\t1\n")  # no header: a judgment
    assert load_beir(tmp_path).qrels == {"q": {"d": 1}}
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq\td\tone\n")
    with pytest.raises(DataError, match=r"test.tsv:2: expected query-id<TAB>corpus-id<TAB>score"):
        load_beir(tmp_path)


def test_matryoshka_truncation_renormalises_the_first_dimensions():
    rng = np.random.default_rng(0)
    queries, docs = rng.standard_normal((5, 64)), rng.standard_normal((40, 64))
    q, d = truncate(queries, 16), truncate(docs, 16)
    assert q.shape == (5, 16) and d.shape == (40, 16)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0)
    np.testing.assert_allclose(
        q * np.linalg.norm(queries[:, :16], axis=1)[:, None], queries[:, :16]
    )


def test_int8_is_calibrated_on_the_corpus_and_keeps_the_ranking():
    rng = np.random.default_rng(1)
    docs = rng.standard_normal((200, 32))
    queries = docs[:20] + 0.3 * rng.standard_normal((20, 32))  # each near its own document
    # Calibrated piece by piece, as documents stream: the same as on all of them at once.
    ranges = int8_ranges(truncate(piece, 32) for piece in np.array_split(docs, 7))
    q, d = (quantize(truncate(x, 32), "int8", ranges) for x in (queries, docs))
    for ours, reference in zip((q, d), whole_corpus(queries, docs, 32, "int8"), strict=True):
        np.testing.assert_array_equal(ours, reference)
    assert q.dtype == d.dtype == np.int8
    assert d.min() == -128 and d.max() == 127  # the corpus spans the whole int8 range
    best = similarity(q, d).argmax(1)
    exact = similarity(truncate(queries, 32), truncate(docs, 32)).argmax(1)
    assert (best == exact).mean() >= 0.9


def test_binary_scores_are_minus_the_hamming_distance_of_sign_bits():
    rng = np.random.default_rng(2)
    queries, docs = rng.standard_normal((4, 24)), rng.standard_normal((10, 24))
    q, d = (quantize(truncate(x, 24), "binary", None) for x in (queries, docs))
    assert q.dtype == np.uint8 and q.shape == (4, 3)  # 24 sign bits, 8 to a byte
    hamming = ((queries[:, None, :] > 0) != (docs[None, :, :] > 0)).sum(-1)
    np.testing.assert_array_equal(similarity(q, d), -hamming)


@pytest.mark.parametrize(
    ("jobs", "cpus", "largest", "each"),
    [(3, 2, 2, 1), (1, 2, 2, 2), (2, 16, 16, 8), (1, 32, 16, 16), (40, 16, 16, 1)],
)
def test_embedding_tasks_off_gpus_share_the_cpus(jobs, cpus, largest, each):
    nodes = [largest] * int(cpus // largest)
    assert max(1, int(cpu_share(cpus, nodes, jobs))) == each


def asked(scorer: _CachedVectors, side: str, ids: list[str]) -> np.ndarray:
    """What the scorer answers when mteb asks it for `ids`' vectors of one side."""
    inputs = SimpleNamespace(dataset={"id": ids, "text": [""] * len(ids)})
    return scorer.encode(inputs, prompt_type=SimpleNamespace(value=side))


def test_queries_numbered_alike_in_two_subsets_are_served_as_embedded():
    """A task with two language subsets whose queries are both Q0, Q1: each subset's queries
    get their own vectors, in the order mteb asked for them when they were embedded. Out of that
    order their ids are ambiguous, which is an error, not another subset's vectors."""
    english, french = np.eye(4, dtype=np.float32)[:2], np.eye(4, dtype=np.float32)[2:]
    queries = Vectors(["Q0", "Q1", "Q0", "Q1"], np.concatenate([english, french]))
    corpus = [Vectors(["C0", "C1"], np.eye(4, dtype=np.float32)[:2])]
    scorer = _CachedVectors(None, queries, lambda: iter(corpus), 4, "float32")
    np.testing.assert_array_equal(asked(scorer, "query", ["Q0", "Q1"]), english)
    np.testing.assert_array_equal(asked(scorer, "query", ["Q0", "Q1"]), french)
    np.testing.assert_array_equal(asked(scorer, "document", ["C0", "C1"]), corpus[0].array)
    with pytest.raises(EvalError, match="ids repeat"):
        asked(scorer, "query", ["Q1"])
    distinct = _CachedVectors(
        None, Vectors(["a", "b"], english), lambda: iter(corpus), 4, "float32"
    )
    np.testing.assert_array_equal(asked(distinct, "query", ["b"]), english[1:])  # by id
