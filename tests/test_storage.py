"""Runs, checkpoints and caches on an object store: a local S3 (moto's server) through pyarrow.fs,
as a user's s3:// storage would be reached."""

import json
import socket

import pyarrow.fs as pafs
import pytest
from moto.server import ThreadedMotoServer

from leaf_ray.config import load_config
from leaf_ray.recipe import distill, evaluate_run
from leaf_ray.storage import Location
from tests.conftest import tiny_run_config
from tests.test_pipeline import small_eval_set


@pytest.fixture(scope="module")
def s3_uri():
    """s3://leaf on a local S3 server: the endpoint travels in the URI, the credentials in the
    environment (tests/conftest.py)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"127.0.0.1:{port}"
    fs = pafs.S3FileSystem(
        endpoint_override=endpoint,
        scheme="http",
        region="us-east-1",
        allow_bucket_creation=True,
    )
    fs.create_dir("leaf")
    yield f"s3://leaf?scheme=http&endpoint_override={endpoint}&region=us-east-1"
    server.stop()


def under(uri: str, path: str) -> str:
    bucket, query = uri.split("?")
    return f"{bucket}/{path}?{query}"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_location_writes_whole_files_and_copies_folders(tmp_path, s3_uri, where):
    root = Location.of(tmp_path / "store" if where == "local" else under(s3_uri, "unit"))
    (root / "a" / "x.json").write('{"x": 1}')
    (root / "a" / "y.json").write(b"[]")
    built = tmp_path / "built.json"  # a file built elsewhere, then put in place whole
    built.write_text('{"z": 2}')
    (root / "a" / "z.json").put(built)
    assert json.loads((root / "a" / "x.json").read_text()) == {"x": 1}
    assert json.loads((root / "a" / "z.json").read_text()) == {"z": 2}
    assert [f.name for f in (root / "a").files(".json")] == ["x.json", "y.json", "z.json"]
    assert (root / "a").exists() and not (root / "b").exists()
    assert (root / "nowhere").files() == []
    # No temporary names are left behind by a write or a put.
    infos = root.fs.get_file_info(pafs.FileSelector((root / "a").path))
    assert sorted(i.base_name for i in infos) == ["x.json", "y.json", "z.json"]
    local = tmp_path / "folder"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "f.txt").write_text("hello")
    (root / "copy").upload(local)
    (root / "copy").download(tmp_path / "back")
    assert (tmp_path / "back" / "sub" / "f.txt").read_text() == "hello"
    assert str(root).startswith("s3://leaf/unit" if where == "s3" else str(tmp_path))


def test_distill_and_eval_on_s3(tmp_path, tiny_teacher, demo_texts, s3_uri, ray_local):
    cfg = tiny_run_config(
        tmp_path,
        demo_texts[:400],
        tiny_teacher,
        "on-s3",
        run={"storage": under(s3_uri, "runs")},
        teacher={"num_actors": 2},
        train={"epochs": 1, "cycles": 1},
        eval={"datasets": [str(small_eval_set(tmp_path / "eval"))], "max_seq_length": 64},
    )
    run = distill(load_config(cfg))

    # Everything is in the bucket: the run (config.yaml marks it complete), Ray Train's
    # checkpoints, the teacher cache and the eval cache; nothing under the config's folder.
    assert str(run) == "s3://leaf/runs/on-s3"
    for part in ("config.yaml", "eval.json", "eval.md", "metrics.jsonl", "teacher_cache.json"):
        assert (run / part).is_file(), part
    assert (run / "student" / "modules.json").is_file()
    assert (run / "student_init" / "modules.json").is_file()
    assert (run / "mteb" / "results").exists()
    checkpoints = [
        i
        for i in (run / "ray_train").fs.get_file_info(pafs.FileSelector((run / "ray_train").path))
        if i.base_name.startswith("checkpoint_")
    ]
    assert checkpoints
    note = json.loads((run / "teacher_cache.json").read_text())
    assert note["cache"].startswith("s3://leaf/runs/teacher_cache/")
    storage = Location.of(under(s3_uri, "runs"))
    assert (storage / "eval_cache").exists()
    assert not (tmp_path / "runs").exists()

    # The evaluation job reads the run from the bucket and writes its reports back there.
    rows = json.loads((run / "eval.json").read_text())
    (run / "eval.json").write("[]")
    outcome = evaluate_run(run)
    assert outcome.embedded == {"student": 0, "student_init": 0, "teacher": 0}
    assert json.loads((run / "eval.json").read_text()) == rows
