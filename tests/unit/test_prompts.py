"""Each kind's teacher prompt: the one sentence-transformers' encode_query / encode_document
would prepend, the same in the teacher stage and in evaluation. No Ray."""

import shutil

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from leaf_ray.config import EvalConfig, TeacherConfig
from leaf_ray.eval.models import EvalModel, _local_embedder
from leaf_ray.teacher.backends import teacher_prompts
from leaf_ray.teacher.local import LocalTeacher

TEXTS = ["a debian package for reading mail", "how do I read mail in a terminal"]


@pytest.fixture
def prompted_teacher(tiny_teacher, tmp_path):
    """The tiny teacher saved with a query and a passage prompt, its default the query's: a
    plain `encode` prepends "query: " to documents too. (Loaded, sentence-transformers 6 gives
    it an empty "document" prompt, which encode_document takes before "passage".)"""
    folder = tmp_path / "prompted"
    shutil.copytree(tiny_teacher, folder)
    model = SentenceTransformer(str(folder), device="cpu")
    model.prompts = {"query": "query: ", "passage": "passage: "}
    model.default_prompt_name = "query"
    model.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize(
    ("prompts", "default", "configured", "expected"),
    [
        ({"query": "q: ", "passage": "p: "}, None, {}, {"query": "q: ", "document": "p: "}),
        ({"query": "q: ", "corpus": "c: "}, None, {}, {"query": "q: ", "document": "c: "}),
        ({"query": "q: "}, None, {}, {"query": "q: ", "document": None}),
        ({"query": "q: "}, "query", {}, {"query": "q: ", "document": "q: "}),
        ({"s2s": "same: "}, "s2s", {}, {"query": "same: ", "document": "same: "}),
        ({"query": "q: "}, "query", {"document_prompt": ""}, {"query": "q: ", "document": ""}),
        ({}, None, {"query_prompt": "Q "}, {"query": "Q ", "document": None}),
    ],
)
def test_a_kind_without_a_prompt_of_its_own_takes_the_default(
    tiny_teacher, prompts, default, configured, expected
):
    model = SentenceTransformer(str(tiny_teacher), device="cpu")
    model.prompts, model.default_prompt_name = prompts, default
    cfg = TeacherConfig(model=str(tiny_teacher), **configured)
    assert teacher_prompts(cfg, model) == expected


def test_the_teacher_stage_and_evaluation_embed_documents_as_encode_document_does(
    prompted_teacher, tmp_path
):
    """Documents of a teacher whose default prompt is the query's: the stage (its own
    tokenization) and evaluation (mteb through `encode`) give encode_document's vectors, with
    the passage prompt, and queries encode_query's."""
    model = SentenceTransformer(str(prompted_teacher), device="cpu")
    cfg = TeacherConfig(model=str(prompted_teacher), max_seq_length=64)
    stage = LocalTeacher(cfg, "cpu")
    evaluated = EvalModel("teacher", str(prompted_teacher), prompts=teacher_prompts(cfg, model))
    embed, _ = _local_embedder(evaluated, EvalConfig(max_seq_length=64), tmp_path)
    expected = {"document": model.encode_document(TEXTS), "query": model.encode_query(TEXTS)}
    assert not np.allclose(expected["document"], model.encode(TEXTS))  # the default differs
    for kind, vectors in expected.items():
        np.testing.assert_allclose(stage.embed(TEXTS, kind), vectors, atol=1e-5)
        np.testing.assert_allclose(embed(TEXTS, kind), vectors, atol=1e-5)
