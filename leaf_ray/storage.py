"""Where runs, checkpoints and caches live: a local or NFS path, or an object-store URI (s3://,
gs://) opened with pyarrow.fs, the filesystem layer Ray Train and Ray Data use too.

An S3-compatible store other than AWS is named in the URI itself, e.g.
`s3://bucket/leaf?endpoint_override=minio:9000&scheme=http`; credentials come from the usual
AWS (or Google) variables on every node, never the URI (the config refuses them: it is saved with
the run). The URI travels with every Ray task that writes, so workers on other nodes reach the
same store.
"""

from __future__ import annotations

import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs


@dataclass(frozen=True, eq=False)
class Location:
    """A folder or file on some filesystem: pyarrow's filesystem plus a path within it."""

    fs: pafs.FileSystem
    path: str

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and self.path == other.path and self.fs.equals(other.fs)

    def __hash__(self) -> int:  # pyarrow filesystems are not hashable
        return hash((self.fs.type_name, self.path))

    @classmethod
    def of(cls, uri: str | Path) -> Location:
        uri = str(uri)
        if "://" not in uri:
            return cls(pafs.LocalFileSystem(), str(Path(uri).resolve()))
        fs, path = pafs.FileSystem.from_uri(uri)
        return cls(fs, path.rstrip("/"))

    def __truediv__(self, name: str) -> Location:
        return Location(self.fs, posixpath.join(self.path, name))

    def __str__(self) -> str:
        return self.path if self.is_local else f"{self.fs.type_name}://{self.path}"

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def endpoint(self) -> str:
        """The server an object store's path lives on ("" for the provider's own, or local).
        pyarrow's filesystems say it only through their pickled options."""
        if self.is_local:
            return ""
        options = self.fs.__reduce__()[1][0]
        return f"{options['scheme']}://{options['endpoint_override']}"

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def read_bytes(self) -> bytes:
        # The bytes as stored: pyarrow would otherwise decompress a `.gz` by its name.
        with self.fs.open_input_stream(self.path, compression=None) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write(self, data: str | bytes) -> None:
        data = data.encode() if isinstance(data, str) else data
        # Written as given: pyarrow would otherwise compress a `.gz` (again) by its name.
        with self._whole() as target, self.fs.open_output_stream(target, compression=None) as f:
            f.write(data)

    def move_to(self, target: Location) -> None:
        """Rename (local, NFS) or copy then delete (object stores) a file to `target`."""
        target.fs.create_dir(posixpath.dirname(target.path), recursive=True)
        self.fs.move(self.path, target.path)

    def put(self, local: Path) -> None:
        """Copy a local file here, whole (for files built piece by piece, too big for `write`)."""
        with self._whole() as target:
            pafs.copy_files(
                str(local),
                target,
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=self.fs,
            )

    @contextmanager
    def _whole(self) -> Iterator[str]:
        """Readers never see a half-written file: a local or NFS file is written under a
        temporary name, then renamed; an object store's PUT is already all or nothing."""
        parent = posixpath.dirname(self.path)
        self.fs.create_dir(parent, recursive=True)
        if not self.is_local:
            yield self.path
            return
        temporary = posixpath.join(parent, f".{self.name}.{uuid.uuid4().hex}.tmp")
        try:
            yield temporary
            self.fs.move(temporary, self.path)
        except BaseException:
            if self.fs.get_file_info(temporary).type != pafs.FileType.NotFound:
                self.fs.delete_file(temporary)
            raise

    def files(self, suffix: str = "") -> list[Location]:
        """The files directly in this folder, by name; none when the folder is absent."""
        selector = pafs.FileSelector(self.path, allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File)
        return [self / n for n in names if n.endswith(suffix) and not n.startswith(".")]

    def upload(self, folder: Path) -> None:
        """Copy a local folder here, file by file (pyarrow's copy; parallel for object stores)."""
        self.mkdir()
        pafs.copy_files(
            str(folder),
            self.path,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self.fs,
        )

    def download(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            self.path,
            str(folder),
            source_filesystem=self.fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )
