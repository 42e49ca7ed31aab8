"""`lineray generate` / `lineray submit` (and job status / logs / stop).

    lineray generate configs/jobs/digits.yaml --replicas 2 --set cache.rho=1/6
    lineray submit configs/jobs/s3_example.yaml --address http://head:8265 --wait
    lineray job-status JOB_ID --address http://head:8265

The lineray console entry point registers the add_*/run_* pairs; `python -m
lineray.pipelines.cli ...` runs them on its own (the entrypoint of submitted jobs).
"""
from __future__ import annotations

import argparse
import sys

# argparse dest -> job setting, for the flags shared with `lineray sample` (lineray.cli)
_MODEL_FLAGS = {"preset": "model.preset", "grid_size": "model.grid_size", "dtype": "model.dtype", "ema": "model.ema"}
_CACHE_FLAGS = {k: f"cache.{k}" for k in ("policy", "rho", "lines", "recent_lines", "anchor_lines", "pool",
                                          "head_aggregate", "cfg_shared")}
_SAMPLING_FLAGS = {k: f"sampling.{k}" for k in ("cfg_scale", "cfg_interval", "temperature", "top_k", "top_p")}
_JOB_FLAGS = {"source": "source", "output": "output", "format": "format", "replicas": "replicas", "tp": "tp",
              "batch_size": "batch_size", "memory_budget_gib": "memory_budget_gib",
              "max_batch_size": "max_batch_size", "seed": "seed", "shard_rows": "shard_rows", "device": "device",
              "text_encoder": "text_encoder", "max_error_fraction": "max_error_fraction", "verify": "verify",
              "overwrite": "overwrite", "num_cpus": "num_cpus", "stall_timeout_s": "stall_timeout_s",
              "object_store_gib": "object_store_gib"}


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The job file and the flags that override it."""
    p.add_argument("config", help="job YAML (e.g. configs/jobs/digits.yaml)")
    g = p.add_argument_group("job")
    g.add_argument("--source", help="prompt file(s): URL, folder or glob (s3://, gs://, file paths)")
    g.add_argument("--output", help="output dataset URL (rerun with the same output to resume)")
    g.add_argument("--format", choices=["jsonl", "csv", "parquet"], help="prompt format (default: by extension)")
    g.add_argument("--replicas", type=int, help="model replicas")
    g.add_argument("--tp", type=int, help="tensor-parallel size of each replica")
    g.add_argument("--batch-size", type=_int_or_text, metavar="N|auto",
                   help="images per generation batch; auto (default): the largest that fits memory")
    g.add_argument("--memory-budget-gib", type=float,
                   help="memory one replica rank may use for weights + K/V + activations (default: derived)")
    g.add_argument("--max-batch-size", type=int, help="largest batch auto picks (default 64)")
    g.add_argument("--seed", type=int, help="job seed (image seeds derive from it, the id and the image index)")
    g.add_argument("--shard-rows", type=int, help="prompt rows per output file (the unit of resume)")
    g.add_argument("--device", help="cpu or cuda")
    g.add_argument("--text-encoder", help="local FLAN-T5 folder for text rows (t2i models)")
    g.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN",
                   help="the files' name of a prompt field, e.g. --column class=class_label --column text=caption")
    g.add_argument("--max-error-fraction", type=float,
                   help="stop (exit 3) when more than this fraction of rows is rejected (default 0.5, "
                        "checked after the first 1000 rows; a job whose every row is rejected always stops)")
    g.add_argument("--overwrite", action="store_true", default=None,
                   help="clear the output first, even files this job did not write (otherwise a foreign output "
                        "is refused and a resumable one is resumed)")
    g.add_argument("--verify", action="store_true", default=None,
                   help="on resume, checksum every committed file (the size is always checked)")
    g.add_argument("--stall-timeout-s", type=float,
                   help="fail when no image finishes and no generator is busy this long (default 600)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any job setting, dotted for sections: --set cache.rho=1/6 --set resources.decoders=2")
    from lineray.cli import add_cache_arguments, add_model_arguments, add_sampling_arguments
    add_model_arguments(p)
    add_cache_arguments(p)
    add_sampling_arguments(p)


def _int_or_text(text: str) -> int | str:
    """--batch-size: a number, else the text as is (JobConfig names a bad value)."""
    try:
        return int(text)
    except ValueError:
        return text


def job_from_args(args):
    """The JobConfig of a YAML file overridden by --set and then by the named flags."""
    from lineray.pipelines.config import JobConfig, parse_set

    overrides = parse_set(args.set)
    for flags in (_JOB_FLAGS, _MODEL_FLAGS, _CACHE_FLAGS, _SAMPLING_FLAGS):
        for dest, key in flags.items():
            if getattr(args, dest, None) is not None:
                overrides[key] = getattr(args, dest)
    if getattr(args, "checkpoint", None) is not None:
        overrides["model.checkpoint"] = None if args.checkpoint == "random" else args.checkpoint
    if getattr(args, "vq", None) is not None:
        overrides["model.decoder"] = None if args.vq == "random" else args.vq
    if getattr(args, "column", None):
        from lineray.pipelines.config import parse_columns
        overrides["columns"] = parse_columns(args.column)
    if getattr(args, "address", None) is not None and args.command_kind == "generate":
        overrides["ray_address"] = args.address
    return JobConfig.from_yaml(args.config, overrides)


# -- generate ------------------------------------------------------------------------------
def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    add_job_arguments(p)
    p.add_argument("--address", help="Ray cluster to run on (e.g. auto, ray://head:10001); "
                   "default: $RAY_ADDRESS, else a private local Ray")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of the private local Ray (default: enough for all stages)")
    p.add_argument("--object-store-gib", type=float,
                   help="object store of the private local Ray (default: sized from the machine's memory)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true",
                   help="Ray's and Ray Data's own output on the console too (default: in OUTPUT/_logs/)")
    p.set_defaults(command_kind="generate")


# Exit codes of `lineray generate` (README, "What a job guarantees"):
EXIT_OK = 0  # every valid row's images are in the dataset (bad rows are in errors/)
EXIT_FAILED = 1  # the job failed while running (a crash, a Ray error): rerun the same command to resume
EXIT_REFUSED = 2  # refused before starting: settings, prompt source, output (foreign, unreachable), resources
EXIT_BAD_ROWS = 3  # too many rows rejected (max_error_fraction); the message gives the most common reasons
EXIT_STALLED = 4  # no progress for stall_timeout_s: the message names the stuck stage; rerun resumes


def run_generate(args) -> int:
    from lineray.pipelines.console import quiet_console
    from lineray.pipelines.job import run_job
    from lineray.pipelines.monitor import JobStalled
    from lineray.pipelines.rejects import TooManyBadRows

    job = job_from_args(args)
    with quiet_console(job.output, job.storage_options, verbose=args.verbose) as console:
        try:
            run_job(job, progress=not args.quiet, progress_stream=console)
        except (TooManyBadRows, JobStalled) as e:
            print(f"lineray generate: error: {e}", file=console)
            return EXIT_BAD_ROWS if isinstance(e, TooManyBadRows) else EXIT_STALLED
        except (ValueError, FileNotFoundError, ImportError) as e:
            print(f"lineray generate: error: {e}", file=console)
            return EXIT_REFUSED
    return EXIT_OK  # the summary line is already on the console (and in OUTPUT/_summary.json)


# -- submit / status / logs / stop ------------------------------------------------------------
def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://head:8265")


def add_submit_arguments(p: argparse.ArgumentParser) -> None:
    add_job_arguments(p)
    _add_address(p)
    p.add_argument("--no-package", action="store_true", help="do not upload lineray (the cluster image has it)")
    p.add_argument("--pip", action="append", default=[], help="extra pip package for the job's runtime_env")
    p.add_argument("--submission-id", help="job id to use (default: Ray picks one)")
    p.add_argument("--python", default="python", help="interpreter on the cluster that runs the driver")
    p.add_argument("--wait", action="store_true", help="stream the job's logs and wait for it to end")
    p.set_defaults(command_kind="submit")


def run_submit(args) -> int:
    from lineray.cluster import submit as jobs

    job_id = jobs.submit(job_from_args(args), args.address, package=not args.no_package, pip=args.pip or None,
                         submission_id=args.submission_id, python=args.python)
    print(f"submitted {job_id} to {args.address}")
    if not args.wait:
        print(f"follow it with: lineray job-logs {job_id} --address {args.address}")
        return 0
    state = jobs.wait(job_id, args.address, timeout=float("inf"))
    print(jobs.logs(job_id, args.address), end="")
    print(f"{job_id}: {state}")
    return 0 if state == "SUCCEEDED" else 1


def _add_job_id(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_id", help="the submission id printed by `lineray submit`")
    _add_address(p)


add_status_arguments = add_logs_arguments = add_stop_arguments = _add_job_id


def run_status(args) -> int:
    from lineray.cluster.submit import status
    print(status(args.job_id, args.address))
    return 0


def run_logs(args) -> int:
    from lineray.cluster.submit import logs
    print(logs(args.job_id, args.address), end="")
    return 0


def run_stop(args) -> int:
    from lineray.cluster.submit import stop
    print("stopping" if stop(args.job_id, args.address) else "not running")
    return 0


COMMANDS = {
    "generate": (add_generate_arguments, run_generate, "run a batch job (prompts -> Parquet image dataset) on Ray"),
    "submit": (add_submit_arguments, run_submit, "submit a batch job to a remote Ray cluster"),
    "job-status": (add_status_arguments, run_status, "status of a submitted job"),
    "job-logs": (add_logs_arguments, run_logs, "logs of a submitted job"),
    "job-stop": (add_stop_arguments, run_stop, "stop a submitted job"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lineray.pipelines.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, _, help_text) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except (ValueError, FileNotFoundError, ImportError) as e:  # config, source, output and plan errors
        print(f"lineray {args.command}: error: {e}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
