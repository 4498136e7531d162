import json

import pytest

from leaf_ray.config import DataConfig
from leaf_ray.data import DataError, read_texts


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
    assert set(rows[0]) == {"id", "text", "kind"}
    by_text = {r["text"]: r for r in rows}
    assert by_text["no id here"]["kind"] == "query"
    assert len(by_text["no id here"]["id"]) == 16  # content hash when the source has no ids
    assert {r["id"] for r in rows} >= {t["id"] for t in demo_texts[:50]}


def test_bad_sources_are_named(tmp_path, ray_local):
    with pytest.raises(DataError, match="no such file"):
        read_texts(DataConfig.model_validate({"sources": [{"path": str(tmp_path / "x.jsonl")}]}))
    bad_kind = write_jsonl(tmp_path / "k.jsonl", [{"id": "1", "text": "t", "kind": "passage"}])
    with pytest.raises(DataError, match=r"k.jsonl: field 'kind' has \['passage'\]"):
        read_texts(DataConfig.model_validate({"sources": [{"path": str(bad_kind)}]})).take_all()
    no_text = write_jsonl(tmp_path / "t.jsonl", [{"id": "1", "body": "t", "kind": "query"}])
    with pytest.raises(DataError, match=r"t.jsonl: no field 'text'"):
        read_texts(DataConfig.model_validate({"sources": [{"path": str(no_text)}]}))


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
