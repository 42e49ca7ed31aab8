"""How much the batch job costs on top of the model, and whether the driver's memory stays flat.

1. Efficiency: images/s of a whole job (read -> generate -> decode -> PNG -> Parquet commit, one
   replica) divided by images/s of the bare replica (tokens only) on the same model, batch size and
   torch threads. Steady state: from the first finished batch to the last (Ray start and model
   loading excluded; also reported). Goal >= 0.9.
2. Memory: peak RSS of the driver (and of the prompt reader task) while the job reads a 10k- and a
   1,000,000-row prompt file; each run is its own process. The driver must not grow with the file.

    python benchmarks/pipeline_efficiency.py                  # both, ~5 minutes on 2 cores
    python benchmarks/pipeline_efficiency.py --skip-memory --images 256 --batch-size 16
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A random GPT-digits (6 layers, width 128) at 16x16 tokens, with a small VQ decoder (32x32 px):
# generation dominates, as it does for LlamaGen on a GPU.
MODEL = dict(preset="GPT-digits", checkpoint="random", decoder="random", grid_size=16,
             vq_config=dict(codebook_size=32, ch=32, z_channels=32, ch_mult=[1, 1], num_res_blocks=1))
SAMPLING = dict(cfg_scale=2.0, top_k=0)


def write_prompts(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"prompt-{i:08d}", "class": i % 10}) + "\n")
    return path


def bare_replica(images: int, batch: int, threads: int) -> float:
    """Images/s of LocalReplica.generate alone (tokens, no decoding), after one warm-up batch."""
    import torch

    from lineray.models.generate import Condition
    from lineray.pipelines.config import JobConfig

    torch.set_num_threads(threads)
    from lineray.workers.replica import LocalReplica
    job = JobConfig.from_dict(dict(source="-", output="-", model=MODEL, sampling=SAMPLING))
    replica = LocalReplica(job.replica_config)
    cond = Condition.classes([i % 10 for i in range(batch)])
    replica.generate(cond, list(range(batch)))
    t0 = time.perf_counter()
    done = 0
    while done < images:
        replica.generate(cond, list(range(done, done + batch)))
        done += batch
    return done / (time.perf_counter() - t0)


def job_rate(images: int, batch: int, workdir: Path) -> dict:
    """Bare replica (in a 1-CPU Ray actor, before and after) and a one-replica job, in one Ray session."""
    import ray

    from lineray.cluster.local import ensure_ray, shutdown_ray
    from lineray.pipelines import JobConfig, run_job

    ensure_ray(num_cpus=4)
    from ray import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[bare_replica.__module__])  # a script, not a package
    # The bare replica runs where the job's replica runs: a Ray actor with 1 CPU (so 1 torch thread).
    bare_actor = ray.remote(num_cpus=1)(lambda: bare_replica(images, batch, threads=1))
    before = ray.get(bare_actor.remote())
    src = write_prompts(workdir / "prompts.jsonl", images + batch)
    arrivals = []
    job = JobConfig.from_dict(dict(
        source=str(src), output=str(workdir / "out"), model=MODEL, sampling=SAMPLING, replicas=1,
        batch_size=batch, shard_rows=4 * batch, resources=dict(generate_cpus=1.0, decode_cpus=0.5, png_cpus=0.25)))
    t0 = time.perf_counter()
    summary = run_job(job, overwrite=True, progress=False, on_images=lambda rows: arrivals.append(
        (time.perf_counter(), len(rows))))
    wall = time.perf_counter() - t0
    after = ray.get(bare_actor.remote())
    # Steady state: images after the first arrival, over the time from the first arrival to the last.
    first, last = arrivals[0][0], arrivals[-1][0]
    after_first = sum(n for _, n in arrivals[1:])
    shutdown_ray()
    return {"images": summary.images, "wall_s": wall, "whole_run_img_s": summary.images / wall,
            "steady_img_s": after_first / (last - first), "startup_s": first - t0,
            "bare_before": before, "bare_after": after}


# -- memory -------------------------------------------------------------------------------------
def read_only(rows: int, workdir: Path) -> dict:
    """Read and check every row through the job's reader stage; the driver consumes the shards."""
    import ray
    from ray.data import ActorPoolStrategy

    from lineray.cluster.local import ensure_ray, shutdown_ray
    from lineray.pipelines import JobConfig, Output, PromptSource
    from lineray.pipelines.checks import check_job
    from lineray.pipelines.monitor import JobMonitor
    from lineray.pipelines.reader import ShardReader, ticket_count
    from lineray.pipelines.rejects import RejectCounter

    src = workdir / f"prompts-{rows}.jsonl"
    if not src.exists():
        write_prompts(src, rows)
    job = JobConfig.from_dict(dict(source=str(src), output=str(workdir / f"out-{rows}"), model=MODEL,
                                   sampling=SAMPLING, shard_rows=1024, batch_size=16))
    rules = check_job(job)
    source = PromptSource(str(src))
    ensure_ray(num_cpus=2)
    gate = ray.remote(num_cpus=0)(JobMonitor).remote(job.read_ahead_images)
    budget = RejectCounter(job.max_error_fraction, job.error_check_rows)
    tickets = ticket_count(source.count_rows(), job.shard_rows)
    ds = ray.data.from_items([{"ticket": i} for i in range(tickets)], override_num_blocks=tickets).map_batches(
        ShardReader, fn_constructor_args=(source, rules, job.shard_rows, Output(job.output), frozenset(), gate, budget,
                                          job.source),
        batch_size=1, batch_format="pyarrow", compute=ActorPoolStrategy(size=1), num_cpus=0.25)
    reader = ProcessPeak("ray::MapWorker(MapBatches(ShardReader))")
    t0 = time.perf_counter()
    total = 0
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        total += block.num_rows
        gate.arrived.remote(block.num_rows)  # the driver finishes images instantly here
    seconds = time.perf_counter() - t0
    reader.stop()
    shutdown_ray()
    return {"rows": rows, "images": total, "seconds": seconds, "driver_peak_mib": _peak_mib(),
            "reader_peak_mib": reader.peak_mib}


