"""The job's first stage: one actor reads every prompt file in order and hands out shards one ticket at a time.

One reader, because duplicate ids are found in file order. Each ticket (one small
item per possible shard, counted from the files' line counts) gets the next shard
that still needs images, so Ray Data pulls shards one at a time and each is its own
block. On the way the reader begins each shard in the output (its in-flight
record), writes the shard's bad rows, commits shards without a single image, and
keeps the error budget (pipelines.rejects): past it, it stops handing out shards
and tells the monitor why.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa

from lineray.pipelines.prompts import RowRules
from lineray.pipelines.rejects import RejectCounter
from lineray.pipelines.sink import Output
from lineray.pipelines.sources import PromptSource, Shard, iter_shards

IMAGE_COLUMNS = ("row", "id", "image_index", "count", "label", "text", "cfg_scale", "seed", "grid_h", "grid_w")


def shard_table(shard: Shard, rules: RowRules, errors_meta: dict | None = None) -> pa.Table:
    """A shard's images as a block of the stream: the image columns plus the shard's bookkeeping."""
    n = len(shard.images)
    cols = {k: [img[k] for img in shard.images] for k in IMAGE_COLUMNS}
    table = {
        "shard": pa.array([shard.key] * n, pa.string()),
        "file": pa.array([shard.file] * n, pa.string()),
        "first_row": pa.array([shard.first_row] * n, pa.int64()),
        "shard_rows": pa.array([shard.rows] * n, pa.int32()),
        "shard_images": pa.array([n] * n, pa.int32()),
        "shard_errors": pa.array([len(shard.errors)] * n, pa.int32()),
        "shard_errors_meta": pa.array([json.dumps(errors_meta) if errors_meta else ""] * n, pa.string()),
        "row": pa.array(cols["row"], pa.int64()),
        "id": pa.array(cols["id"], pa.string()),
        "image_index": pa.array(cols["image_index"], pa.int32()),
        "count": pa.array(cols["count"], pa.int32()),
        "label": pa.array(cols["label"], pa.int64()),
        "text": pa.array(cols["text"], pa.string()),
        "cfg_scale": pa.array(cols["cfg_scale"], pa.float64()),
        "seed": pa.array(cols["seed"], pa.int64()),
        # the image's token grid (rows, cols): one per generate call; (0, 0): the model draws the size
        "grid_h": pa.array(cols["grid_h"], pa.int32()),
        "grid_w": pa.array(cols["grid_w"], pa.int32()),
    }
    if rules.model_type == "t2i":
        flat = [np.zeros(0, np.float32) if img["embedding"] is None else img["embedding"].reshape(-1)
                for img in shard.images]
        offsets = np.concatenate([[0], np.cumsum([len(f) for f in flat])]).astype(np.int32)
        values = np.concatenate(flat) if flat else np.zeros(0, np.float32)
        table["embedding"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float32()))
        table["embedding_tokens"] = pa.array([len(f) // rules.caption_dim for f in flat], pa.int32())
    if rules.model_type == "text":  # token ids, tokenized where the rows are checked (prompts.RowRules.prompt_ids)
        table["prompt_ids"] = pa.array([img["prompt_ids"] for img in shard.images], pa.list_(pa.int32()))
    return pa.table(table)


def shards_to_do(source: PromptSource, rules: RowRules, shard_rows: int, out: Output, skip: frozenset,
                 budget: RejectCounter | None = None):
    """(shard, its errors file's metadata) for the shards that still need images, in file order. Bad rows are
    written (and shards without any image committed) on the way; the error budget stops the iteration."""
    for shard in iter_shards(source, rules, shard_rows):
        if shard.key in skip:
            continue
        if budget is not None:
            budget.add(shard.rows, shard.errors)
            if budget.exceeded:
                return
        out.begin_shard(shard.key)
        errors_meta = out.write_errors(shard.key, shard.errors) if shard.errors else None
        if not shard.images:  # nothing to generate: the shard is done now
            out.commit_shard(shard.key, {"file": shard.file, "first_row": shard.first_row, "rows": shard.rows,
                                         "images": 0, "errors": len(shard.errors)}, errors_meta=errors_meta)
            continue
        yield shard, errors_meta


class ShardReader:
    """Ray Data stage (one actor): each ticket gets the next shard's images, or nothing at the end."""

    def __init__(self, source: PromptSource, rules: RowRules, shard_rows: int, out: Output, skip: frozenset,
                 monitor, budget: RejectCounter, where: str):
        import ray

        from lineray.pipelines.monitor import stage_report

        self.rules, self.monitor, self.budget, self.where = rules, monitor, budget, where
        stage_report(monitor, "read")
        self.shards = shards_to_do(source, rules, shard_rows, out, skip, budget)
        self.next = self._next()  # one shard ahead, to know when the last one goes out
        self.empty = shard_table(Shard("", "", 0, 0, [], []), rules)
        if self.next is None:
            ray.get(self._end())

    def _next(self):
        return next(self.shards, None)

    def _end(self):
        if self.budget.exceeded:
            return self.monitor.fail.remote(self.budget.message(self.where))
        return self.monitor.finish.remote()

    def __call__(self, tickets: pa.Table) -> pa.Table:
        import ray

        tables = []
        for _ in range(tickets.num_rows):
            if self.next is None:
                continue
            shard, errors_meta = self.next
            ray.get(self.monitor.acquire.remote(len(shard.images)))  # waits while read_ahead images are out
            tables.append(shard_table(shard, self.rules, errors_meta))
            self.next = self._next()
            if self.next is None:
                ray.get(self._end())
        return pa.concat_tables(tables) if tables else self.empty


def ticket_count(rows_per_file: dict[str, int], shard_rows: int) -> int:
    """An upper bound on the shards of the files (row numbers never exceed the line counts)."""
    return sum(math.ceil(n / shard_rows) for n in rows_per_file.values())
