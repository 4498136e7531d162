"""Bad precomputed teacher vectors are refused before any Ray job, naming file, row and field."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leaf_ray.config import TeacherConfig
from leaf_ray.data import DataError
from leaf_ray.teacher import teacher_space


def vectors_file(tmp_path, vectors: list) -> str:
    path = tmp_path / "vectors.parquet"
    rows = len(vectors)
    table = pa.table(
        {
            "kind": ["query"] * rows,
            "text": [f"text {i}" for i in range(rows)],
            "embedding": pa.array(vectors, pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, path)
    return str(path)


def unit_rows(n: int, dim: int = 8) -> list[list[float]]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).tolist()


def space(path: str, **teacher):
    return teacher_space(TeacherConfig(model="m", vectors=path, **teacher), on_gpu=False)


def test_good_vectors_give_the_teachers_dimension_and_normalisation(tmp_path):
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
def test_a_bad_row_is_named(tmp_path, edit, message):
    path = vectors_file(tmp_path, edit(unit_rows(200)))
    with pytest.raises(DataError) as error:
        space(path)
    assert str(error.value).startswith(f"teacher.vectors: {path}: ")
    assert message in str(error.value)


def test_vectors_declared_unit_length_that_are_not_are_refused(tmp_path):
    path = vectors_file(tmp_path, (3 * np.array(unit_rows(50))).tolist())
    with pytest.raises(DataError, match="teacher.normalized is true, but the vectors are not"):
        space(path, normalized=True)
