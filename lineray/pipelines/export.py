"""`lineray export DATASET`: a job's Parquet dataset -> PNG files and a contact sheet.

Reads only the columns it needs, one file at a time, so it works on datasets of any
size (the contact sheet takes the first `--sheet` images in id order).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from lineray.images import contact_sheet

COLUMNS = ["id", "image_index", "label", "image"]  # a text-prompt family's dataset has `prompt` instead of `label`


def export_images(dataset: str, out: str | Path, *, limit: int | None = None, sheet: int = 100,
                  storage_options: dict | None = None) -> tuple[int, Path | None]:
    """Write `out/<id>_<k>.png` for each image (at most `limit`) and `out/contact_sheet.png`."""
    fs, root = fsspec.core.url_to_fs(dataset, **(storage_options or {}))
    files = sorted(fs.glob(root.rstrip("/") + "/data/*.parquet"))
    if not files:
        raise ValueError(f"no images found: {dataset} has no data/*.parquet files (did the job run?)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, cells = 0, []
    for path in files:
        with fs.open(path, "rb") as f:
            names_in_file = pq.read_schema(f).names
            f.seek(0)
            table = pq.read_table(f, columns=[c if c in names_in_file else "prompt" for c in COLUMNS])
            names = class_names(table.schema)
        for row in table.to_pylist():
            if limit is not None and written >= limit:
                break
            data = row["image"]["bytes"]
            (out / f"{row['id']}_{row['image_index']}.png").write_bytes(data)
            written += 1
            if len(cells) < sheet:
                if "prompt" in row:  # the prompt is the caption (cut to the cell's width by contact_sheet)
                    label = row["prompt"]
                else:
                    label = row["id"] if row["label"] is None else names.get(row["label"], row["label"])
                cells.append((str(row["id"]), row["image_index"], str(label), data))
    if not cells:
        return written, None
    cells.sort(key=lambda c: (c[0], c[1]))
    images = [np.asarray(Image.open(io.BytesIO(c[3])).convert("RGB")) for c in cells]
    sheet_path = out / "contact_sheet.png"
    contact_sheet(images, [c[2] for c in cells]).save(sheet_path)
    return written, sheet_path


def class_names(schema) -> dict[int, str]:
    """label -> class name, from the Hugging Face ClassLabel in the schema metadata (empty if none)."""
    meta = (schema.metadata or {}).get(b"huggingface")
    feature = json.loads(meta).get("info", {}).get("features", {}).get("label", {}) if meta else {}
    return dict(enumerate(feature.get("names", [])))


def add_arguments(p) -> None:
    p.add_argument("dataset", help="the job's output URL (local folder, s3://, ...)")
    p.add_argument("--out", required=True, help="folder for the PNGs and contact_sheet.png")
    p.add_argument("--limit", type=int, help="export at most this many images")
    p.add_argument("--sheet", type=int, default=100, help="images on the contact sheet")


def run(args) -> int:
    n, sheet = export_images(args.dataset, args.out, limit=args.limit, sheet=args.sheet)
    print(f"wrote {n} PNGs{f' and {sheet}' if sheet else ''}")
    return 0
