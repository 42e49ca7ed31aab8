"""The batch job: prompt files in, a Parquet image dataset out, on Ray Data.

    tickets -> read shards (1 actor) -> [encode text] -> generate (replicas) -> decode (VQ) -> PNG
            -> the driver commits each shard's Parquet file

- Read: one actor reads every file in order, checks rows (duplicate ids are found in
  file order, hence one reader) and answers each ticket with the next shard to do,
  skipping shards the manifest already holds. It writes each shard's bad rows to the
  errors dataset and commits shards that have no image at all. The tickets (one
  small item per possible shard, counted from the files' line counts) let Ray Data
  pull shards one at a time, so each shard is its own block.
- Read-ahead: Ray Data's backpressure counts bytes, and prompt rows are tiny, so it
  would let the reader run through millions of rows ahead of the generators. A small
  `ReadAhead` actor bounds the images handed out but not yet finished (`read_ahead`).
- Generate / decode / PNG: separate Ray Data stages (actor pools for the model and
  the decoder, tasks for PNG), so generators never wait on pixels. Shards are cut
  into batch-sized blocks first, so each generation task is one batch and the
  replicas share the work evenly.
- Commit: the driver collects finished images by shard and writes each shard's
  Parquet file whole, then its manifest entry (sink.ShardSink). Ray Data's own
  writers commit per block and cannot know when a shard is complete, which exact
  resume needs.
Progress: Ray Data reports every stage (rows in/out, tasks, actors); the driver
reports images done / total, images/s and ETA, and a summary at the end.
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from lineray.pipelines.batching import resolve_batch_size
from lineray.pipelines.config import JobConfig, JobConfigError
from lineray.pipelines.prompts import RowRules
from lineray.pipelines.sink import Output, ShardSink
from lineray.pipelines.sources import PromptSource, Shard, iter_shards


# -- reading -------------------------------------------------------------------------------
def shard_table(shard: Shard, rules: RowRules) -> pa.Table:
    """A shard's images as a block of the stream: the image columns plus the shard's bookkeeping."""
    n = len(shard.images)
    cols = {k: [img[k] for img in shard.images]
            for k in ("row", "id", "image_index", "count", "label", "text", "cfg_scale", "seed")}
    table = {
        "shard": pa.array([shard.key] * n, pa.string()),
        "file": pa.array([shard.file] * n, pa.string()),
        "first_row": pa.array([shard.first_row] * n, pa.int64()),
        "shard_rows": pa.array([shard.rows] * n, pa.int32()),
        "shard_images": pa.array([n] * n, pa.int32()),
        "shard_errors": pa.array([len(shard.errors)] * n, pa.int32()),
        "row": pa.array(cols["row"], pa.int64()),
        "id": pa.array(cols["id"], pa.string()),
        "image_index": pa.array(cols["image_index"], pa.int32()),
        "count": pa.array(cols["count"], pa.int32()),
        "label": pa.array(cols["label"], pa.int64()),
        "text": pa.array(cols["text"], pa.string()),
        "cfg_scale": pa.array(cols["cfg_scale"], pa.float64()),
        "seed": pa.array(cols["seed"], pa.int64()),
    }
    if rules.model_type == "t2i":
        flat = [np.zeros(0, np.float32) if img["embedding"] is None else img["embedding"].reshape(-1)
                for img in shard.images]
        offsets = np.concatenate([[0], np.cumsum([len(f) for f in flat])]).astype(np.int32)
        values = np.concatenate(flat) if flat else np.zeros(0, np.float32)
        table["embedding"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float32()))
        table["embedding_tokens"] = pa.array([len(f) // rules.caption_dim for f in flat], pa.int32())
    return pa.table(table)


def shards_to_do(source: PromptSource, rules: RowRules, shard_rows: int, out: Output, skip: frozenset):
    """The shards that still need images, in file order. Bad rows are written (and shards
    without any image committed) on the way."""
    for shard in iter_shards(source, rules, shard_rows):
        if shard.key in skip:
            continue
        if shard.errors:
            out.write_errors(shard.key, shard.errors)
        if not shard.images:  # nothing to generate: the shard is done now
            out.commit_shard(shard.key, {"file": shard.file, "first_row": shard.first_row, "rows": shard.rows,
                                         "images": 0, "errors": len(shard.errors)})
            continue
        yield shard


class ReadAhead:
    """Images handed to the pipeline vs images finished: the reader waits while too many are out.

    A Ray actor shared by the reader (asks before handing out a shard) and the driver
    (reports finished images). It also records that the reader reached the end."""

    def __init__(self, limit: int):
        self.limit, self.sent, self.done, self.finished = limit, 0, 0, False

    def try_send(self, n: int) -> bool:
        if self.sent > self.done and self.sent - self.done + n > self.limit:
            return False  # (a shard bigger than the limit still goes when nothing is out)
        self.sent += n
        return True

    def arrived(self, n: int) -> None:
        self.done += n

    def finish(self) -> None:
        self.finished = True

    def state(self) -> tuple[int, int, bool]:
        return self.sent, self.done, self.finished


class ShardReader:
    """Ray Data stage (one actor): each ticket gets the next shard's images, or nothing at the end."""

    def __init__(self, source: PromptSource, rules: RowRules, shard_rows: int, out: Output, skip: frozenset,
                 gate):
        self.rules, self.gate = rules, gate
        self.shards = shards_to_do(source, rules, shard_rows, out, skip)
        self.next = next(self.shards, None)  # one shard ahead, to know when the last one goes out
        self.empty = shard_table(Shard("", "", 0, 0, [], []), rules)
        if self.next is None:
            gate.finish.remote()

    def __call__(self, tickets: pa.Table) -> pa.Table:
        import ray

        tables = []
        for _ in range(tickets.num_rows):
            shard = self.next
            if shard is None:
                continue
            while not ray.get(self.gate.try_send.remote(len(shard.images))):
                time.sleep(0.05)
            tables.append(shard_table(shard, self.rules))
            self.next = next(self.shards, None)
            if self.next is None:
                ray.get(self.gate.finish.remote())
        return pa.concat_tables(tables) if tables else self.empty


