"""Prompt files over any fsspec URL (file, s3://, gs://, memory://), read lazily and cut into shards.

Files are streamed: JSONL line by line, CSV record by record, Parquet a record batch
at a time, so a file of millions of rows never sits in memory. `.gz`/`.bz2`/`.xz`
JSONL and CSV are decompressed on the fly.

A shard is `shard_rows` consecutive rows of one file (row numbers are 1-based:
the line number for JSONL, the record number after the header for CSV, the row
index for Parquet). The shard is the unit of output (one Parquet file), of commit
and of resume; its key comes from the file's path and the first row, so the same
input always gives the same shards.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import numpy as np

from lineray.pipelines.prompts import IdSet, RowError, RowRules, parse_prompt
from lineray.pipelines.storage import open_fs, storage_errors

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_PROMPTS = ASSETS / "prompts" / "sample_prompts.jsonl"
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet",
              ".pq": "parquet"}
COMPRESSED = (".gz", ".bz2", ".xz")
RAW_CHARS = 500  # how much of a bad row the errors dataset keeps


class SourceError(ValueError):
    """The prompt source itself is unusable (missing, empty, unknown format); the message names it."""


def file_format(path: str, forced: str | None = None) -> str:
    if forced:
        return forced
    name = path.lower()
    for ext in COMPRESSED:
        if name.endswith(ext):
            name = name[: -len(ext)]
    fmt = EXTENSIONS.get(Path(name).suffix)
    if fmt is None:
        raise SourceError(f"{path}: unknown prompt file type; use .jsonl, .csv or .parquet (or set format:)")
    return fmt


@dataclass(frozen=True)
class PromptSource:
    """A prompt file, a folder of them, or a glob, at any fsspec URL. "bundled" = the sample prompts."""
    url: str
    format: str | None = None  # None = from each file's extension
    storage_options: dict = field(default_factory=dict, hash=False)

    @property
    def resolved_url(self) -> str:
        return str(BUNDLED_PROMPTS) if self.url == "bundled" else self.url

    def filesystem(self):
        fs, _ = open_fs(self.resolved_url, self.storage_options)
        return fs

    def files(self) -> list[str]:
        """The prompt files in a fixed order (sorted paths, as the filesystem names them)."""
        with storage_errors(self.url, self.storage_options):
            return self._files()

    def _files(self) -> list[str]:
        fs, root = open_fs(self.resolved_url, self.storage_options)
        if _is_glob(root):
            paths = fs.glob(root)
        elif fs.isdir(root):
            paths = [p for p in fs.find(root) if not Path(p).name.startswith((".", "_"))]
            paths = [p for p in paths if self.format or _known(p)]
        elif fs.exists(root):
            paths = [root]
        else:
            raise SourceError(f"prompt source not found: {self.url}")
        if not paths:
            raise SourceError(f"no prompt files at {self.url}")
        for p in paths:
            file_format(p, self.format)  # fail early on an unknown type
        return sorted(paths)

    def relative(self, path: str) -> str:
        """A file's path below the source (its folder, or the fixed part of its glob): names its shards."""
        _, root = fsspec.core.url_to_fs(self.resolved_url, **self.storage_options)
        root = root.rstrip("/")
        if _is_glob(root):
            base = root[:min(root.index(c) for c in "*?[" if c in root)].rsplit("/", 1)[0]
        elif path == root:
            base = root.rsplit("/", 1)[0] if "/" in root else ""
        else:
            base = root
        return path[len(base):].lstrip("/") if path.startswith(base) else path

    def records(self, path: str) -> Iterator[tuple[int, object, str | None]]:
        """(row number, record, raw text) for each row of one file; the record is a RowError if unreadable."""
        fs = self.filesystem()
        fmt = file_format(path, self.format)
        if fmt == "jsonl":
            yield from _jsonl_records(fs, path)
        elif fmt == "csv":
            yield from _csv_records(fs, path)
        else:
            yield from _parquet_records(fs, path)

    def count_rows(self) -> dict[str, int]:
        """Rows per file, cheaply: Parquet metadata, a streamed line count for JSONL/CSV.

        For JSONL/CSV this is an upper bound on the last row number (blank lines and
        quoted newlines count), which is what shard planning and progress need."""
        with storage_errors(self.url, self.storage_options):
            return self._count_rows()

    def _count_rows(self) -> dict[str, int]:
        fs = self.filesystem()
        counts = {}
        for path in self.files():
            fmt = file_format(path, self.format)
            if fmt == "parquet":
                import pyarrow.parquet as pq
                with fs.open(path, "rb") as f:
                    counts[path] = pq.ParquetFile(f).metadata.num_rows
                continue
            lines, last = 0, b"\n"
            with fs.open(path, "rb", compression="infer") as f:
                while chunk := f.read(1 << 22):
                    lines += chunk.count(b"\n")
                    last = chunk[-1:]
            lines += last != b"\n"
            counts[path] = max(0, lines - (fmt == "csv"))
        return counts


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _known(path: str) -> bool:
    try:
        file_format(path)
        return True
    except SourceError:
        return False


