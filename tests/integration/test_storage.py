"""Runs, checkpoints and caches on an object store: a local S3 (moto's server) through pyarrow.fs,
as a user's s3:// storage would be reached."""

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from leaf_ray import recipe
from leaf_ray.config import LeafConfig, load_config
from leaf_ray.data import sources
from leaf_ray.data.sources import DataError, read_texts
from leaf_ray.eval.tasks import EvalError
from leaf_ray.inputs import check_inputs
from leaf_ray.recipe import distill, evaluate_run
from leaf_ray.run import work_folder
from leaf_ray.storage import Location
from leaf_ray.teacher.cache import TeacherCache
from leaf_ray.teacher.vectors import ingest_vectors
from tests.conftest import tiny_run_config, under
from tests.integration.test_pipeline import main_scores, small_eval_set


def smaller_student(tiny_teacher: Path, folder: Path) -> Path:
    """A pretrained student related to the teacher: its encoder with one layer fewer."""
    from transformers import BertModel

    bert = BertModel.from_pretrained(tiny_teacher.parent / "hf")
    bert.encoder.layer = bert.encoder.layer[:1]
    bert.config.num_hidden_layers = 1
    bert.save_pretrained(folder)
    shutil.copytree(
        tiny_teacher.parent / "hf",
        folder,
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("*.safetensors", "config.json"),
    )
    return folder


def test_a_pretrained_student_on_s3_and_a_failed_evaluation_that_reruns_alone(
    tmp_path, tiny_teacher, demo_texts, s3_uri, ray_local, monkeypatch
):
    """A run whose storage is a bucket, with a pretrained student: the fitted (Procrustes)
    projection keeps its cosines, so as training starts it scores what the model alone scored,
    and its queries already land in the teacher's space. Its evaluation fails after training
    (a fault injected into it; a node lost, say); the same command resumes from the trained
    student: no teacher stage or training worker runs again, and the run is published in the
    bucket, the pretrained model scored beside it.

    One test for the three: each is a whole training run, and the object store's rerun (its
    run built in a local folder, its checkpoints in the bucket) is the one to resume."""
    storage = Location.of(under(s3_uri, "runs"))
    run = storage / "on-s3"
    # One an interrupted earlier test left on this port would hold a half-built run.
    shutil.rmtree(work_folder(run), ignore_errors=True)
    student = smaller_student(tiny_teacher, tmp_path / "small")
    cfg = tiny_run_config(
        tmp_path,
        demo_texts[:600],
        tiny_teacher,
        "on-s3",
        run={"storage": under(s3_uri, "runs")},
        student={"init": "pretrained", "model": str(student), "max_seq_length": 64},
        train={
            "epochs": 1,
            "cycles": 1,
            "batch_size": 32,
            "lr": 1e-4,
            "head_only_ratio": 0.2,
            "num_workers": 1,  # storage, not DDP, is under test
        },
        eval={"datasets": [str(small_eval_set(tmp_path / "eval"))], "max_seq_length": 64},
    )

    def broken(*args, **kwargs):
        raise EvalError("the evaluation failed")

    with monkeypatch.context() as patch:
        patch.setattr(recipe, "evaluate", broken)
        with pytest.raises(EvalError):
            distill(load_config(cfg))
    assert not (run / "config.yaml").exists()  # not published
    work = work_folder(run)  # where it builds, and its student waits
    trained = (work / "metrics.jsonl").read_text()
    assert (work / "student" / "modules.json").is_file()
    # Another store's run of the same name builds elsewhere: it never finds this student.
    assert work_folder(Location.of(under(s3_uri, "other"))) != work

    def again(*args, **kwargs):
        raise AssertionError("the student was trained: the teacher stage or training ran again")

    with monkeypatch.context() as patch:
        patch.setattr(recipe, "_teacher_stage", again)
        patch.setattr(recipe, "train_student", again)
        assert distill(load_config(cfg)) == run
    assert (run / "metrics.jsonl").read_text() == trained  # nothing trained again
    assert not work.exists()

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
    assert (storage / "eval_cache").exists()
    assert not (tmp_path / "runs").exists()

    rows = json.loads((run / "eval.json").read_text())
    scores = main_scores(rows)
    assert set(scores) == {
        "teacher",
        "pretrained",
        "student_init",
        "student",
        "asymmetric_init",
        "asymmetric",
    }
    assert scores["student_init"] == pytest.approx(scores["pretrained"], abs=1e-3), scores
    assert scores["asymmetric_init"] > 0.5 * scores["teacher"], scores
    assert "| pretrained |" in (run / "eval.md").read_text()
    full = {r["mode"]: r for r in rows if r["full"]}
    assert full["student_init"]["change"] == pytest.approx(0, abs=1e-3)  # against pretrained

    # The evaluation job reads the run from the bucket and writes its reports back there.
    (run / "eval.json").write("[]")
    outcome = evaluate_run(run)
    assert outcome.embedded == {"student": 0, "student_init": 0, "teacher": 0, "pretrained": 0}
    assert json.loads((run / "eval.json").read_text()) == rows


def test_sources_and_vectors_in_a_bucket_are_read_by_the_tasks(
    tmp_path, demo_texts, s3_uri, ray_local, monkeypatch
):
    """Training texts and precomputed vectors in an object store: the input check, the read
    (a plain JSON lines file in byte ranges, a compressed one whole) and the vectors' check and
    ingest run in Ray tasks that open the bucket themselves, as a node without the driver's
    disk would."""
    monkeypatch.setattr(sources, "PIECE_BYTES", 4000)  # the plain file in several pieces
    texts = demo_texts[:150]
    folder = Location.of(under(s3_uri, "data/texts"))
    lines = [json.dumps(t).encode() + b"\n" for t in texts]
    (folder / "a.jsonl").write(b"".join(lines[:100]))
    (folder / "b.jsonl.gz").write(gzip.compress(b"".join(lines[100:])))
    vectors = np.eye(150, 8, dtype=np.float32)[np.arange(150) % 8]  # unit rows
    table = pa.table(
        {
            "kind": [t["kind"] for t in texts],
            "text": [t["text"] for t in texts],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 8),
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=40)
    Location.of(under(s3_uri, "data/vectors.parquet")).write(sink.getvalue().to_pybytes())
    cfg = LeafConfig.model_validate(
        {
            "data": {"sources": [{"path": under(s3_uri, "data/texts")}]},
            "teacher": {"model": "black-box", "vectors": under(s3_uri, "data/vectors.parquet")},
            "student": {"init": "pretrained", "model": "org/student"},
        }
    )
    pieces = sources.source_pieces(cfg.data)
    assert len(pieces) > 3 and all(str(p.file).startswith("s3://leaf/data/texts/") for p in pieces)
    inputs = check_inputs(cfg)
    assert inputs.rows == 150
    read = read_texts(cfg.data, inputs.kept).take_all()
    assert sorted(r["id"] for r in read) == sorted(t["id"] for t in texts)

    cache = TeacherCache.open(Location.of(tmp_path / "cache"), {"bucket": 1}, "black-box")
    assert ingest_vectors(cfg.teacher, cache)
    ingested = pq.read_table(cache.shard_paths(cache.entries()))
    assert ingested.num_rows == 150 and sorted(ingested["text"].to_pylist()) == sorted(
        t["text"] for t in texts
    )

    lines[90] = b'{"id": "x", "text": null, "kind": "query"}\n'  # in a later piece of a.jsonl
    (folder / "a.jsonl").write(b"".join(lines[:100]))
    with pytest.raises(DataError, match=r"s3://leaf/data/texts/a.jsonl:91: text: null"):
        check_inputs(cfg)