def ticket_count(rows_per_file: dict[str, int], shard_rows: int) -> int:
    """An upper bound on the shards of the files (row numbers never exceed the line counts)."""
    return sum(math.ceil(n / shard_rows) for n in rows_per_file.values())


# -- the dataset -----------------------------------------------------------------------------
def build_dataset(job: JobConfig, source: PromptSource, out: Output, rules: RowRules, skip: frozenset,
                  tickets: int, gate):
    import ray
    from ray.data import ActorPoolStrategy

    from lineray.pipelines.stages import DecodeStage, GenerateStage, encode_png
    from lineray.pipelines.text import TextEncodeStage

    res = job.resources
    here = None
    if _is_local(source.filesystem()) or out.is_local:
        # Local paths exist only on this node: keep the reader (and its error/commit writes) here.
        here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
    ds = ray.data.from_items([{"ticket": i} for i in range(tickets)], override_num_blocks=tickets).map_batches(
        ShardReader, fn_constructor_args=(source, rules, job.shard_rows, out, skip, gate), batch_size=1,
        batch_format="pyarrow", compute=ActorPoolStrategy(size=1), num_cpus=res.read_cpus, label_selector=here)
    ds = ds.repartition(target_num_rows_per_block=job.batch_size)
    # Ray Data sizes pools from task counts and warns when an input looks small; the blocks above suffice.
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
    if rules.model_type == "t2i" and job.text_encoder:
        ds = ds.map_batches(TextEncodeStage, fn_constructor_args=(
                                job.text_encoder, job.text_max_tokens or rules.caption_tokens, rules.caption_dim),
                            batch_size=job.batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=1),
                            num_cpus=res.decode_cpus)
    on_gpu = job.device.startswith("cuda")
    if job.tp == 1:
        gen_cpus = res.generate_cpus
        gen_gpus = res.generate_gpus if res.generate_gpus is not None else (1.0 if on_gpu else 0.0)
    else:  # a coordinator: its ranks reserve their own CPUs/GPUs in the replica's placement group
        gen_cpus, gen_gpus = res.coordinator_cpus, 0.0
    ds = ds.map_batches(GenerateStage, fn_constructor_args=(job.replica_config,), batch_size=job.batch_size,
                        batch_format="numpy", compute=ActorPoolStrategy(size=job.replicas),
                        num_cpus=gen_cpus, num_gpus=gen_gpus)
    decode_device = "cuda" if res.decode_gpus > 0 else "cpu"
    ds = ds.map_batches(DecodeStage, fn_constructor_args=(job.model, decode_device),
                        batch_size=job.decode_batch_size or job.batch_size, batch_format="numpy",
                        compute=ActorPoolStrategy(size=res.decoders), num_cpus=res.decode_cpus,
                        num_gpus=res.decode_gpus)
    return ds.map_batches(encode_png, batch_size=None, batch_format="numpy", num_cpus=res.png_cpus)


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem
    return isinstance(fs, LocalFileSystem)


# -- progress and summary -----------------------------------------------------------------------
def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Images done / total, images/s, ETA: a bar on a terminal, else a line every `interval` s.

    The total is an estimate until the reader has seen every row (rows counted up
    front; bad rows and `count` > 1 are learned on the way), hence the "~".
    """

    def __init__(self, total_rows: int, interval: float = 10.0, enabled: bool = True, stream=None,
                 replicas: int = 1):
        self.stream = stream or sys.stderr
        self.total_rows, self.interval, self.enabled = total_rows, interval, enabled
        self.images = self.rows = self.errors = self.shards = self.extra = 0
        self.generate_s = 0.0  # summed over replicas
        self.replicas = replicas
        self.start = time.time()
        self.last_line = 0.0
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=max(1, total_rows), unit="img", desc="images", file=self.stream,
                            dynamic_ncols=True)

    @property
    def total(self) -> int:
        return max(self.images, self.total_rows + self.extra - self.errors)

    @property
    def rate(self) -> float:
        return self.images / max(time.time() - self.start, 1e-9)

    def add_images(self, rows: list[dict]) -> None:
        self.images += len(rows)
        self.extra += sum(r["count"] - 1 for r in rows if r["image_index"] == 0)
        self.generate_s += sum(r.get("generate_s", 0.0) for r in rows)
        self._show(len(rows))

    def add_shard(self, entry: dict) -> None:
        self.shards += 1
        self.rows += entry["rows"]
        self.errors += entry["errors"]
        self._show(0)

    def line(self) -> str:
        eta = (self.total - self.images) / self.rate if self.rate else float("inf")
        pct = 100 * self.images / self.total if self.total else 100.0
        busy = self.generate_s / max((time.time() - self.start) * self.replicas, 1e-9)
        return (f"images {self.images}/~{self.total} ({pct:.0f}%) | {self.rate:.2f} img/s | "
                f"ETA {_duration(eta)} | prompts {self.rows}/~{self.total_rows} committed in {self.shards} shards"
                f" | errors {self.errors} | generators busy {100 * busy:.0f}%")

    def _show(self, n: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.total = max(self.total, 1)
            self.bar.set_postfix_str(f"prompts {self.rows}, errors {self.errors}", refresh=False)
            self.bar.update(n)
        elif time.time() - self.last_line >= self.interval:
            self.last_line = time.time()
            print(f"[lineray] {self.line()}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class JobSummary:
    output: str
    images: int  # written by this run
    prompts: int  # prompt rows in shards this run committed
    errors: int  # bad rows this run found
    shards: int  # shards this run committed
    skipped_shards: int  # shards already done before this run
    wall_s: float
    total_images: int  # in the whole dataset
    total_errors: int
    total_shards: int
    batch_size: int  # images per generation batch in this run (batch_size auto resolved)

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"images_per_s": round(self.images_per_s, 4)}

    def line(self) -> str:
        skipped = f", {self.skipped_shards} shards already done" if self.skipped_shards else ""
        errors = f"; {self.errors} bad rows in {self.output}/errors" if self.errors else ""
        return (f"{self.images} images from {self.prompts} prompts in {_duration(self.wall_s)} "
                f"({self.images_per_s:.2f} img/s){errors}{skipped} -> {self.output}/data "
                f"(dataset: {self.total_images} images, {self.total_shards} shards)")


# -- the job -------------------------------------------------------------------------------------
def model_name(job: JobConfig) -> str:
    m = job.model
    if m.is_bundled:
        return f"{m.preset} (bundled)"
    if m.checkpoint is None:
        return f"{m.preset} (random weights, seed {m.seed})"
    return f"{m.preset} ({Path(m.checkpoint).name})"


def cache_policy_name(job: JobConfig) -> str:
    g = job.model.config().grid_size
    return job.cache.plan(g, g, g * g).describe()


def prepare_output(job: JobConfig, out: Output, overwrite: bool = False) -> dict[str, dict]:
    """Check that the output is new or holds this same job; returns its committed shards."""
    if overwrite and out.fs.exists(out.root):
        out.fs.rm(out.root, recursive=True)
    recorded = out.read_json(out.path("_job.json"))
    if recorded is None:
        out.write_json(out.path("_job.json"), {"fingerprint": job.fingerprint(), "config": job.to_dict(),
                                               "created_at": time.time()})
    else:
        mine, theirs = job.fingerprint(), recorded.get("fingerprint", {})
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise JobConfigError(f"{job.output} holds a job with different {', '.join(diff)}; resume needs the same "
                                 "settings: use another output URL, or --overwrite to start it again")
    committed = out.committed()
    out.clean(committed)
    return committed


def check_job(job: JobConfig) -> RowRules:
    """Fail early, before Ray starts, on settings that cannot work (no weights are loaded)."""
    if job.source.startswith("memory://") or job.output.startswith("memory://"):
        raise JobConfigError("memory:// exists only inside one process; Ray workers cannot see it: "
                             "use a local path or object storage")
    cfg = job.model.config()
    if job.tp not in cfg.valid_tp_sizes():
        raise JobConfigError(f"tp={job.tp} does not fit {job.model.preset}: valid sizes are "
                             f"{', '.join(map(str, cfg.valid_tp_sizes()))}")
    cache_policy_name(job)  # CacheConfigError names a bad budget
    if cfg.model_type == "c2i" and job.text_encoder:
        raise JobConfigError("text_encoder is set but the model is class-conditional (c2i)")
    if job.text_max_tokens is not None and not 1 <= job.text_max_tokens <= cfg.cls_token_num:
        raise JobConfigError(f"text_max_tokens must be 1..{cfg.cls_token_num} (the model's caption tokens), "
                             f"got {job.text_max_tokens}")
    return RowRules.for_job(job)


def run_job(job: JobConfig, *, overwrite: bool | None = None, progress: bool = True, num_cpus: int | None = None,
            log=None, on_images=None) -> JobSummary:
    """Run the job to the end (or resume it) and return its summary.

    Connects to job.ray_address or $RAY_ADDRESS, else starts a private local Ray
    with enough logical CPUs for every stage (num_cpus overrides). on_images(rows):
    called with every batch of finished images as it reaches the driver.
    """
    import ray

    from lineray.cluster.local import ensure_ray

    log = log or (lambda msg: print(f"[lineray] {msg}", file=sys.stderr, flush=True))
    overwrite = job.overwrite if overwrite is None else overwrite
    num_cpus = num_cpus or job.num_cpus
    t0 = time.time()
    rules = check_job(job)
    batch = resolve_batch_size(job)  # before the output is touched: a batch that cannot fit fails here
    source = PromptSource(job.source, job.format, job.storage_options)
    out = Output(job.output, job.storage_options)
    rows_per_file = source.count_rows()
    committed = prepare_output(job, out, overwrite)  # records the job as given (batch_size may be auto)
    total_rows = sum(rows_per_file.values()) - sum(e["rows"] for e in committed.values())
    log(f"{len(rows_per_file)} prompt file(s), ~{total_rows} rows to do, {len(committed)} shards already done; "
        f"model {model_name(job)}, cache {cache_policy_name(job)}, {job.replicas} replica(s) x tp={job.tp}")
    log(batch.line())
    job = job.replace(batch_size=batch.size)  # the batch is not in the fingerprint: resume may change it

    address = job.ray_address or os.environ.get("RAY_ADDRESS")
    need = math.ceil(job.resources.logical_cpus(job.replicas, job.tp))
    started = ensure_ray(address, num_cpus=num_cpus or max(os.cpu_count() or 1, need))
    bar = Progress(total_rows, job.progress_interval_s, enabled=progress, replicas=job.replicas)
    gate = None
    try:
        tickets = ticket_count(rows_per_file, job.shard_rows)
        if tickets:
            gate = ray.remote(num_cpus=0)(ReadAhead).remote(job.read_ahead_images)
            ds = build_dataset(job, source, out, rules, frozenset(committed), tickets, gate)
            sink = ShardSink(out, model_name(job), cache_policy_name(job), set(committed))
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                rows = batch.to_pylist()
                gate.arrived.remote(len(rows))
                bar.add_images(rows)
                if on_images is not None:
                    on_images(rows)
                for entry in sink.add(rows):
                    bar.add_shard(entry)
            if not ray.get(gate.state.remote())[2]:
                raise RuntimeError("the prompt reader stopped before the end of the files (was it restarted?); "
                                   "rerun the same job to resume")
            if sink.incomplete:
                raise RuntimeError(f"the stream ended with incomplete shards: {sink.incomplete}")
    finally:
        bar.close()
        if gate is not None:
            ray.kill(gate)
        if started:
            ray.shutdown()

    final = out.committed()
    new = [e for k, e in final.items() if k not in committed]
    summary = JobSummary(
        output=job.output, images=sum(e["images"] for e in new), prompts=sum(e["rows"] for e in new),
        errors=sum(e["errors"] for e in new), shards=len(new), skipped_shards=len(committed),
        wall_s=time.time() - t0, total_images=sum(e["images"] for e in final.values()),
        total_errors=sum(e["errors"] for e in final.values()), total_shards=len(final), batch_size=job.batch_size)
    out.write_json(out.path("_summary.json"), summary.to_dict())
    if out.is_local and out.fs.exists(out.path("_tmp")):
        out.fs.rm(out.path("_tmp"), recursive=True)
    log(summary.line())
    return summary
