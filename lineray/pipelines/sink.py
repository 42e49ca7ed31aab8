"""The output dataset: whole Parquet files per shard, committed atomically, and a manifest.

Layout under the output URL:

    data/part-<shard>.parquet     one row per image (IMAGE_SCHEMA; PROMPT_IMAGE_SCHEMA for text-prompt
                                  families), Hugging Face Image column
    errors/part-<shard>.parquet   the shard's bad prompt rows (ERROR_SCHEMA), when it has any
    _manifest/<shard>.json        the commit record: a shard is done iff this exists; it holds the
                                  size and checksums of the shard's files
    _inflight/<shard>.json        written before any file of the shard: proof that those names are ours
    _job.json                     the job's settings; a rerun must match them to resume
    _summary.json                 totals after the last run
    _tmp/<32 hex>-<name>          local filesystems only: files before their rename

Every file is written whole: on object stores with one PUT (S3 makes an object
visible atomically, multipart uploads included), on local disks as a temp file
renamed into place. A shard's in-flight record comes first and its manifest entry
last, so a crash leaves files that the in-flight record proves are this job's:
the rerun deletes them and does the shard again.

Ownership: the job deletes only files its manifest or in-flight records name, and
its own temp names. An output without `_job.json` that holds anything is refused
(`overwrite` clears it); files of others inside a lineray output are left alone.
Readers: `pyarrow.dataset.dataset(OUT + "/data")` or
`datasets.load_dataset("parquet", data_files=OUT + "/data/*.parquet")`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from contextlib import suppress
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from lineray.pipelines.storage import StorageError, open_fs, storage_errors

TEMP_NAME = re.compile(r"^[0-9a-f]{32}-")  # _tmp/<uuid hex>-<final name>: what write_atomic leaves after a crash

# What Hugging Face `datasets` reads from the schema metadata to type the columns
# (the `image` struct of bytes + path becomes an Image feature; `label` a ClassLabel where the model names
# its classes).
IMAGE_FEATURES = {
    "id": {"dtype": "string", "_type": "Value"},
    "image_index": {"dtype": "int32", "_type": "Value"},
    "label": {"dtype": "int64", "_type": "Value"},
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


def image_schema(class_names: list[str] | None = None, prompts: bool = False) -> pa.Schema:
    """The output's schema; with class names, `label` is a Hugging Face ClassLabel (names in the metadata).

    prompts: a text-prompt family (Janus-Pro, ...): a `prompt` column instead of `label` and `text`."""
    features = dict(IMAGE_FEATURES)
    if class_names:
        features["label"] = {"names": list(class_names), "_type": "ClassLabel"}
    fields = [("id", pa.string()), ("image_index", pa.int32()), ("label", pa.int64()), ("text", pa.string()),
              ("cfg_scale", pa.float32()), ("count", pa.int32()), ("seed", pa.int64()), ("model", pa.string()),
              ("cache_policy", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
              ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))]
    if prompts:
        fields = [("prompt", pa.string()) if name == "label" else (name, t) for name, t in fields if name != "text"]
        features = {("prompt" if k == "label" else k): (PROMPT_FEATURE if k == "label" else v)
                    for k, v in features.items() if k != "text"}
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": features}})})


PROMPT_FEATURE = {"dtype": "string", "_type": "Value"}
IMAGE_SCHEMA = image_schema()  # a model without class names (t2i, random weights)
PROMPT_IMAGE_SCHEMA = image_schema(prompts=True)  # text-prompt families
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
            self._fs, self._root = open_fs(self.url, self.storage_options)
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

    def inflight_path(self, key: str) -> str:
        return self.path("_inflight", f"{key}.json")

    def errors(self, what: str = ""):
        """`with out.errors(): ...`: storage exceptions become one-line StorageErrors naming this output."""
        return storage_errors(self.url, self.storage_options, what)

    # -- writing ---------------------------------------------------------------------------
    def write_atomic(self, path: str, data: bytes) -> dict:
        """Make `path` hold `data`, all or nothing; returns what the manifest records of it (size, checksums)."""
        with self.errors(self.relative(path)):
            self._write(path, data)
        meta = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if not self.is_local:  # the store's own checksum (S3: the ETag), compared on resume without a download
            with self.errors(self.relative(path)):
                self.fs.invalidate_cache(path)  # the object just written, not a cached listing of the old one
                etag = _etag(self.fs.info(path))
            if etag:
                meta["etag"] = etag
        return meta

    def _write(self, path: str, data: bytes) -> None:
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
            with self.errors(self.relative(path)):
                blob = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        return self._parse_json(path, blob)

    def _parse_json(self, path: str, blob: bytes):
        try:
            return json.loads(blob)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            state = "empty" if not blob.strip() else f"not valid JSON ({e})"
            raise StorageError(f"{self.url}/{self.relative(path)} is {state}: a damaged lineray record; delete it "
                               f"(its shard is then done again) or use another output") from None

    def relative(self, path: str) -> str:
        return path[len(self.root) + 1:] if path.startswith(self.root + "/") else path

    def begin_shard(self, key: str) -> None:
        """Record that this job is about to write the shard's files (before the first of them)."""
        self.write_json(self.inflight_path(key), {"shard": key, "started_at": time.time(),
                                                  "files": [self.relative(self.data_path(key)),
                                                            self.relative(self.errors_path(key))]})

    def write_errors(self, key: str, errors: list[dict]) -> dict:
        """The shard's bad rows (the caller has begun the shard); returns the file's size and checksums."""
        return self.write_atomic(self.errors_path(key),
                                 table_bytes(pa.Table.from_pylist(errors, schema=ERROR_SCHEMA)))

    def commit_shard(self, key: str, entry: dict, images: pa.Table | None = None,
                     errors_meta: dict | None = None) -> dict:
        """Write the shard's image file, then its manifest entry (the commit), then drop its in-flight record.

        entry: file, first_row, rows, images, errors. A shard with errors has had its
        errors file written before (by the reader, which knows the bad rows); errors_meta
        is what write_errors returned.
        """
        entry = dict(entry, shard=key, committed_at=time.time(), data=None, errors_file=None, files={})
        if images is not None and images.num_rows:
            entry["data"] = self.relative(self.data_path(key))
            entry["files"][entry["data"]] = self.write_atomic(self.data_path(key), table_bytes(images))
        if entry.get("errors"):
            entry["errors_file"] = self.relative(self.errors_path(key))
            if errors_meta:
                entry["files"][entry["errors_file"]] = errors_meta
        self.write_json(self.manifest_path(key), entry)
        with self.errors(), suppress(FileNotFoundError):
            self.fs.rm_file(self.inflight_path(key))
        return entry

    # -- reading -----------------------------------------------------------------------------
    def committed(self) -> dict[str, dict]:
        """Manifest entries by shard key (a damaged entry is a StorageError naming its file)."""
        paths = self._ls("_manifest", ".json")
        if not paths:
            return {}
        with self.errors("_manifest"):
            blobs = self.fs.cat(paths)  # fetched concurrently on object stores
        return {p.rsplit("/", 1)[-1][:-5]: self._parse_json(p, b) for p, b in blobs.items()}

    def _ls(self, folder: str, suffix: str = "") -> list[str]:
        try:
            with self.errors(folder):
                self.fs.invalidate_cache(self.path(folder))  # s3fs caches listings; commits happen elsewhere
                paths = self.fs.ls(self.path(folder), detail=False)
        except FileNotFoundError:
            return []
        return [p for p in paths if p.endswith(suffix)]

    def inventory(self) -> dict[str, dict]:
        """Every file under the output: relative path -> fsspec info (size, ETag on S3)."""
        try:
            with self.errors():
                self.fs.invalidate_cache(self.root)
                found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        return {self.relative(p): info for p, info in found.items() if info.get("type", "file") == "file"}

    def check_committed(self, committed: dict[str, dict], verify: bool = False,
                        inventory: dict[str, dict] | None = None) -> dict[str, str]:
        """Shards whose committed files are missing or damaged -> what is wrong.

        The size (and the store's ETag where both are known) comes from one listing; with
        `verify` every file is read back and its SHA-256 compared too.
        """
        inventory = self.inventory() if inventory is None else inventory
        damaged = {}
        for key, entry in committed.items():
            for name, meta in (entry.get("files") or {}).items():
                info = inventory.get(name)
                if info is None:
                    damaged[key] = f"{name} is missing"
                elif info.get("size") != meta["size"]:
                    damaged[key] = f"{name} has size {info.get('size')}, the manifest says {meta['size']}"
                elif meta.get("etag") and _etag(info) and _etag(info) != meta["etag"]:
                    damaged[key] = f"{name} has ETag {_etag(info)}, the manifest says {meta['etag']}"
                elif verify:
                    with self.errors(name):
                        digest = hashlib.sha256(self.fs.cat_file(self.path(name))).hexdigest()
                    if digest != meta["sha256"]:
                        damaged[key] = f"{name} has SHA-256 {digest[:12]}..., the manifest says {meta['sha256'][:12]}..."
                if key in damaged:
                    break
        return damaged

    def forget_shard(self, key: str) -> None:
        """Undo a commit (a damaged shard): its files are ours (the manifest says so), so they go; the shard is redone."""
        self.begin_shard(key)  # a crash from here on leaves files the in-flight record proves are ours
        for path in (self.manifest_path(key), self.data_path(key), self.errors_path(key)):
            with self.errors(), suppress(FileNotFoundError):
                self.fs.rm_file(path)

    def clean(self, committed: dict[str, dict], inventory: dict[str, dict] | None = None) -> list[str]:
        """Remove what a crashed run of this job left: its temp files and the files of shards it began but did
        not commit. Returns the files under data/ and errors/ that are not this job's (left alone)."""
        inventory = self.inventory() if inventory is None else inventory
        for name in inventory:
            folder, _, base = name.partition("/")
            if folder == "_tmp" and TEMP_NAME.match(base) and self.is_local:
                self.fs.rm_file(self.path(name))
        begun = set()
        for name in inventory:
            if name.startswith("_inflight/") and name.endswith(".json"):
                key = name[len("_inflight/"):-5]
                begun.add(key)
                if key not in committed:
                    for path in (self.data_path(key), self.errors_path(key)):
                        with self.errors(), suppress(FileNotFoundError):
                            self.fs.rm_file(path)
                with self.errors(), suppress(FileNotFoundError):
                    self.fs.rm_file(self.path(name))
        owned = {n for e in committed.values() for n in (e.get("data"), e.get("errors_file")) if n}
        owned |= {self.relative(p(k)) for k in begun for p in (self.data_path, self.errors_path)}
        return sorted(n for n in inventory if n.split("/", 1)[0] in ("data", "errors") and n not in owned)


