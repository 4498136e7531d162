import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leaf_ray.capacity import count_rows
from leaf_ray.cli import root_cause
from leaf_ray.config import DataConfig, LeafConfig, TeacherConfig
from leaf_ray.data import sources
from leaf_ray.data.sources import DataError, read_texts
from leaf_ray.inputs import check_inputs
from leaf_ray.storage import Location
from leaf_ray.teacher.cache import TeacherCache
from leaf_ray.teacher.vectors import check_vectors, ingest_vectors


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sources_are_unioned_and_normalised(tmp_path, demo_texts, ray_local):
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"body": "no id here"}, {"body": "nor here"}])
    cfg = DataConfig.model_validate(
        {
            "sources": [
                {"path": str(write_jsonl(tmp_path / "demo.jsonl", demo_texts[:50]))},
                {"path": str(plain), "text_field": "body", "kind": "query"},
            ]
        }
    )
    rows = read_texts(cfg).take_all()
    assert len(rows) == 52
    assert set(rows[0]) == {"id", "text", "kind", "source", "text_hash"}
    by_text = {r["text"]: r for r in rows}
    assert by_text["no id here"]["kind"] == "query"
    assert by_text["no id here"]["source"] == 1 and rows[0]["source"] in (0, 1)
    assert len(by_text["no id here"]["id"]) == 16  # content hash when the source has no ids
    assert {r["id"] for r in rows} >= {t["id"] for t in demo_texts[:50]}


def test_bad_sources_are_named(tmp_path, ray_local):
    """Found as the rows are read too (a file changed after its check): the user reads our line
    (the CLI's `root_cause`), not Ray's traceback."""
    with pytest.raises(DataError, match="no such file"):
        read_texts(DataConfig.model_validate({"sources": [{"path": str(tmp_path / "x.jsonl")}]}))
    bad_kind = write_jsonl(tmp_path / "k.jsonl", [{"id": "1", "text": "t", "kind": "passage"}])
    no_text = write_jsonl(tmp_path / "t.jsonl", [{"id": "1", "body": "t", "kind": "query"}])
    for path, message in [
        (bad_kind, "k.jsonl:1: kind: 'passage' is not one of query, document"),
        (no_text, "t.jsonl:1: text: missing"),
    ]:
        with pytest.raises(DataError) as error:
            read_texts(DataConfig.model_validate({"sources": [{"path": str(path)}]})).take_all()
        assert str(root_cause(error.value)).splitlines()[0].endswith(message)


def test_hugging_face_dataset_source(tmp_path, ray_local):
    """`hf_dataset` goes through `datasets.load_dataset`: a local folder here, a hub name online."""
    folder = tmp_path / "hf"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"sentence": f"example {i}"} for i in range(30)])
    cfg = DataConfig.model_validate(
        {"sources": [{"hf_dataset": str(folder), "text_field": "sentence", "kind": "document"}]}
    )
    rows = read_texts(cfg).take_all()
    assert sorted(r["text"] for r in rows) == sorted(f"example {i}" for i in range(30))
    assert {r["kind"] for r in rows} == {"document"}
    assert len({r["id"] for r in rows}) == 30


