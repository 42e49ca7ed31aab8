"""The batch job: prompt files in, a Parquet image dataset out, on Ray Data.

    tickets -> read shards (1 actor) -> [encode text] -> generate (replicas) -> decode (VQ) -> PNG
            -> the driver commits each shard's Parquet file

run_job reads as the job it runs:
1. check the settings and the first rows (checks), size the batch (batching);
2. plan every stage's resources against the private Ray or the cluster (plan);
3. open the output: new, or this job's to resume, never someone else's (resume);
4. stream the dataset (dataset, reader, stages) and commit each shard whole (sink),
   watching for a stage that stops moving (monitor) and showing progress (progress).
The driver collects finished images by shard and writes each shard's Parquet file
whole, then its manifest entry: Ray Data's own writers commit per block and cannot
know when a shard is complete, which exact resume needs.
Messages go through `logging` (logger "lineray"); the CLI prints them.
"""
from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time

from lineray.pipelines.batching import resolve_batch_size
from lineray.pipelines.checks import cache_policy_name, check_first_rows, check_job, class_names, model_name
from lineray.pipelines.config import JobConfig
from lineray.pipelines.monitor import JobMonitor, JobStalled, release_groups, stuck_stage
from lineray.pipelines.plan import ClusterShape, cpus_for_private_ray, plan_job, with_plan
from lineray.pipelines.progress import JobSummary, Progress
from lineray.pipelines.reader import ticket_count
from lineray.pipelines.rejects import TooManyBadRows
from lineray.pipelines.resume import prepare_output
from lineray.pipelines.sink import Output, ShardSink
from lineray.pipelines.sources import PromptSource

logger = logging.getLogger("lineray")
POLL_S = 1.0  # how often the driver looks at the monitor while no images arrive


def run_job(job: JobConfig, *, overwrite: bool | None = None, progress: bool = True, num_cpus: int | None = None,
            log=None, on_images=None, progress_stream=None) -> JobSummary:
    """Run the job to the end (or resume it) and return its summary.

    Connects to job.ray_address or $RAY_ADDRESS, else starts a private local Ray with
    enough logical CPUs for every stage (num_cpus overrides job.num_cpus). log(msg):
    where messages go (default: the "lineray" logger). on_images(rows): called with
    every batch of finished images as it reaches the driver. progress_stream: where the
    progress bar goes (default stderr).
    """
    import ray

    from lineray.cluster.local import ensure_ray, shutdown_ray

    log = log or logger.info
    if overwrite is not None:
        job = job.replace(overwrite=overwrite)
    num_cpus = num_cpus or job.num_cpus
    t0 = time.time()
    rules = check_job(job)
    source = PromptSource(job.source, job.format, job.storage_options)
    out = Output(job.output, job.storage_options)
    rows_per_file = source.count_rows()
    text_stage = rules.model_type == "t2i" and bool(job.text_encoder)

    address = job.ray_address or os.environ.get("RAY_ADDRESS")
    started = False
    if address or ray.is_initialized():  # a cluster, or a Ray this process already runs: plan against it
        started = ensure_ray(address)
        cluster = ClusterShape.from_ray(f"the cluster at {address}" if address else "this process's Ray")
    else:
        cpus = num_cpus or max(os.cpu_count() or 1, cpus_for_private_ray(job, text_stage))
        cluster = ClusterShape.single(cpus=cpus, gpus=_local_gpus())
    try:
        plan = plan_job(job, cluster, text_stage)  # refuses a job that can never be scheduled, with the numbers
        job = with_plan(job, plan)
        batch = resolve_batch_size(job)  # before the output is touched: a batch that cannot fit fails here
        # Before the output is touched (or cleared by overwrite): a file whose rows are mostly rejected stops here.
        check_first_rows(job, source, rules, frozenset() if job.overwrite else frozenset(_committed_quietly(out)))
        committed, repaired = prepare_output(job, out, log)  # records the job as given (batch_size may be auto)
        total_rows = sum(rows_per_file.values()) - sum(e["rows"] for e in committed.values())
        log(f"{len(rows_per_file)} prompt file(s), ~{total_rows} rows to do, {len(committed)} shards already done; "
            f"model {model_name(job)}, cache {cache_policy_name(job)}, {job.replicas} replica(s) x tp={job.tp}")
        log(batch.line())
        log(plan.line())
        job = job.replace(batch_size=batch.size)  # the batch is not in the fingerprint: resume may change it
        tickets = ticket_count(rows_per_file, job.shard_rows)
        if committed and total_rows <= 0:
            log(f"{job.output} is complete ({len(committed)} shards): nothing to do")
        if tickets and total_rows > 0:
            if not ray.is_initialized():
                started = ensure_ray(None, num_cpus=int(math.ceil(cluster.cpus)),
                                     object_store_mb=_mb(job.object_store_gib))
            bar = Progress(total_rows, job.progress_interval_s, enabled=progress, replicas=job.replicas,
                           stream=progress_stream)
            _stream(job, plan, source, out, rules, committed, tickets, bar, on_images)
    finally:
        if started:
            shutdown_ray()

    final = out.committed()
    new = [e for k, e in final.items() if k not in committed]
    summary = JobSummary(
        output=job.output, images=sum(e["images"] for e in new), prompts=sum(e["rows"] for e in new),
        errors=sum(e["errors"] for e in new), shards=len(new), skipped_shards=len(committed),
        wall_s=time.time() - t0, total_images=sum(e["images"] for e in final.values()),
        total_errors=sum(e["errors"] for e in final.values()), total_shards=len(final), batch_size=job.batch_size,
        repaired_shards=repaired)
    out.write_json(out.path("_summary.json"), summary.to_dict())
    if out.is_local:
        try:
            os.rmdir(out.path("_tmp"))  # only when empty: anything else in it is not ours to delete
        except OSError:
            pass
    log(summary.line())
    return summary


