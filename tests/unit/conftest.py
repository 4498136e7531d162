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
