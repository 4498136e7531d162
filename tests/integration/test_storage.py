"""Runs, checkpoints and caches on an object store: a local S3 (moto's server) through pyarrow.fs,
as a user's s3:// storage would be reached."""

import json

import pyarrow.fs as pafs

from leaf_ray.config import load_config
from leaf_ray.recipe import distill, evaluate_run
from leaf_ray.storage import Location
from tests.conftest import tiny_run_config, under
from tests.integration.test_pipeline import small_eval_set


def test_distill_and_eval_on_s3(tmp_path, tiny_teacher, demo_texts, s3_uri, ray_local):
    cfg = tiny_run_config(
        tmp_path,
        demo_texts[:400],
        tiny_teacher,
        "on-s3",
        run={"storage": under(s3_uri, "runs")},
        teacher={"num_actors": 2},
        train={"epochs": 1, "cycles": 1, "num_workers": 1},  # storage, not DDP, is under test
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
