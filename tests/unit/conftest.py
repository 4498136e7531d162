"""Unit tests run without Ray: starting it here fails the test, so the folder stays fast."""

import pytest
import ray
import ray._private.worker


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a unit test started Ray: move it to tests/integration")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray._private.worker, "init", refuse)  # what Ray Data's auto-init calls


@pytest.fixture()
def tiny_student(tmp_path):
    """A random 1-layer, 16-d BERT, mean pooling and a Linear 16->24 head, normalised."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import (
        Dense,
        Normalize,
        Pooling,
        Transformer,
    )

    from tests.conftest import random_bert

    torch.manual_seed(0)
    random_bert(tmp_path, hidden=16, layers=1).save_pretrained(tmp_path)
    encoder = Transformer(str(tmp_path), max_seq_length=16)
    modules = [encoder, Pooling(16, "mean"), Dense(16, 24, activation_function=torch.nn.Identity())]
    return SentenceTransformer(modules=[*modules, Normalize()], device="cpu")
