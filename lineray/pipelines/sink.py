"""The output dataset: whole Parquet files per shard, committed atomically, and a manifest.

Layout under the output URL:

    data/part-<shard>.parquet     one row per image (IMAGE_SCHEMA), Hugging Face Image column
    errors/part-<shard>.parquet   the shard's bad prompt rows (ERROR_SCHEMA), when it has any
    _manifest/<shard>.json        the commit record: a shard is done iff this exists
    _job.json                     the job's settings; a rerun must match them to resume
    _summary.json                 totals after the last run
    _tmp/                         local filesystems only: files before their rename

Every file is written whole: on object stores with one PUT (S3 makes an object
visible atomically, multipart uploads included), on local disks as a temp file
renamed into place. The manifest entry is written last, so a crash leaves at most
a data file without its entry; the rerun writes the same file again under the
same name. Readers: `pyarrow.dataset.dataset(OUT + "/data")` or
`datasets.load_dataset("parquet", data_files=OUT + "/data/*.parquet")`.
"""
from __future__ import annotations

import io
import json
import os
import time
import uuid
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

# What Hugging Face `datasets` reads from the schema metadata to type the columns
# (the `image` struct of bytes + path becomes an Image feature).
IMAGE_FEATURES = {
    "id": {"dtype": "string", "_type": "Value"},
    "image_index": {"dtype": "int32", "_type": "Value"},
    "class": {"dtype": "int64", "_type": "Value"},
    "text": {"dtype": "string", "_type": "Value"},
    "cfg_scale": {"dtype": "float32", "_type": "Value"},
    "count": {"dtype": "int32", "_type": "Value"},
    "seed": {"dtype": "int64", "_type": "Value"},
    "model": {"dtype": "string", "_type": "Value"},
    "cache_policy": {"dtype": "string", "_type": "Value"},
    "width": {"dtype": "int32", "_type": "Value"},
    "height": {"dtype": "int32", "_type": "Value"},
    "image": {"_type": "Image"},
}
IMAGE_SCHEMA = pa.schema([
    ("id", pa.string()), ("image_index", pa.int32()), ("class", pa.int64()), ("text", pa.string()),
    ("cfg_scale", pa.float32()), ("count", pa.int32()), ("seed", pa.int64()), ("model", pa.string()),
    ("cache_policy", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
], metadata={"huggingface": json.dumps({"info": {"features": IMAGE_FEATURES}})})
ERROR_SCHEMA = pa.schema([("file", pa.string()), ("row", pa.int64()), ("id", pa.string()),
                          ("reason", pa.string()), ("raw", pa.string())])


@dataclass
class Output:
    """The output dataset at an fsspec URL. Picklable (it travels to the reader task)."""
    url: str
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self):
        self._fs = None

    def __getstate__(self):
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state):
        self.__init__(**state)

    @property
    def fs(self):
        if self._fs is None:
            self._fs, self._root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return self._fs

    @property
    def root(self) -> str:
        self.fs  # noqa: B018 - resolves _root
        return self._root.rstrip("/")

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def data_path(self, key: str) -> str:
        return self.path("data", f"part-{key}.parquet")

    def errors_path(self, key: str) -> str:
        return self.path("errors", f"part-{key}.parquet")

    def manifest_path(self, key: str) -> str:
        return self.path("_manifest", f"{key}.json")

    # -- writing ---------------------------------------------------------------------------
    def write_atomic(self, path: str, data: bytes) -> None:
        """Make `path` hold `data`, all or nothing."""
        if self.is_local:
            tmp = self.path("_tmp", f"{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}")
            self.fs.makedirs(self.path("_tmp"), exist_ok=True)
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic within one filesystem
        else:
            self.fs.pipe_file(path, data)  # one PUT (or one multipart upload): visible whole or not at all

    def write_json(self, path: str, obj) -> None:
        self.write_atomic(path, json.dumps(obj, indent=1, sort_keys=True).encode())

    def read_json(self, path: str):
        try:
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None

    def relative(self, path: str) -> str:
        return path[len(self.root) + 1:]

    def write_errors(self, key: str, errors: list[dict]) -> None:
        self.write_atomic(self.errors_path(key), table_bytes(pa.Table.from_pylist(errors, schema=ERROR_SCHEMA)))

    def commit_shard(self, key: str, entry: dict, images: pa.Table | None = None) -> dict:
        """Write the shard's image file, then its manifest entry (the commit).

        entry: file, first_row, rows, images, errors. A shard with errors has had its
        errors file written before (by the reader, which knows the bad rows).
        """
        entry = dict(entry, shard=key, committed_at=time.time(), data=None, errors_file=None)
        if images is not None and images.num_rows:
            self.write_atomic(self.data_path(key), table_bytes(images))
            entry["data"] = self.relative(self.data_path(key))
        if entry.get("errors"):
            entry["errors_file"] = self.relative(self.errors_path(key))
        self.write_json(self.manifest_path(key), entry)
        return entry

    # -- reading -----------------------------------------------------------------------------
    def committed(self) -> dict[str, dict]:
        """Manifest entries by shard key."""
        folder = self.path("_manifest")
        try:
            paths = [p for p in self.fs.ls(folder, detail=False) if p.endswith(".json")]
        except FileNotFoundError:
            return {}
        if not paths:
            return {}
        blobs = self.fs.cat(paths)  # fetched concurrently on object stores
        return {p.rsplit("/", 1)[-1][:-5]: json.loads(b) for p, b in blobs.items()}

    def clean(self, committed: dict[str, dict]) -> int:
        """Remove what a crashed run left behind: temp files and files of uncommitted shards."""
        removed = 0
        if self.is_local and self.fs.exists(self.path("_tmp")):
            self.fs.rm(self.path("_tmp"), recursive=True)
        for sub in ("data", "errors"):
            try:
                paths = self.fs.ls(self.path(sub), detail=False)
            except FileNotFoundError:
                continue
            for p in paths:
                name = p.rsplit("/", 1)[-1]
                if name.startswith("part-") and name.endswith(".parquet") and name[5:-8] not in committed:
                    self.fs.rm(p)
                    removed += 1
        return removed


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def image_table(rows: list[dict], model: str, cache_policy: str) -> pa.Table:
    """Output rows (from the PNG stage, in any order) -> the shard's table, sorted by (row, image)."""
    rows = sorted(rows, key=lambda r: (r["row"], r["image_index"]))
    return pa.table({
        "id": [r["id"] for r in rows],
        "image_index": [r["image_index"] for r in rows],
        "class": [None if r["label"] < 0 else r["label"] for r in rows],
        "text": [r["text"] or None for r in rows],
        "cfg_scale": [r["cfg_scale"] for r in rows],
        "count": [r["count"] for r in rows],
        "seed": [r["seed"] for r in rows],
        "model": [model] * len(rows),
        "cache_policy": [cache_policy] * len(rows),
        "width": [r["width"] for r in rows],
        "height": [r["height"] for r in rows],
        "image": [{"bytes": r["png"], "path": f"{r['id']}-{r['image_index']}.png"} for r in rows],
    }, schema=IMAGE_SCHEMA)


