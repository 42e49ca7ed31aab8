"""`lineray ...`: the one command line (console entry point and `python -m lineray.cli`).

    lineray sample --classes 3,5 --cache linear --rho 1/4            images in this process (no Ray)
    lineray sample --model janus-pro-1b --checkpoint Janus-Pro-1B/ --prompt "a red fox in snow"
    lineray generate configs/jobs/digits.yaml --replicas 2           a batch job on Ray
    lineray submit configs/jobs/s3_example.yaml --address http://head:8265 --wait
    lineray job-status|job-logs|job-stop JOB_ID --address http://head:8265

Every command's settings pass through one schema (lineray.pipelines.config, lineray.validation):
YAML sections, then `--set KEY=VALUE`, then the named flags, each flag naming its setting in FLAGS.
"""
from __future__ import annotations

import argparse
import sys

import yaml

import lineray

# argparse dest -> setting (dotted path in the job schema). One table for every command.
FLAGS = {
    **{k: f"model.{k}" for k in ("preset", "checkpoint", "decoder", "tokenizer", "grid_size", "size", "dtype", "ema")},
    **{k: f"cache.{k}" for k in ("policy", "rho", "lines", "recent_lines", "anchor_lines", "pool",
                                 "head_aggregate", "cfg_shared", "score_decay")},
    **{k: f"sampling.{k}" for k in ("cfg_scale", "cfg_interval", "temperature", "top_k", "top_p")},
    **{k: k for k in ("source", "output", "format", "replicas", "tp", "device", "batch_size", "memory_budget_gib",
                      "max_batch_size", "seed", "shard_rows", "text_encoder", "max_error_fraction", "overwrite",
                      "verify", "stall_timeout_s", "num_cpus", "object_store_gib", "compile", "ray_address")},
}
SAMPLE_SECTIONS = ("model", "cache", "sampling")  # what `lineray sample --config FILE` may hold