def _stream(job, plan, source, out, rules, committed, tickets, bar: Progress, on_images) -> None:
    """Run the Ray Data stream to its end, committing shards as they complete; JobStalled if nothing moves."""
    import ray

    from lineray.pipelines.dataset import build_dataset

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node: it lives as long as the driver does (a worker node may go away mid-job).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    monitor = ray.remote(num_cpus=0)(JobMonitor).options(scheduling_strategy=here).remote(job.read_ahead_images)
    try:
        ds = build_dataset(job, plan, source, out, rules, frozenset(committed), tickets, monitor)
        sink = ShardSink(out, model_name(job), cache_policy_name(job), set(committed), class_names(job),
                         prompts=rules.model_type == "text")
        last = time.time()
        for rows in _batches(ds):
            if rows is None:  # no images for POLL_S: is anything still moving?
                if time.time() - last >= job.stall_timeout_s:
                    state = ray.get(monitor.state.remote())
                    if state["idle_s"] >= job.stall_timeout_s and not any(state["busy"].values()):
                        raise JobStalled(stuck_stage(state, plan, ray.available_resources(), state["idle_s"]))
                continue
            last = time.time()
            monitor.arrived.remote(len(rows))
            bar.add_images(rows)
            if on_images is not None:
                on_images(rows)
            for entry in sink.add(rows):
                bar.add_shard(entry)
        state = ray.get(monitor.state.remote())
        if state["failure"]:
            raise TooManyBadRows(state["failure"])
        if not state["finished"]:
            raise RuntimeError("the prompt reader stopped before the end of the files (was it restarted?); "
                               "rerun the same job to resume")
        if sink.incomplete:
            raise RuntimeError(f"the stream ended with incomplete shards: {sink.incomplete}")
    finally:
        bar.close()
        try:
            groups = ray.get(monitor.state.remote(), timeout=30)["groups"]
        except Exception:  # noqa: BLE001 - the monitor is gone with its node or Ray; nothing to release then
            groups = []
        ray.kill(monitor)
        if groups:
            release_groups(groups)


def _batches(ds):
    """The dataset's batches as lists of rows, from a thread; None every POLL_S while nothing arrives."""
    q: queue.Queue = queue.Queue(maxsize=4)
    done = object()

    def pump():
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                q.put(batch.to_pylist())
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the driver's thread
            q.put(e)

    threading.Thread(target=pump, daemon=True, name="lineray-stream").start()
    while True:
        try:
            item = q.get(timeout=POLL_S)
        except queue.Empty:
            yield None
            continue
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _committed_quietly(out: Output) -> dict:
    """The output's manifest if it is readable now (the full checks come in prepare_output)."""
    try:
        return out.committed()
    except Exception:  # noqa: BLE001 - a damaged or unreachable output is reported by prepare_output
        return {}


def _local_gpus() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no CUDA build
        return 0


def _mb(gib: float | None) -> int | None:
    return None if gib is None else int(gib * 1024)