def _etag(info: dict) -> str | None:
    etag = info.get("ETag") or info.get("etag")
    return etag.strip('"') if isinstance(etag, str) else None


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def image_table(rows: list[dict], model: str, cache_policy: str, schema: pa.Schema = IMAGE_SCHEMA) -> pa.Table:
    """Output rows (from the PNG stage, in any order) -> the shard's table, sorted by (row, image)."""
    rows = sorted(rows, key=lambda r: (r["row"], r["image_index"]))
    columns = {
        "id": [r["id"] for r in rows],
        "image_index": [r["image_index"] for r in rows],
        "label": [None if r["label"] < 0 else r["label"] for r in rows],
        "text": [r["text"] or None for r in rows],
        "prompt": [r["text"] for r in rows],  # a text-prompt row carries its prompt in `text`
        "cfg_scale": [r["cfg_scale"] for r in rows],
        "count": [r["count"] for r in rows],
        "seed": [r["seed"] for r in rows],
        "model": [model] * len(rows),
        "cache_policy": [cache_policy] * len(rows),
        "width": [r["width"] for r in rows],
        "height": [r["height"] for r in rows],
        "image": [{"bytes": r["png"], "path": f"{r['id']}-{r['image_index']}.png"} for r in rows],
    }
    return pa.table({name: columns[name] for name in schema.names}, schema=schema)


class ShardSink:
    """Collects finished images by shard and commits each shard when its last image arrives.

    Rows can arrive in any order, from any replica, and more than once (a retried
    task): a shard keeps one image per (row, image index), and images of shards
    already committed are dropped. That makes the commit exactly-once.
    """

    def __init__(self, out: Output, model: str, cache_policy: str, committed: set[str],
                 class_names: list[str] | None = None, prompts: bool = False):
        self.out, self.model, self.cache_policy = out, model, cache_policy
        self.schema = image_schema(class_names, prompts)
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
        errors_meta = json.loads(last["shard_errors_meta"]) if last.get("shard_errors_meta") else None
        entry = self.out.commit_shard(key, entry, image_table(rows, self.model, self.cache_policy, self.schema),
                                      errors_meta)
        self.committed.add(key)
        return entry

    @property
    def incomplete(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.pending.items()}
