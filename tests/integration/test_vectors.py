"""Precomputed vectors: every row checked by a Ray Data job, the first bad one named by its file
and row; ingested into the teacher cache once, then read like any cache."""

from __future__ import annotations

import re

import numpy as np
import pytest

from leaf_ray.data.sources import DataError
from tests.integration.test_bad_input import space, unit_rows, vectors_file


def test_good_vectors_give_the_teachers_dimension_and_normalisation(tmp_path, ray_local):
    good = space(vectors_file(tmp_path, unit_rows(300)))
    assert (good.dimension, good.normalized) == (8, True)
    scaled = (3 * np.array(unit_rows(300))).tolist()
    assert space(vectors_file(tmp_path, scaled)).normalized is False


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda rows: rows[:0], "no rows"),
        (lambda rows: rows[:6] + [[float("nan")] * 8] + rows[7:], "row 7: embedding: not finite"),
        (lambda rows: rows[:4] + [rows[4] + [0.5]] + rows[5:], "row 5: embedding: 9 values where"),
        (lambda rows: rows[:2] + [None] + rows[3:], "row 3: embedding: missing"),
        (  # one stray row among unit vectors decided the student's normalisation
            lambda rows: rows[:150] + [[3 * v for v in rows[150]]] + rows[151:],
            "row 151: embedding: norm 3.000 where 199 of 200 rows are unit length",
        ),
    ],
)
def test_a_bad_row_is_named(tmp_path, edit, message, ray_local):
    path = vectors_file(tmp_path, edit(unit_rows(200)))
    with pytest.raises(DataError) as error:
        space(path)
    assert str(error.value).startswith(f"teacher.vectors: {path}: ")
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("embedding", "message"),
    [
        ('"[0.1, 0.2]"', "embedding: a string, not a list of numbers"),
        ("0.5", "embedding: a double, not a list of numbers"),
        ('["a", "b"]', "embedding: a list<item: string>, not a list of numbers"),
        ("[[0.1, 0.2]]", "embedding: a list<item: list<item: double>>, not a list of numbers"),
    ],
)
def test_vectors_that_are_not_lists_of_numbers_are_named(tmp_path, embedding, message, ray_local):
    path = tmp_path / "vectors.jsonl"
    path.write_text(f'{{"kind": "query", "text": "a text", "embedding": {embedding}}}\n')
    with pytest.raises(DataError, match=re.escape(f"teacher.vectors: {path}: {message}")):
        space(str(path))


def test_a_vectors_file_that_does_not_parse_names_its_line(tmp_path, ray_local):
    path = tmp_path / "vectors.jsonl"
    good = '{"kind": "query", "text": "t%d", "embedding": [0.6, 0.8]}\n'
    path.write_text(good % 1 + good % 2 + '{"oops\n' + good % 3)
    with pytest.raises(DataError, match=rf"{path}:3: invalid JSON: Unterminated string"):
        space(str(path))
    path.write_text(good % 1 + '{"kind": "query", "text": 5, "embedding": [0.6, 0.8]}\n')
    with pytest.raises(DataError, match=rf"{path}:2: text: a int, not a string"):
        space(str(path))
    path.write_text(good % 1 + '{"kind": "query", "text": null, "embedding": [0.6, 0.8]}\n')
    with pytest.raises(DataError, match=rf"{path}: row 2: text: null"):
        space(str(path))


def test_vectors_declared_unit_length_that_are_not_are_refused(tmp_path, ray_local):
    path = vectors_file(tmp_path, (3 * np.array(unit_rows(50))).tolist())
    with pytest.raises(DataError, match="teacher.normalized is true, but the vectors are not"):
        space(path, normalized=True)


def test_a_vectors_file_is_checked_once_per_version(tmp_path, ray_local, monkeypatch):
    """The check's result is kept beside the teacher caches: a rerun of the same file (its
    names, sizes and times) reads it instead of every vector again; a changed file is checked."""
    from leaf_ray.config import TeacherConfig
    from leaf_ray.storage import Location
    from leaf_ray.teacher import vectors

    path = vectors_file(tmp_path, unit_rows(50))
    cfg, memo = TeacherConfig(model="m", vectors=path), Location.of(tmp_path / "caches")
    first = vectors.check_vectors(cfg, memo)
    assert (first.rows, first.dimension, first.normalized) == (50, 8, True)
    assert not (memo / vectors.CHECKED).files(".json")  # a dry run's check keeps nothing
    assert vectors.check_vectors(cfg, memo, keep=True) == first  # the teacher stage's
    assert len((memo / vectors.CHECKED).files(".json")) == 1

    def again(*args):
        raise AssertionError("checked again")

    monkeypatch.setattr(vectors, "_check", again)
    vectors._CHECKED.clear()  # a new process: what the memo says, without a check
    assert vectors.check_vectors(cfg, memo) == first
    path = vectors_file(tmp_path, unit_rows(60))  # the same name, another version
    with pytest.raises(AssertionError, match="checked again"):
        vectors.check_vectors(cfg, memo)
