"""Model pins: a configured sha256 is checked before the weights are used, local or hub."""

import hashlib

import pytest

from leaf_ray.config import ModelRef
from leaf_ray.models import WEIGHTS, ModelPinError, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_a_local_folder_is_checked_against_its_pin(tmp_path):
    (tmp_path / WEIGHTS).write_bytes(b"weights")
    pin = hashlib.sha256(b"weights").hexdigest()
    assert resolve_model(ModelRef(model=str(tmp_path), sha256=pin)) == str(tmp_path)
    with pytest.raises(ModelPinError, match=rf"{WEIGHTS}: sha256 {pin} does not match pin 0+"):
        resolve_model(ModelRef(model=str(tmp_path), sha256="0" * 64))


def test_a_pinned_hub_model_is_checked_in_the_hub_cache(tmp_path, monkeypatch):
    """Offline, from a hub cache laid out as huggingface_hub lays it out."""
    import huggingface_hub.constants

    repo = tmp_path / "models--acme--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "snapshots" / COMMIT / WEIGHTS).write_bytes(b"hub weights")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    pin = hashlib.sha256(b"hub weights").hexdigest()
    assert resolve_model(ModelRef(model="acme/tiny", sha256=pin)) == "acme/tiny"
    with pytest.raises(ModelPinError, match="does not match pin"):
        resolve_model(ModelRef(model="acme/tiny", sha256="1" * 64))
    assert resolve_model(ModelRef(model="acme/tiny")) == "acme/tiny"  # no pin: nothing fetched


def test_tokenizer_actors_neither_fetch_nor_hash_pinned_weights(tiny_teacher, tmp_path):
    """Only the actors that embed use the weights; the rest read the tokenizer and config."""
    from leaf_ray.config import TeacherConfig
    from leaf_ray.teacher.local import load_teacher, load_without_weights

    absent = ModelRef(model="acme/not-in-any-cache", sha256="1" * 64)
    assert resolve_model(absent, check_pin=False) == "acme/not-in-any-cache"
    wrong_pin = TeacherConfig(model=str(tiny_teacher), sha256="1" * 64)
    with pytest.raises(ModelPinError, match="does not match pin"):
        load_teacher(wrong_pin, "cpu")
    assert load_without_weights(wrong_pin).tokenizer is not None


def test_tokenizer_actors_tokenize_as_the_teacher_without_its_weights(tiny_teacher, tmp_path):
    """The encoder is built empty from its config: a copy of the teacher with no weights file
    tokenizes every text, prompt and length limit as the teacher itself does."""
    import shutil

    from leaf_ray.config import TeacherConfig
    from leaf_ray.teacher.local import load_teacher, load_without_weights, tokenize

    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_teacher, no_weights)
    (no_weights / WEIGHTS).unlink()
    empty = load_without_weights(TeacherConfig(model=str(no_weights), max_seq_length=12))
    teacher = load_teacher(TeacherConfig(model=str(tiny_teacher), max_seq_length=12), "cpu")

    assert all(p.device.type == "meta" for p in empty.parameters())
    texts = ["short", "a longer text, with more words than twelve tokens can hold at all"]
    for prompt in (None, "query: "):
        assert tokenize(empty, texts, prompt) == tokenize(teacher, texts, prompt)