def test_a_limit_keeps_the_first_rows_in_file_order_on_every_pass(tmp_path, ray_local):
    folder = tmp_path / "parts"
    folder.mkdir()
    for part in range(4):  # four read tasks, finishing in any order
        rows = [
            {"id": f"{part}-{i}", "text": f"text {part} {i}", "kind": "query"} for i in range(50)
        ]
        write_jsonl(folder / f"part-{part}.jsonl", rows)
    hf = tmp_path / "hf"
    hf.mkdir()
    write_jsonl(hf / "train.jsonl", [{"sentence": f"example {i}"} for i in range(30)])
    sources = [
        {"path": str(folder), "limit": 120},
        {"hf_dataset": str(hf), "text_field": "sentence", "kind": "document", "limit": 7},
    ]
    cfg = LeafConfig.model_validate({"data": {"sources": sources}, "teacher": {"model": "org/m"}})
    inputs = check_inputs(cfg)
    assert inputs.rows == 120 + 7
    texts = read_texts(cfg.data, inputs.kept)
    first = [r["id"] for r in texts.take_all() if r["source"] == 0]
    assert sorted(first) == sorted(
        [f"0-{i}" for i in range(50)]
        + [f"1-{i}" for i in range(50)]
        + [f"2-{i}" for i in range(20)]
    )
    again = [r["id"] for r in texts.take_all() if r["source"] == 0]
    assert sorted(again) == sorted(first)
    hub = sorted(r["text"] for r in texts.take_all() if r["source"] == 1)
    assert hub == sorted(f"example {i}" for i in range(7))
    assert not texts.context.execution_options.preserve_order  # the stages after run unordered


def test_a_large_json_lines_file_is_read_in_pieces_each_line_once(tmp_path, ray_local, monkeypatch):
    """A plain JSON lines file is split into byte ranges, each read by its own task: every line
    is read once, whichever piece its first byte falls in, and a bad line in a later piece is
    named by its line in the file."""
    monkeypatch.setattr(sources, "PIECE_BYTES", 1000)  # ~17 pieces
    rows = [{"id": str(i), "text": f"text number {i}", "kind": "query"} for i in range(300)]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    source = {"path": str(path)}
    cfg = LeafConfig.model_validate({"data": {"sources": [source]}, "teacher": {"model": "org/m"}})
    pieces = sources.source_pieces(cfg.data)
    assert len(pieces) == -(-path.stat().st_size // 1000) > 10
    inputs = check_inputs(cfg)
    got = sorted(int(r["id"]) for r in read_texts(cfg.data, inputs.kept).take_all())
    assert got == list(range(300)) and inputs.rows == 300

    limited = LeafConfig.model_validate(
        cfg.model_dump() | {"data": {"sources": [source | {"limit": 123}]}}
    )
    kept = check_inputs(limited).kept
    assert sorted(int(r["id"]) for r in read_texts(limited.data, kept).take_all()) == list(
        range(123)
    )

    lines = path.read_text().splitlines()
    lines[250] = '{"id": "x", "text": null, "kind": "query"}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{path}:251: text: null"):
        check_inputs(cfg)


@pytest.mark.parametrize("form", ["jsonl folder", "jsonl.gz file", "parquet folder"])
def test_texts_vectors_and_plan_read_a_path_alike(tmp_path, form, ray_local):
    """One rule picks the files, and tells Parquet from JSON lines, for the texts, precomputed
    vectors and `plan`'s row counts: a file by its suffixes, a folder by whether it holds
    Parquet; in a folder, only data files count."""
    rows = [
        {"id": str(i), "kind": "query", "text": f"text {i}", "embedding": [float(i) + 1, 1.0]}
        for i in range(7)
    ]
    path = tmp_path / "in"
    if form == "jsonl.gz file":
        path = tmp_path / "in.jsonl.gz"
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        path.mkdir()
        for part, chunk in enumerate((rows[:3], rows[3:])):
            if form == "parquet folder":
                pq.write_table(pa.Table.from_pylist(chunk), path / f"part-{part}.parquet")
            else:
                write_jsonl(path / f"part-{part}.jsonl", chunk)
        (path / ".hidden").write_text("not data\n")
        (path / "README.md").write_text("# not data either\n")
    texts = read_texts(DataConfig.model_validate({"sources": [{"path": str(path)}]})).take_all()
    teacher = TeacherConfig(model="m", vectors=str(path))
    cache = TeacherCache.open(Location.of(tmp_path / "cache"), {"test": form}, "m")
    assert ingest_vectors(teacher, cache) and not ingest_vectors(teacher, cache)  # once
    vectors = pq.read_table(cache.shard_paths(cache.entries()))
    assert (
        count_rows(Location.of(path))
        == len(texts)
        == check_vectors(teacher).rows
        == vectors.num_rows
        == 7
    )
    assert sorted(vectors["embedding"].to_pylist()) == [r["embedding"] for r in rows]


def test_skip_drops_bad_rows_where_error_refuses_them(tmp_path, ray_local):
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps({"id": str(i), "text": f"text {i}", "kind": "query"}) for i in range(5)]
    bad = ["{oops", json.dumps({"id": "n", "text": None, "kind": "query"}), '"just a string"']
    path.write_bytes(("\n".join(good[:2] + bad + good[2:]) + "\n").encode() + b"\xff\xfe\n")
    source = {"path": str(path)}
    skip = DataConfig.model_validate({"sources": [source], "bad_rows": "skip"})
    assert sorted(r["id"] for r in read_texts(skip).take_all()) == [str(i) for i in range(5)]
    with pytest.raises(DataError, match=r"mixed.jsonl:3: invalid JSON"):
        read_texts(DataConfig.model_validate({"sources": [source]})).take_all()


