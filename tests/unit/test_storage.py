"""A storage Location writes whole files and copies folders."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest

from leaf_ray.run import work_folder
from leaf_ray.storage import Location
from tests.conftest import under


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


def test_runs_of_one_uri_on_two_servers_build_in_two_work_folders():
    """An object store's run builds in a local folder named by its URI: the same bucket and path
    on another server (two MinIOs, say) must not find the other's half-built run."""
    on = "s3://leaf/runs/r?region=us-east-1&scheme=http&endpoint_override="
    first, again = Location.of(on + "minio-a:9000"), Location.of(on + "minio-a:9000")
    other = Location.of(on + "minio-b:9000")
    assert str(first) == str(other)  # the URI Ray and the logs show leaves the server out
    assert work_folder(first) == work_folder(again)
    assert work_folder(first) != work_folder(other)