class ShardSink:
    """Collects finished images by shard and commits each shard when its last image arrives.

    Rows can arrive in any order, from any replica, and more than once (a retried
    task): a shard keeps one image per (row, image index), and images of shards
    already committed are dropped. That makes the commit exactly-once.
    """

    def __init__(self, out: Output, model: str, cache_policy: str, committed: set[str]):
        self.out, self.model, self.cache_policy = out, model, cache_policy
        self.committed = set(committed)
        self.pending: dict[str, dict[tuple[int, int], dict]] = {}

    def add(self, rows: list[dict]) -> list[dict]:
        """Add finished images; returns the manifest entries of the shards this completed."""
        done = []
        for r in rows:
            key = r["shard"]
            if key in self.committed:
                continue
            images = self.pending.setdefault(key, {})
            images[(r["row"], r["image_index"])] = r
            if len(images) == r["shard_images"]:
                done.append(self._commit(key, r))
        return done

    def _commit(self, key: str, last: dict) -> dict:
        rows = list(self.pending.pop(key).values())
        entry = {"file": last["file"], "first_row": last["first_row"], "rows": last["shard_rows"],
                 "images": len(rows), "errors": last["shard_errors"]}
        entry = self.out.commit_shard(key, entry, image_table(rows, self.model, self.cache_policy))
        self.committed.add(key)
        return entry

    @property
    def incomplete(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.pending.items()}