def test_a_datasets_folder_is_checked_row_by_row(tmp_path, ray_local):
    """An `hf_dataset` (here a local folder; a hub name is streamed the same way, where its
    task runs) is checked like files, each bad row named by its index, the first few listed;
    a missing field is named first. A hub name is checked as it is read: a dry run downloads
    nothing."""
    folder = tmp_path / "hf"
    folder.mkdir()
    rows = [{"sentence": f"example {i}"} for i in range(30)]
    rows[4]["sentence"], rows[17]["sentence"] = None, "  "
    write_jsonl(folder / "train.jsonl", rows)
    source = {"hf_dataset": str(folder), "text_field": "sentence", "kind": "document"}

    def config(**changes) -> LeafConfig:
        data = {"sources": [source | changes], "bad_rows": "skip"}
        return LeafConfig.model_validate({"data": data, "teacher": {"model": "org/m"}})

    inputs = check_inputs(config())
    assert inputs.rows == 28 and inputs.skipped == {"sentence null": 1, "sentence empty": 1}
    strict = config().model_copy(
        update={"data": config().data.model_copy(update={"bad_rows": "error"})}
    )
    with pytest.raises(DataError) as error:
        check_inputs(strict)
    assert f"{folder} (train) row 4: sentence: null" in str(error.value)
    assert f"{folder} (train) row 17: sentence: empty" in str(error.value)
    limited = check_inputs(config(limit=4))
    assert (limited.rows, limited.skipped) == (4, {})  # the first rows only, as training reads
    with pytest.raises(DataError) as error:
        check_inputs(config(text_field="text"))
    assert "(train): no field 'text' (fields: ['sentence'])" in str(root_cause(error.value))


def test_a_hub_layout_dataset_with_a_limit_reads_no_more_than_it_needs(tmp_path, ray_local):
    """A dataset in the hub's layout, two Parquet files of its split: with a limit inside the
    first, the second is never opened (it is not even Parquet here), by the check or the read."""
    folder = tmp_path / "hub" / "data"
    folder.mkdir(parents=True)
    rows = [{"text": f"web page {i}", "url": f"https://example.org/{i}"} for i in range(50)]
    pq.write_table(pa.Table.from_pylist(rows), folder / "train-00000-of-00002.parquet")
    (folder / "train-00001-of-00002.parquet").write_bytes(b"PAR1 not a Parquet file at all")
    source = {"hf_dataset": str(folder.parent), "kind": "document", "limit": 20}
    cfg = LeafConfig.model_validate({"data": {"sources": [source]}, "teacher": {"model": "org/m"}})
    inputs = check_inputs(cfg)
    assert inputs.rows == 20
    read = read_texts(cfg.data, inputs.kept).take_all()
    assert sorted(r["text"] for r in read) == sorted(f"web page {i}" for i in range(20))
    assert {r["kind"] for r in read} == {"document"}
