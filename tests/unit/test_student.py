import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from leaf_ray.config import ConfigError, StudentConfig, TeacherConfig
from leaf_ray.student import build_student, reduce_layers
from leaf_ray.teacher.local import load_teacher
from leaf_ray.teacher.space import teacher_space
from tests.conftest import random_bert

TEXTS = [
    "Perl module for matching globbing patterns against text",
    "the scattering of bomb fragments after the bomb explodes",
    "Qt is a cross-platform C++ application framework.",
]


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return load_teacher(TeacherConfig(model=str(tiny_teacher), max_seq_length=64))


@pytest.fixture(scope="module")
def space(tiny_teacher):
    return teacher_space(TeacherConfig(model=str(tiny_teacher), max_seq_length=64), on_gpu=False)


def test_layer_reduction_keeps_evenly_spaced_teacher_layers(teacher):
    reduced = reduce_layers(teacher[0], 1)
    layers = reduced.auto_model.encoder.layer
    assert len(layers) == 1 and reduced.auto_model.config.num_hidden_layers == 1
    original = teacher[0].auto_model.encoder.layer[0]
    for a, b in zip(layers[0].parameters(), original.parameters(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()  # a copy, not a view
    assert len(teacher[0].auto_model.encoder.layer) == 2  # the teacher is untouched
    with pytest.raises(ConfigError, match="student.num_layers 3 exceeds the teacher's 2 layers"):
        reduce_layers(teacher[0], 3)


def test_student_is_mean_pool_then_linear_then_normalise(teacher, space):
    student = build_student(StudentConfig(max_seq_length=64), space, 0, teacher).eval()
    features = student.preprocess(TEXTS)
    with torch.no_grad():
        tokens = (
            student[0]
            .auto_model(input_ids=features["input_ids"], attention_mask=features["attention_mask"])
            .last_hidden_state
        )
        mask = features["attention_mask"].unsqueeze(-1).float()
        pooled = (tokens * mask).sum(1) / mask.sum(1)
        projected = student[2].linear(pooled)
        expected = torch.nn.functional.normalize(projected, dim=-1)
        got = student(features)["sentence_embedding"]
    assert got.shape == (3, teacher.get_embedding_dimension())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_gives_identical_embeddings(teacher, space, tmp_path):
    student = build_student(StudentConfig(max_seq_length=64), space, 0, teacher)
    student.save_pretrained(str(tmp_path / "s"))
    loaded = SentenceTransformer(str(tmp_path / "s"), device="cpu")
    a, b = student.encode(TEXTS), loaded.encode(TEXTS)
    assert a.shape == (3, 32)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, rtol=1e-5)


def test_pretrained_student_may_differ_from_the_teacher(teacher, space, tmp_path):
    """Any Hugging Face encoder folder (or hub name) as the student, projected to teacher space."""
    random_bert(tmp_path / "other", hidden=24, layers=1).save_pretrained(tmp_path / "other")
    cfg = StudentConfig(init="pretrained", model=str(tmp_path / "other"))
    student = build_student(cfg, space, 0, teacher)
    assert student[2].linear.weight.shape == (32, 24)  # Linear 24 -> teacher's 32
    assert student.encode(TEXTS).shape == (3, 32)
