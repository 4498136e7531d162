"""Bad input is refused before anything is written, naming the file, line (or row) and field."""

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from leaf_ray.cli import main, root_cause
from leaf_ray.config import TeacherConfig
from leaf_ray.data.sources import DataError
from leaf_ray.teacher.space import teacher_space
from tests.unit.test_config import MINIMAL, write


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


# --- Bad sources, models and eval folders: `leaf-ray distill` exits 2, nothing written -------

GOOD_ROWS = [
    {"id": str(i), "text": f"text number {i}", "kind": "query" if i % 2 else "document"}
    for i in range(8)
]


def bad_input_run(tmp_path, tiny_teacher, edit) -> tuple[Path, str]:
    """A tiny run's files (texts, an eval folder, the config), one of them spoiled by `edit`;
    returns the config and the run's name."""
    texts = tmp_path / "texts.jsonl"
    texts.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in GOOD_ROWS))
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text('{"_id": "d1", "text": "a document"}\n')
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "a query"}\n')
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    config = {
        "run": {"name": "bad", "storage": "out"},
        "data": {"sources": [{"path": "texts.jsonl"}]},
        "teacher": {"model": str(tiny_teacher)},
        "eval": {"datasets": ["beir"]},
    }
    edit(tmp_path, config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, "bad"


def lines(*rows: bytes) -> bytes:
    return b"".join(row + b"\n" for row in rows)


def spoil_eval(name: str, data: bytes):
    """An edit that replaces the eval folder's `name` with `data`."""

    def edit(root, config):
        (root / "beir" / name).write_bytes(data)

    return edit


def spoil_texts(data: bytes, name: str = "texts.jsonl"):
    def edit(root, config):
        (root / name).write_bytes(data)
        config["data"]["sources"][0]["path"] = name

    return edit


good = [json.dumps(r).encode() for r in GOOD_ROWS]


def mixed_folder(root, config):
    """A source folder with a Parquet file and a JSON lines file: one format would be dropped."""
    (root / "mixed").mkdir()
    pq.write_table(pa.Table.from_pylist(GOOD_ROWS[:4]), root / "mixed" / "a.parquet")
    (root / "mixed" / "b.jsonl").write_bytes(lines(*good[4:]))
    config["data"]["sources"][0]["path"] = "mixed"


def not_a_model(root, config):
    (root / "notmodel").mkdir()
    (root / "notmodel" / "README.md").write_text("not a model")
    config["teacher"]["model"] = "./notmodel"


BAD_INPUTS = {
    "malformed JSON": (
        spoil_texts(lines(*good[:2], b'{"id": "x", "text": ', *good[2:])),
        "texts.jsonl:3: invalid JSON: Expecting value",
    ),
    "invalid UTF-8": (
        spoil_texts(lines(good[0], b'{"id": "x", "text": "caf\xe9", "kind": "query"}')),
        "texts.jsonl:2: invalid UTF-8 at byte",
    ),
    "null text": (
        spoil_texts(lines(*good[:3], b'{"id": "x", "text": null, "kind": "query"}')),
        "texts.jsonl:4: text: null",
    ),
    "no text field": (
        spoil_texts(lines(b'{"id": "x", "body": "t", "kind": "query"}', *good)),
        "texts.jsonl:1: text: missing",
    ),
    "a number as text": (
        spoil_texts(lines(*good, b'{"id": "x", "text": 42, "kind": "query"}')),
        "texts.jsonl:9: text: a int, not a string",
    ),
    "empty text": (
        spoil_texts(lines(good[0], b'{"id": "x", "text": "  ", "kind": "query"}')),
        "texts.jsonl:2: text: empty",
    ),
    "unknown kind": (
        spoil_texts(lines(good[0], b'{"id": "x", "text": "t", "kind": "passage"}')),
        "texts.jsonl:2: kind: 'passage' is not one of query, document",
    ),
    "truncated gzip": (
        spoil_texts(gzip.compress(lines(*good) * 50)[:-40], "texts.jsonl.gz"),
        "texts.jsonl.gz: cannot be decompressed, truncated or not gzip",
    ),
    "no such source": (
        lambda root, config: config["data"]["sources"][0].update(path="nope.jsonl"),
        "nope.jsonl: no such file or folder",
    ),
    "no such teacher folder": (
        lambda root, config: config["teacher"].update(model="./models/nope"),
        "models/nope: no such folder",
    ),
    "eval folder without qrels": (
        lambda root, config: (root / "beir" / "qrels" / "test.tsv").unlink(),
        "beir/qrels/test.tsv: no such file",
    ),
    "eval folder without queries": (
        spoil_eval("queries.jsonl", b""),
        "beir/qrels/test.tsv:2: unknown query or corpus id 'q1'/'d1'",
    ),
    "a lone surrogate in a text": (
        spoil_texts(lines(good[0], b'{"id": "x", "text": "bad \\ud800 x", "kind": "query"}')),
        "texts.jsonl:2: text: a lone surrogate at character 4",
    ),
    "plain text named .gz": (
        spoil_texts(lines(*good), "texts.jsonl.gz"),
        "texts.jsonl.gz: named .gz but not gzip-compressed",
    ),
    "a folder of Parquet and JSON lines": (
        mixed_folder,
        "/mixed: holds both Parquet and JSON lines files (a.parquet, b.jsonl)",
    ),
    "a teacher folder that is not a model": (
        not_a_model,
        "/notmodel: not a model folder (no modules.json or config.json)",
    ),
    "a teacher that does not match its pin": (
        lambda root, config: config["teacher"].update(sha256="f" * 64),
        "model.safetensors: sha256",
    ),
    "an eval corpus line that is not an object": (
        spoil_eval("corpus.jsonl", b'{"_id": "d1", "text": "a"}\n5\n'),
        "beir/corpus.jsonl:2: a JSON int, not an object",
    ),
    "an eval id that is a list": (
        spoil_eval("corpus.jsonl", b'{"_id": ["d1"], "text": "a"}\n'),
        "beir/corpus.jsonl:1: _id: a list, not a string",
    ),
    "an eval query that is null": (
        spoil_eval("queries.jsonl", b'{"_id": "q1", "text": null}\n'),
        "beir/queries.jsonl:1: text: null, not a string",
    ),
    "an eval file that is not UTF-8": (
        spoil_eval("queries.jsonl", b'{"_id": "q1", "text": "caf\xe9"}\n'),
        "beir/queries.jsonl:1: invalid UTF-8 at byte",
    ),
    "eval qrels naming no query": (
        spoil_eval("qrels/test.tsv", b"query-id\n"),
        "/beir: no query has a qrels line",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_distill_before_anything_is_written_with_one_line(
    case, tmp_path, tiny_teacher, capsys, ray_local
):
    edit, message = BAD_INPUTS[case]
    config, name = bad_input_run(tmp_path, tiny_teacher, edit)
    assert main(["distill", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    out = tmp_path / "out"
    assert not (out / name).exists() and not (out / f".{name}.partial").exists()
    assert main(["distill", "--config", str(config), "--dry-run"]) == 2  # and by a dry run


def test_many_bad_rows_are_listed_first_few_then_counted(tmp_path, tiny_teacher, capsys, ray_local):
    rows = [b'{"id": "%d", "text": null, "kind": "query"}' % i for i in range(9)]
    edit = spoil_texts(lines(*good, *rows))
    config, _ = bad_input_run(tmp_path, tiny_teacher, edit)
    assert main(["distill", "--config", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "9 bad row(s) (data.bad_rows=skip drops them)" in err
    assert err.count(": text: null") == 5 and "... and 4 more" in err


def test_skipped_bad_rows_are_counted_by_reason(tmp_path, tiny_teacher, capsys, ray_local):
    rows = [b"{oops", b'{"id": "y", "text": null, "kind": "query"}', b'{"text": ""}']
    config, _ = bad_input_run(tmp_path, tiny_teacher, spoil_texts(lines(*good, *rows)))
    argv = ["distill", "--config", str(config), "--dry-run", "data.bad_rows=skip"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "bad rows skipped: 1 invalid JSON, 1 text empty, 1 text null" in out


def test_vectors_for_none_of_the_texts_are_refused(tmp_path, capsys, ray_local):
    path = vectors_file(tmp_path, unit_rows(20))  # texts "text 0".. "text 19", all queries

    def edit(root, config):
        config["teacher"] = {"model": "black-box", "vectors": path}
        config["student"] = {
            "init": "pretrained",
            "model": "sentence-transformers/all-MiniLM-L6-v2",
        }

    config, _ = bad_input_run(tmp_path, "unused", edit)
    assert main(["distill", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"teacher.vectors: {path}: no vector for 8 text(s) of the sources" in err


def test_errors_from_inside_ray_reach_the_user_as_their_root_cause(
    tmp_path, tiny_teacher, capsys, monkeypatch
):
    """A worker's error comes back wrapped (Ray Train's worker group, Ray's task error): the
    user reads our one line, or the whole trace with --debug."""
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import WorkerGroupError

    cause = DataError("texts.jsonl:3: text: null")
    task = RayTaskError("train_loop", "Traceback ...\n(many lines)", cause)
    wrapped = WorkerGroupError("Training failed due to worker errors", {0: task})
    assert root_cause(wrapped) is cause

    def fails(cfg):
        raise wrapped

    monkeypatch.setattr("leaf_ray.cli.distill", fails)
    config, _ = bad_input_run(tmp_path, tiny_teacher, lambda root, config: None)
    assert main(["distill", "--config", str(config)]) == 2
    assert capsys.readouterr().err == "leaf-ray: error: texts.jsonl:3: text: null\n"
    with pytest.raises(WorkerGroupError):
        main(["--debug", "distill", "--config", str(config)])

    def crashes(cfg):
        raise WorkerGroupError("Training failed", {1: MemoryError("out of memory\nmore")})

    monkeypatch.setattr("leaf_ray.cli.distill", crashes)
    assert main(["distill", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("leaf-ray: error: MemoryError: out of memory\n")
    assert "leaf-ray --debug" in err


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys, ray_local):
    (tmp_path / "texts.jsonl").write_text('{"id": "1", "text": "a text", "kind": "query"}\n')
    path = write(tmp_path, MINIMAL + "run:\n  storage: out\n  name: plan\n")
    assert main(["distill", "--config", str(path), "--dry-run", "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert f"run {tmp_path / 'out' / 'plan'}" in out
    teacher = "1. teacher sentence-transformers/all-MiniLM-L6-v2 (sentence-transformers) on 1 Ray"
    assert teacher in out
    assert f"vectors cached (float32) in {tmp_path / 'out' / 'teacher_cache'}" in out
    assert f"texts from {tmp_path / 'texts.jsonl'}" in out
    assert "1 texts in the files" in out
    assert "3 epoch(s) in 3 cycle(s) of batch 32" in out
    assert "inputs checked; no bad rows" in out
    assert not (tmp_path / "out").exists()
    assert main(["distill", "--config", str(path), "--dry-run", "train.data_mode=streaming"]) == 0
    assert "streamed into training every epoch, not cached" in capsys.readouterr().out