def _jsonl_records(fs, path):
    with fs.open(path, "rb", compression="infer") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines are not rows (but keep the line numbering)
            raw = line.decode("utf-8", errors="replace").rstrip("\r\n")
            try:
                yield n, json.loads(line), raw
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                where = f" (column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
                yield n, RowError(f"malformed JSON line: {msg}{where}"), raw


def _csv_records(fs, path):
    with fs.open(path, "rb", compression="infer") as f:
        text = io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="")
        reader = csv.reader(text)
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        for n, values in enumerate(reader, 1):
            raw = ",".join(values)
            if not any(v.strip() for v in values):
                continue
            if len(values) > len(header):
                yield n, RowError(f"malformed CSV row: {len(values)} fields, the header has {len(header)}"), raw
                continue
            yield n, {k: (v if v.strip() else None) for k, v in zip(header, values)}, raw


def _parquet_records(fs, path):
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        n = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                n += 1
                yield n, record, None


# -- shards --------------------------------------------------------------------------------
@dataclass
class Shard:
    key: str  # stable name: "<file name>-<hash of its path below the source>-<first row>"
    file: str
    first_row: int
    rows: int  # rows read (good and bad)
    images: list[dict]  # one entry per image to generate (IMAGE_COLUMNS)
    errors: list[dict]  # {file, row, id, reason, raw}


def shard_key(relative_path: str, first_row: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(relative_path).name)[:48]
    return f"{stem}-{hashlib.sha1(relative_path.encode()).hexdigest()[:8]}-{first_row:010d}"


def iter_shards(source: PromptSource, rules: RowRules, shard_rows: int,
                seen: IdSet | None = None) -> Iterator[Shard]:
    """Every shard of every file, rows checked and expanded into images.

    Duplicate ids are found across all files in file order (the first occurrence
    wins), so the same input always rejects the same rows.
    """
    seen = seen if seen is not None else IdSet()
    for path in source.files():
        relative = source.relative(path)
        rows = []
        for row in source.records(path):
            index = (row[0] - 1) // shard_rows
            if rows and (rows[0][0] - 1) // shard_rows != index:
                yield _make_shard(path, relative, rows, rules, seen, shard_rows)
                rows = []
            rows.append(row)
        if rows:
            yield _make_shard(path, relative, rows, rules, seen, shard_rows)


def _make_shard(path, relative, rows, rules: RowRules, seen: IdSet, shard_rows: int) -> Shard:
    first_row = (rows[0][0] - 1) // shard_rows * shard_rows + 1
    parsed, errors = [], []
    for n, record, raw in rows:
        try:
            if isinstance(record, RowError):
                raise record
            parsed.append((n, parse_prompt(record, rules), record, raw))
        except RowError as e:
            errors.append(_error(path, n, record, str(e), raw))
    fresh = seen.add_batch([p.id for _, p, _, _ in parsed])
    images = []
    for (n, p, record, raw), new in zip(parsed, fresh):
        if not new:
            errors.append(_error(path, n, record, f"duplicate id {p.id!r}", raw))
            continue
        for k, seed in enumerate(p.image_seeds(rules.job_seed)):
            images.append({"row": n, "id": p.id, "image_index": k, "count": p.count, "label": p.label,
                           "text": p.text, "cfg_scale": p.cfg_scale, "seed": seed, "embedding": p.embedding,
                           "prompt_ids": p.prompt_ids, "grid_h": p.grid[0], "grid_w": p.grid[1]})
    images.sort(key=lambda img: (img["grid_h"], img["grid_w"]))  # one size after another: batches of one grid
    errors.sort(key=lambda e: e["row"])
    return Shard(shard_key(relative, first_row), path, first_row, len(rows), images, errors)


def _error(path, row, record, reason, raw) -> dict:
    pid = None
    if isinstance(record, dict) and record.get("id") is not None:
        pid = str(record["id"])
    if raw is None and record is not None and not isinstance(record, RowError):
        raw = json.dumps(record, default=_jsonable)
    return {"file": path, "row": row, "id": pid, "reason": reason, "raw": (raw or "")[:RAW_CHARS]}


def _jsonable(x):
    return x.tolist() if isinstance(x, np.ndarray) else str(x)