# -- flags shared by the commands ------------------------------------------------------------------
def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", dest="preset", metavar="NAME",
                   help="a bundled model (digits, the default), a LlamaGen preset (GPT-B ... GPT-3B, GPT-tiny) with "
                        "--checkpoint and --vq, or a text-prompt family's preset (janus-pro-1b, janus-pro-7b) with "
                        "--checkpoint FOLDER; `lineray presets` lists them")
    g.add_argument("--checkpoint", metavar="PATH|random",
                   help="LlamaGen: GPT weights (.pt/.pth/.safetensors); Janus-Pro: the downloaded model folder "
                        "(config.json, tokenizer.json, weights); 'random' for random weights")
    g.add_argument("--vq", dest="decoder", metavar="PATH|random",
                   help="VQ-16 image decoder (vq_ds16_c2i.pt) of a LlamaGen preset; 'random' for a random decoder "
                        "(folder families read theirs from the checkpoint folder)")
    g.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer.json (or its folder) for text prompts; default: the checkpoint folder's "
                        "(needed with --checkpoint random)")
    g.add_argument("--grid-size", type=int, help="image tokens per side (16 for 256 px, 24 for 384 px)")
    g.add_argument("--size", metavar="WxH|sample",
                   help="Lumina-mGPT: image width x height in px, multiples of 32 (e.g. 768x512), or 'sample': the "
                        "model draws each image's size as the original does; default: the preset's size (job rows "
                        "may give their own `size`)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"],
                   help="compute dtype (default float32; auto = bfloat16 where the hardware has it)")
    g.add_argument("--ema", action="store_true", default=None, help="load the checkpoint's EMA weights")


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KV cache")
    g.add_argument("--cache", dest="policy", choices=["full", "linear", "window", "heavy_hitter"],
                   help="cache policy (default full)")
    g.add_argument("--rho", help="cache budget as a fraction of the image tokens, e.g. 1/6 (default when a "
                   "compressing policy is given without a budget: 1/8 for Lumina-mGPT; for other models 1/6 in "
                   "`sample`, required in jobs)")
    g.add_argument("--cache-lines", dest="lines", type=int, help="cache budget in grid lines")
    g.add_argument("--recent-lines", type=int, help="newest lines always kept (R)")
    g.add_argument("--anchor-lines", type=int, help="first visual lines kept forever")
    g.add_argument("--pool", type=int, help="odd 2D neighbourhood size for score pooling")
    g.add_argument("--head-aggregate", action="store_true", default=None, help="one selection for all heads of a row")
    g.add_argument("--cfg-shared", action="store_true", default=None, help="uncond CFG rows keep what the cond row keeps")
    g.add_argument("--score-decay", type=float, help="linear: share of a token's score kept at each line end "
                   "(0 = only the last line's attention, LineAR as published; 1 = all since it was written)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (default: the model's own settings)")
    g.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1 = off)")
    g.add_argument("--cfg-interval", type=int, help="apply CFG to the first N+1 tokens only (-1 = all)")
    g.add_argument("--temperature", type=float, help="softmax temperature (0 = greedy)")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass (1 = off)")


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The job file and the flags that override it."""
    p.add_argument("config", help="job YAML (e.g. configs/jobs/digits.yaml)")
    g = p.add_argument_group("job")
    g.add_argument("--source", help="prompt file(s): URL, folder or glob (s3://, gs://, file paths)")
    g.add_argument("--output", help="output dataset URL (rerun with the same output to resume)")
    g.add_argument("--format", choices=["jsonl", "csv", "parquet"], help="prompt format (default: by extension)")
    g.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN",
                   help="the files' name of a prompt field, e.g. --column class=class_label --column text=caption")
    g.add_argument("--replicas", type=int, help="model replicas")
    g.add_argument("--tp", type=int, help="tensor-parallel size of each replica")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    g.add_argument("--batch-size", type=_int_or_text, metavar="N|auto",
                   help="images per generation batch; auto (default): the largest that fits memory")
    g.add_argument("--memory-budget-gib", type=float,
                   help="memory one replica rank may use for weights + K/V + activations (default: derived)")
    g.add_argument("--max-batch-size", type=int, help="largest batch auto picks (default: 64 on CPU, memory on GPU)")
    g.add_argument("--seed", type=int, help="job seed (image seeds derive from it, the id and the image index)")
    g.add_argument("--shard-rows", type=int, help="prompt rows per output file (the unit of resume)")
    g.add_argument("--text-encoder", help="local FLAN-T5 folder for text rows (t2i models)")
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
    g.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the dense parts of the decode step (pays on GPUs; see benchmarks)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any job setting, dotted for sections: --set cache.rho=1/6 --set resources.decoders=2")
    add_model_arguments(p)
    add_cache_arguments(p)
    add_sampling_arguments(p)


def _int_or_text(text: str) -> int | str:
    """--batch-size: a number, else the text as is (the schema names a bad value)."""
    try:
        return int(text)
    except ValueError:
        return text


def overrides_from_args(args) -> dict:
    """Dotted settings from `--set` and then the named flags (FLAGS) that were given."""
    from lineray.pipelines.config import parse_columns, parse_set

    overrides = parse_set(getattr(args, "set", None) or [])
    overrides |= {key: getattr(args, dest) for dest, key in FLAGS.items() if getattr(args, dest, None) is not None}
    if getattr(args, "column", None):
        overrides["columns"] = parse_columns(args.column)
    return overrides


def job_from_args(args):
    """The JobConfig of a YAML file overridden by --set and then by the named flags."""
    from lineray.pipelines.config import JobConfig

    return JobConfig.from_yaml(args.config, overrides_from_args(args))


# -- sample ----------------------------------------------------------------------------------------
def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", help="comma-separated class ids (class-conditional models; default 0,1,...,9)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a text prompt (text-prompt models such as Janus-Pro); may repeat")
    p.add_argument("--prompts-file", metavar="FILE",
                   help="text prompts, one per line (blank lines skipped), or JSONL rows with a prompt field")
    p.add_argument("--count", type=int, default=1, help="images per class or prompt")
    p.add_argument("--seed", type=int, default=0, help="image i gets seed SEED + i")
    p.add_argument("--out", default="out/samples", help="output folder for PNGs and contact_sheet.png")
    p.add_argument("--batch-size", type=int, default=16, help="images generated together")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (Ray actors, gloo on CPU)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when a GPU is present, else cpu)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the dense parts of the decode step (pays on GPUs; see benchmarks)")
    p.add_argument("--config", action="append", metavar="YAML",
                   help="YAML with model:, cache:, sampling: sections; may repeat (e.g. configs/models/X.yaml "
                        "--config configs/cache/linear-1-6.yaml); flags override")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any model, cache or sampling setting, dotted: --set cache.pool=3")
    add_model_arguments(p)
    add_cache_arguments(p)
    add_sampling_arguments(p)


def sample_settings(args):
    """(ModelSpec, CacheSpec, SamplingConfig) from the --config files, --set and the flags, through the schema."""
    from lineray.pipelines.config import JobConfigError, apply_overrides, with_default_sampling
    from lineray.validation import from_data

    data = merge_yaml(args.config)
    unknown = sorted(set(data) - set(SAMPLE_SECTIONS))
    if unknown:
        raise JobConfigError(f"{', '.join(unknown)}: unknown section(s) for sample; it reads "
                             f"{', '.join(SAMPLE_SECTIONS)}")
    overrides = {k: v for k, v in overrides_from_args(args).items() if k.split(".")[0] in SAMPLE_SECTIONS}
    data = apply_overrides(data, overrides)
    # No sampling section: the model's own defaults (a bundle's tuned settings, Janus-Pro's CFG 5), as api.sample
    data = with_default_sampling({**data, "sampling": data.get("sampling") or {}})
    from lineray.cache import CacheSpec
    from lineray.kernels.sampling import SamplingConfig
    from lineray.models.spec import ModelSpec
    model, cache, sampling = (from_data(cls, data.get(name), JobConfigError, name)
                              for cls, name in ((ModelSpec, "model"), (CacheSpec, "cache"), (SamplingConfig, "sampling")))
    # `--cache linear` alone: the family's LineAR budget (Lumina-mGPT 1/8), else the headline 1/6
    return model, model.cache_with_budget(cache), sampling


def merge_yaml(paths: list[str] | None) -> dict:
    """Several YAML files; later files override earlier ones section by section."""
    from lineray.yamlfile import load_mapping

    merged: dict = {}
    for path in paths or []:
        for key, value in load_mapping(path).items():
            merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


def parse_classes(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--classes must be comma-separated class ids, got {text!r}") from None


def read_prompts_file(path: str) -> list[str]:
    """One prompt per line, or JSONL rows {"prompt": ...}; blank lines are skipped."""
    import json
    from pathlib import Path

    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise FileNotFoundError(f"--prompts-file {path}: {e.strerror}") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.endswith((".jsonl", ".ndjson")):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--prompts-file {path} line {n}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"--prompts-file {path} line {n}: a JSONL row needs a prompt text field")
            line = row["prompt"]
        prompts.append(line)
    if not prompts:
        raise ValueError(f"--prompts-file {path} holds no prompts")
    return prompts


def sample_inputs(args, model_type: str) -> tuple[list[int] | None, list[str] | None]:
    """(classes, prompts) of `lineray sample`, repeated --count times; the one the model takes."""
    prompts = list(args.prompt) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if prompts and args.classes is not None:
        raise ValueError("give --classes or --prompt/--prompts-file, not both")
    if model_type == "text" and not prompts:
        raise ValueError("this model takes text prompts: --prompt TEXT (may repeat) or --prompts-file FILE")
    if prompts:
        return None, [p for p in prompts for _ in range(args.count)]
    classes = parse_classes("0,1,2,3,4,5,6,7,8,9" if args.classes is None else args.classes)
    return [c for c in classes for _ in range(args.count)], None


def run_sample(args) -> int:
    from lineray.api import prompt_token_ids, resolve_device, sample

    model, cache, sampling = sample_settings(args)
    cfg = model.config()
    classes, prompts = sample_inputs(args, cfg.model_type)
    cfg.check_tp(args.tp, model.preset)  # these checks before the first line: an error is one line
    if prompts is not None:
        prompt_token_ids(model, cfg, prompts)
    plan = cfg.cache_plan(cache)
    device = resolve_device(args.device)
    n = len(prompts if prompts is not None else classes)
    print(f"lineray sample: {n} images, model {model.name}, cache {plan.describe()}, tp {args.tp}, "
          f"{device}", file=sys.stderr)
    # sample() checks the class ids or prompts and the tp size before the model loads
    run = lambda: sample(classes, prompts=prompts, model=model, cache=cache, sampling=sampling,  # noqa: E731
                         seed=args.seed, batch_size=args.batch_size, tp=args.tp, device=device, compile=args.compile,
                         out=args.out)
    if args.tp > 1:
        from lineray.cluster.local import ray_session
        with ray_session():
            result = run()
    else:
        result = run()
    print(f"wrote {len(result.paths)} images and {result.sheet} ({result.images_per_second:.2f} images/s)")
    return 0


# -- generate / submit / job-* -----------------------------------------------------------------------
def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    add_job_arguments(p)
    p.add_argument("--address", dest="ray_address", help="Ray cluster to run on (e.g. auto, ray://head:10001); "
                   "default: $RAY_ADDRESS, else a private local Ray")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of the private local Ray (default: enough for all stages)")
    p.add_argument("--object-store-gib", type=float,
                   help="object store of the private local Ray (default: sized from the machine's memory)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true",
                   help="Ray's and Ray Data's own output on the console too (default: in OUTPUT/_logs/)")


# Exit codes (README, "What a job guarantees"):
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

    job = job_from_args(args)  # a bad setting fails here: before Ray, before the console log file
    with quiet_console(job.output, job.storage_options, verbose=args.verbose) as console:
        try:
            run_job(job, progress=not args.quiet, progress_stream=console)
        except (TooManyBadRows, JobStalled) as e:
            print(f"lineray: error: {e}", file=console)
            return EXIT_BAD_ROWS if isinstance(e, TooManyBadRows) else EXIT_STALLED
        except (ValueError, FileNotFoundError, ImportError) as e:
            print(f"lineray: error: {e}", file=console)
            return EXIT_REFUSED
    return EXIT_OK  # the summary line is already on the console (and in OUTPUT/_summary.json)


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://head:8265")


def add_submit_arguments(p: argparse.ArgumentParser) -> None:
    add_job_arguments(p)
    _add_address(p)
    p.add_argument("--no-package", action="store_true", help="do not upload lineray (the cluster image has it)")
    p.add_argument("--pip", action="append", default=[], help="extra pip package for the job's runtime_env")
    p.add_argument("--submission-id", help="job id to use (default: Ray picks one)")
    p.add_argument("--python", default="python", help="interpreter on the cluster that runs the driver")
    p.add_argument("--wait", action="store_true", help="stream the job's logs as they come and wait for its end")


def run_submit(args) -> int:
    from lineray.cluster import submit as jobs

    job_id = jobs.submit(job_from_args(args), args.address, package=not args.no_package, pip=args.pip or None,
                         submission_id=args.submission_id, python=args.python)
    print(f"submitted {job_id} to {args.address}", flush=True)
    if not args.wait:
        print(f"follow it with: lineray job-logs {job_id} --address {args.address}")
        return 0
    state = jobs.follow(job_id, args.address, write=lambda text: print(text, end="", flush=True))
    print(f"{job_id}: {state}")
    return 0 if state == "SUCCEEDED" else 1


def add_job_id_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_id", help="the submission id printed by `lineray submit`")
    _add_address(p)


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


# -- export / eval / presets ---------------------------------------------------------------------
def add_export_arguments(p: argparse.ArgumentParser) -> None:
    from lineray.pipelines.export import add_arguments
    add_arguments(p)


def run_export(args) -> int:
    from lineray.pipelines.export import run
    return run(args)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    from lineray.quality.runner import add_arguments
    add_arguments(p)


def run_eval(args) -> int:
    from lineray.quality.runner import run
    return run(args)


def run_presets(args) -> int:
    from lineray.models.bundles import BUNDLES, shipped
    from lineray.models.config import PRESETS, preset, preset_family
    from lineray.models.family import FAMILIES
    from lineray.models.sizing import param_count
    from lineray.models.spec import FAMILY_NEEDS

    print("bundled models (weights included): "
          + ", ".join(b if shipped(b) else f"{b} (weights not shipped yet)" for b in BUNDLES))
    for family, record in FAMILIES.items():
        names = [n for n in PRESETS if preset_family(n) == family]
        if not names:
            continue
        print(f"\n{family}: {record.description}\n  needs {FAMILY_NEEDS.get(family, '--checkpoint PATH')}")
        print(f"  {'preset':<14}{'layers':>7}{'dim':>6}{'heads':>6}{'head_dim':>9}{'ffn':>7}{'params':>9}"
              f"{'tokens':>8}  {'prompt':<18}valid tp")
        for name in names:
            c = preset(name)
            prompt = {"c2i": "class label", "t2i": "T5 captions"}.get(c.model_type, f"text <= {c.max_prefix_len} tok")
            print(f"  {name:<14}{c.n_layer:>7}{c.dim:>6}{c.n_head:>6}{c.head_dim:>9}{c.ffn_hidden:>7}"
                  f"{_millions(param_count(c)):>9}{f'{c.grid_h}x{c.grid_width}':>8}  {prompt:<18}"
                  f"{','.join(map(str, c.valid_tp_sizes()))}")
    return 0


def _millions(n: int) -> str:
    return f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.2f}M"


# name -> (add_arguments, run, help)
COMMANDS = {
    "sample": (add_sample_arguments, run_sample,
               "generate images for a few class labels or text prompts in this process and write PNGs + a contact "
               "sheet"),
    "generate": (add_generate_arguments, run_generate, "run a batch job (prompts file -> Parquet image dataset) on Ray"),
    "submit": (add_submit_arguments, run_submit, "submit a batch job to a remote Ray cluster (JobSubmissionClient)"),
    "job-status": (add_job_id_arguments, run_status, "status of a submitted job"),
    "job-logs": (add_job_id_arguments, run_logs, "logs of a submitted job"),
    "job-stop": (add_job_id_arguments, run_stop, "stop a submitted job"),
    "export": (add_export_arguments, run_export, "write a job's images as PNG files plus a contact sheet"),
    "eval": (add_eval_arguments, run_eval,
             "evaluate cache policies on the bundled model (NLL, KL, agreement, FD, class accuracy)"),
    "presets": (lambda p: None, run_presets,
                "list bundled models and each family's presets: shapes, what they need, valid tp sizes"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lineray", description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("--version", action="version", version=f"lineray {lineray.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add, _, help_text) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(COMMANDS[args.command][1](args) or 0)
    except (ValueError, FileNotFoundError, ImportError, yaml.YAMLError) as e:
        # config, checkpoint, cache, source and generation errors are ValueErrors with a one-line reason
        print(f"lineray: error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("lineray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