class ProcessPeak:
    """Samples the RSS of the processes whose title starts with `title` (Ray names workers by their task)."""

    def __init__(self, title: str, every: float = 0.2):
        import threading
        self.title, self.every, self.peak_mib = title, every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil
        while not self._stop.is_set():
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = proc.info["cmdline"] or []
                if cmd and cmd[0].startswith(self.title) and proc.info["memory_info"]:
                    self.peak_mib = max(self.peak_mib, proc.info["memory_info"].rss / 2**20)
            self._stop.wait(self.every)

    def stop(self):
        self._stop.set()
        self._thread.join()


def job_memory(rows: int, workdir: Path, seconds: float) -> dict:
    """The real job on a `rows`-row file for `seconds` s (the reader runs ahead until backpressure)."""
    import _thread
    import threading

    from lineray.pipelines import JobConfig, run_job

    src = workdir / f"prompts-{rows}.jsonl"
    if not src.exists():
        write_prompts(src, rows)
    job = JobConfig.from_dict(dict(source=str(src), output=str(workdir / f"job-{rows}"), model=MODEL,
                                   sampling=SAMPLING, shard_rows=1024, batch_size=16))
    images = []
    threading.Timer(seconds, _thread.interrupt_main).start()
    try:
        run_job(job, overwrite=True, progress=False, on_images=lambda r: images.append(len(r)))
    except KeyboardInterrupt:
        pass
    return {"rows": rows, "images_in_window": sum(images), "window_s": seconds, "driver_peak_mib": _peak_mib()}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_subprocess(mode: str, rows: int, workdir: Path, seconds: float) -> dict:
    out = subprocess.run([sys.executable, __file__, f"--_child={mode}", f"--rows={rows}", f"--workdir={workdir}",
                          f"--window={seconds}"], capture_output=True, text=True, timeout=1800,
                         env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{mode} run failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=192, help="images for the efficiency runs")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the big prompt file")
    p.add_argument("--window", type=float, default=60.0, help="seconds the memory job runs")
    p.add_argument("--skip-efficiency", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--workdir")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lineray-bench-"))
    if args._child:
        fn = {"read": lambda: read_only(args.rows, workdir),
              "job": lambda: job_memory(args.rows, workdir, args.window)}[args._child]
        print("RESULT " + json.dumps(fn()), flush=True)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine
    print(f"machine: {machine()}")
    if not args.skip_efficiency:
        # Other load on the machine moves both numbers: the bare replica is measured before and after
        # the job, in the same Ray session and the same kind of 1-CPU actor; the mean is the reference.
        job = _in_subprocess_job(args, workdir)
        before, after = job["bare_before"], job["bare_after"]
        bare = (before + after) / 2
        print(f"\nefficiency ({MODEL['preset']} random, {MODEL['grid_size']}x{MODEL['grid_size']} tokens, "
              f"batch {args.batch_size}, 1 replica, 1 thread)")
        print(f"  bare replica (tokens only)      {bare:7.2f} img/s   (before {before:.2f}, after {after:.2f})")
        print(f"  job, steady state               {job['steady_img_s']:7.2f} img/s   efficiency {job['steady_img_s'] / bare:.2f}")
        print(f"  job, whole run ({job['images']} images)   {job['whole_run_img_s']:7.2f} img/s   "
              f"(start-up {job['startup_s']:.1f}s of {job['wall_s']:.1f}s)")
    if not args.skip_memory:
        print("\nmemory (peak RSS, MiB)")
        print(f"  {'rows':>9} {'mode':<26} {'driver':>8} {'reader':>8} {'time':>8}")
        for rows in (10_000, args.rows):
            r = _in_subprocess("read", rows, workdir, args.window)
            print(f"  {rows:>9} {'read + check all rows':<26} {r['driver_peak_mib']:8.0f} "
                  f"{r['reader_peak_mib'] or float('nan'):8.0f} {r['seconds']:7.1f}s")
        for rows in (10_000, args.rows):
            r = _in_subprocess("job", rows, workdir, args.window)
            print(f"  {rows:>9} {f'job, first {args.window:.0f}s':<26} {r['driver_peak_mib']:8.0f} {'':>8} "
                  f"{r['images_in_window']:>6} img")


def _in_subprocess_job(args, workdir: Path) -> dict:
    # The job runs in its own process so its Ray and threads do not disturb the bare measurement.
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from pipeline_efficiency import job_rate; from pathlib import Path; "
            f"print('RESULT ' + json.dumps(job_rate({args.images}, {args.batch_size}, Path({str(workdir)!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800,
                         env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"job run failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


if __name__ == "__main__":
    main()
