import numpy as np
import pytest

from leaf_ray.data import DataError, RetrievalSet, load_beir
from leaf_ray.eval import compress, ndcg_at_10, similarity


def toy_set() -> RetrievalSet:
    corpus = {f"d{i}": f"doc {i}" for i in range(4)}
    queries = {"q0": "a", "q1": "b"}
    return RetrievalSet("toy", corpus, queries, {"q0": {"d0": 1}, "q1": {"d1": 1}})


def test_ndcg_matches_the_textbook_formula():
    docs = np.eye(4)
    # q0 ranks d0 first (ideal); q1 ranks d2 then d1 (relevant at rank 2: 1/log2(3)).
    queries = np.array([[1.0, 0.1, 0.0, 0.0], [0.0, 0.5, 0.9, 0.0]])
    expected = (1.0 + 1 / np.log2(3)) / 2
    assert ndcg_at_10(toy_set(), queries, docs) == pytest.approx(expected)


def test_ndcg_refuses_mismatched_spaces():
    with pytest.raises(ValueError, match="query dim 3 != document dim 4"):
        ndcg_at_10(toy_set(), np.ones((2, 3)), np.ones((4, 4)))


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


def test_matryoshka_truncation_renormalises_the_first_dimensions():
    rng = np.random.default_rng(0)
    queries, docs = rng.standard_normal((5, 64)), rng.standard_normal((40, 64))
    q, d = compress(queries, docs, 16, "float32")
    assert q.shape == (5, 16) and d.shape == (40, 16)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0)
    np.testing.assert_allclose(
        q * np.linalg.norm(queries[:, :16], axis=1)[:, None], queries[:, :16]
    )


def test_int8_is_calibrated_on_the_corpus_and_keeps_the_ranking():
    rng = np.random.default_rng(1)
    docs = rng.standard_normal((200, 32))
    queries = docs[:20] + 0.3 * rng.standard_normal((20, 32))  # each near its own document
    q, d = compress(queries, docs, 32, "int8")
    assert q.dtype == d.dtype == np.int8
    assert d.min() == -128 and d.max() == 127  # the corpus spans the whole int8 range
    best = similarity(q, d).argmax(1)
    exact = similarity(*compress(queries, docs, 32, "float32")).argmax(1)
    assert (best == exact).mean() >= 0.9


def test_binary_scores_are_minus_the_hamming_distance_of_sign_bits():
    rng = np.random.default_rng(2)
    queries, docs = rng.standard_normal((4, 24)), rng.standard_normal((10, 24))
    q, d = compress(queries, docs, 24, "binary")
    assert q.dtype == np.uint8 and q.shape == (4, 3)  # 24 sign bits, 8 to a byte
    hamming = ((queries[:, None, :] > 0) != (docs[None, :, :] > 0)).sum(-1)
    np.testing.assert_array_equal(similarity(q, d), -hamming)
