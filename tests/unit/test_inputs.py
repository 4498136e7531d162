"""Source rows checked before Ray starts."""

from __future__ import annotations

import json

import pytest

from leaf_ray.config import SourceConfig
from leaf_ray.data.sources import DataError, check_source


def test_a_local_datasets_folder_is_checked_row_by_row_before_ray(tmp_path):
    """An `hf_dataset` that is a local folder is read on the driver and checked like files, each
    bad row named by its index; a missing field is named first. (A hub name is checked as it is
    read: a dry run downloads nothing.)"""
    folder = tmp_path / "hf"
    folder.mkdir()
    rows = [{"sentence": f"example {i}"} for i in range(30)]
    rows[4]["sentence"], rows[17]["sentence"] = None, "  "
    with open(folder / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    source = {"hf_dataset": str(folder), "text_field": "sentence", "kind": "document"}
    check = check_source(SourceConfig.model_validate(source), 0)
    assert check.rows == 28 and check.bad == {"sentence null": 1, "sentence empty": 1}
    assert check.examples == [
        f"{folder} (train) row 4: sentence: null",
        f"{folder} (train) row 17: sentence: empty",
    ]
    limited = check_source(SourceConfig.model_validate(source | {"limit": 4}), 0)
    assert (limited.rows, limited.bad) == (4, {})  # the first rows only, as training reads
    with pytest.raises(DataError, match=r"\(train\): no field 'text' \(fields: \['sentence'\]\)"):
        check_source(SourceConfig.model_validate(source | {"text_field": "text"}), 0)
