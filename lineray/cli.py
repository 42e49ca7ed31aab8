"""`lineray ...` console entry point.

Subcommands live beside the code they drive; each module exposes
`add_arguments(parser)` and `run(args) -> int`, and this file only registers them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from lineray.yamlfile import load_mapping

# name -> (module, add_arguments, run, help)
SUBCOMMANDS = {
    "sample": ("lineray.cli", "add_sample_arguments", "run_sample",
               "generate images for a few class labels in this process and write PNGs + a contact sheet"),
    "generate": ("lineray.pipelines.cli", "add_generate_arguments", "run_generate",
                 "run a batch job (prompts file -> Parquet image dataset) on Ray"),
    "submit": ("lineray.pipelines.cli", "add_submit_arguments", "run_submit",
               "submit a batch job to a remote Ray cluster (JobSubmissionClient)"),
    "job-status": ("lineray.pipelines.cli", "add_status_arguments", "run_status", "status of a submitted job"),
    "job-logs": ("lineray.pipelines.cli", "add_logs_arguments", "run_logs", "logs of a submitted job"),
    "job-stop": ("lineray.pipelines.cli", "add_stop_arguments", "run_stop", "stop a submitted job"),
    "export": ("lineray.pipelines.export", "add_arguments", "run",
               "write a job's images as PNG files plus a contact sheet"),
    "eval": ("lineray.quality", "add_arguments", "run",
             "evaluate cache policies on the bundled model (NLL, KL, agreement, FD, class accuracy)"),
    "presets": ("lineray.cli", "add_presets_arguments", "run_presets",
                "list model presets with their shapes and valid tensor-parallel sizes"),
}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", dest="preset", help="model preset (GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-3B, GPT-tiny); "
                   "default: the bundled digits model")
    g.add_argument("--checkpoint", help="GPT checkpoint (.pt/.pth/.safetensors); 'random' for random weights")
    g.add_argument("--vq", help="VQ-16 tokenizer checkpoint (vq_ds16_c2i.pt); 'random' for a random decoder")
    g.add_argument("--grid-size", type=int, help="image tokens per side (16 for 256px, 24 for 384px)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"],
                   help="compute dtype (default float32; auto = bfloat16 where the hardware has it)")
    g.add_argument("--ema", action="store_true", default=None, help="load the checkpoint's EMA weights")


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KV cache")
    g.add_argument("--cache", dest="policy", choices=["full", "linear", "window", "heavy_hitter"],
                   help="cache policy (default full)")
    g.add_argument("--rho", help="cache budget as a fraction of the image tokens, e.g. 1/6")
    g.add_argument("--cache-lines", dest="lines", type=int, help="cache budget in grid lines")
    g.add_argument("--recent-lines", type=int, help="newest lines always kept (R)")
    g.add_argument("--anchor-lines", type=int, help="first visual lines kept forever")
    g.add_argument("--pool", type=int, help="odd 2D neighbourhood size for score pooling")
    g.add_argument("--head-aggregate", action="store_true", default=None, help="one selection for all heads of a row")
    g.add_argument("--cfg-shared", action="store_true", default=None, help="uncond CFG rows keep what the cond row keeps")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1 = off)")
    g.add_argument("--cfg-interval", type=int, help="apply CFG to the first N+1 tokens only (-1 = all)")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)


def specs_from_args(args, config: dict | None = None):
    """(ModelSpec, CacheSpec, SamplingConfig or None) from a YAML dict overridden by CLI flags."""
    from lineray.cache import CacheSpec
    from lineray.kernels.sampling import SamplingConfig
    from lineray.models.spec import ModelSpec

    config = config or {}
    model = dict(config.get("model") or {})
    for key in ("preset", "grid_size", "dtype", "ema"):
        if getattr(args, key, None) is not None:
            model[key] = getattr(args, key)
    if args.checkpoint is not None:
        model["checkpoint"] = args.checkpoint
    if args.vq is not None:
        model["decoder"] = args.vq
    if "preset" in model and "checkpoint" not in model:
        raise ValueError(f"--model {model['preset']} needs --checkpoint PATH (or --checkpoint random)")
    if model.get("checkpoint", "bundled") != "bundled" and "decoder" not in model:
        raise ValueError("a non-bundled model needs --vq PATH (or --vq random)")
    cache = dict(config.get("cache") or {})
    for key in ("policy", "rho", "lines", "recent_lines", "anchor_lines", "pool", "head_aggregate", "cfg_shared"):
        if getattr(args, key, None) is not None:
            cache[key] = getattr(args, key)
    if cache.get("policy", "full") != "full" and cache.get("rho") is None and cache.get("lines") is None:
        cache["rho"] = "1/6"
    sampling = dict(config.get("sampling") or {})
    for key in ("cfg_scale", "cfg_interval", "temperature", "top_k", "top_p"):
        if getattr(args, key, None) is not None:
            sampling[key] = getattr(args, key)
    from lineray.validation import from_data
    model_spec = from_data(ModelSpec, model, ValueError, "model")
    sampling_cfg = None
    if sampling:
        base = model_spec.default_sampling().__dict__ | sampling
        sampling_cfg = SamplingConfig(**base)
    return model_spec, CacheSpec.from_dict(cache), sampling_cfg


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


def load_yaml(paths: list[str] | str | None) -> dict:
    """Load one or more YAML files; later files override earlier ones section by section."""
    if not paths:
        return {}
    if isinstance(paths, (list, tuple)):
        merged: dict = {}
        for path in paths:
            for key, value in load_yaml(path).items():
                merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
        return merged
    return load_mapping(paths)


# -- sample -------------------------------------------------------------------
def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9", help="comma-separated class ids")
    p.add_argument("--count", type=int, default=1, help="images per class")
    p.add_argument("--seed", type=int, default=0, help="image i gets seed SEED + i")
    p.add_argument("--out", default="out/samples", help="output folder for PNGs and contact_sheet.png")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (Ray actors, gloo on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the dense parts of the decode step (pays on GPUs; see benchmarks)")
    p.add_argument("--config", action="append", help="YAML with model:, cache:, sampling: sections; may repeat "
                   "(e.g. configs/models/X.yaml --config configs/cache/linear-1-6.yaml); flags override")
    add_model_arguments(p)
    add_cache_arguments(p)
    add_sampling_arguments(p)


def run_sample(args) -> int:
    from lineray.api import sample

    model, cache, sampling = specs_from_args(args, load_yaml(args.config))
    classes = [c for c in parse_int_list(args.classes, "--classes") for _ in range(args.count)]
    model_cfg = model.config()
    model_cfg.check_tp(args.tp, model.preset)
    plan = cache.plan(model_cfg.grid_size, model_cfg.grid_size, model_cfg.image_tokens)
    print(f"lineray sample: {len(classes)} images, model {model.preset if not model.is_bundled else 'bundled digits'}, "
          f"cache {plan.describe()}, tp {args.tp}", file=sys.stderr)
    run = lambda: sample(classes, model=model, cache=cache, sampling=sampling, seed=args.seed,  # noqa: E731
                         batch_size=args.batch_size, tp=args.tp, compile=args.compile, out=args.out)
    if args.tp > 1:
        from lineray.cluster.local import ray_session
        with ray_session():
            result = run()
    else:
        result = run()
    print(f"wrote {len(result.paths)} images and {result.sheet} "
          f"({result.images_per_second:.2f} images/s)")
    return 0


# -- presets ------------------------------------------------------------------
def add_presets_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run_presets(args) -> int:
    from lineray.models.config import PRESETS, preset

    print(f"{'preset':<12}{'layers':>7}{'dim':>6}{'heads':>6}{'head_dim':>9}{'ffn':>6}{'params':>9}  valid tp")
    for name in PRESETS:
        c = preset(name)
        params = (c.vocab_size * c.dim * 2 + c.n_layer * (4 * c.dim * c.dim + 3 * c.dim * c.ffn_hidden)) / 1e6
        print(f"{name:<12}{c.n_layer:>7}{c.dim:>6}{c.n_head:>6}{c.head_dim:>9}{c.ffn_hidden:>6}{params:>8.0f}M  "
              f"{','.join(map(str, c.valid_tp_sizes()))}")
    return 0


# -- entry point --------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lineray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, add, _, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            getattr(importlib.import_module(module), add)(p)
        except (ImportError, AttributeError):  # a feature not installed in this build
            p.set_defaults(_unavailable=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lineray.cache import CacheConfigError
    from lineray.models.checkpoint import CheckpointError
    from lineray.models.generate import GenerationError

    args = build_parser().parse_args(argv)
    if getattr(args, "_unavailable", False):
        print(f"lineray: error: '{args.command}' is not available in this build", file=sys.stderr)
        return 2
    module, _, run, _ = SUBCOMMANDS[args.command]
    try:
        return int(getattr(importlib.import_module(module), run)(args) or 0)
    except (CheckpointError, GenerationError, CacheConfigError, ValueError, FileNotFoundError) as e:
        print(f"lineray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lineray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
