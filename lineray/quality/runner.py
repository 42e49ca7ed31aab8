"""`lineray eval`: how much each KV cache policy and budget costs in quality, on a bundled model
(`--model digits`, 16x16 tokens, or `--model shapes-24`, 24x24 tokens).

For every row (full cache; linear, window and heavy_hitter at each budget):
  - teacher-forced on the real held-out images (no CFG): held-out NLL, and KL / top-1 agreement of
    the next-token distributions against the full cache on the same inputs;
  - sampled with CFG from the same seeds (image i has class i % C and seed seed + i): same-seed token
    agreement with the full cache, Frechet distance to real images in the judge's feature space,
    the judge's class accuracy, and (shapes) the copy IoU of the bottom band against the top band.
A second full-cache row samples other seeds (seed + SEED_SET_OFFSET + i): its distance from the first
full row is the run-to-run spread, the noise floor for reading the differences between rows.
Writes quality.md, quality.csv, quality_vs_budget.png, samples_full.png and samples_<policy>.png to --out.
"""
from __future__ import annotations

import argparse
import csv
import time
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from pathlib import Path

import torch

from lineray.cache import CacheSpec
from lineray.images import contact_sheet, to_uint8
from lineray.kernels.sampling import SamplingConfig
from lineray.models.generate import Condition, generate_tokens
from lineray.quality import metrics

POLICIES = ("linear", "window", "heavy_hitter")
BUDGETS = ("1/2", "1/4", "1/6", "1/8")
SEED_SET_OFFSET = 1_000_000  # the second full-cache row's seeds start here


@dataclass
class EvalRow:
    policy: str
    budget: str  # fraction of the image's lines kept ("1" for the full cache)
    kv_lines: int  # visual lines the cache holds after each line's eviction
    seeds: str  # which seed set sampled this row ("A" = seed + i, "B" = seed + SEED_SET_OFFSET + i)
    heldout_nll: float
    kl_vs_full: float
    top1_vs_full: float
    token_agreement: float  # vs the full cache on seed set A (NaN for seed set B: other seeds)
    frechet_distance: float
    judge_accuracy: float
    copy_iou: float  # NaN when the bundle's data has no copy structure (digits)
    images_per_s: float


def cache_rows(policies=POLICIES, budgets=BUDGETS, linear_decays=(), linear_budgets=None) -> list[tuple[str, CacheSpec]]:
    """(budget label, spec): the full cache first, then every policy at every budget (linear at
    `linear_budgets` if given), then linear with each score_decay in `linear_decays` at every budget."""
    rows = [("1", CacheSpec("full"))]
    for policy in policies:
        if policy == "full":
            continue
        for b in (linear_budgets or budgets) if policy == "linear" else budgets:
            rows.append((b, CacheSpec(policy, rho=float(Fraction(b)))))
    for decay in linear_decays:
        rows += [(b, CacheSpec("linear", rho=float(Fraction(b)), score_decay=decay)) for b in budgets]
    return rows


def slug(label: str) -> str:
    """A row label as a file name part: 'linear decay 0.5' -> 'linear-decay-0.5'."""
    return label.replace(" ", "-").replace("/", "-")


def load_model(bundle: str = "digits", model_dir: str | Path | None = None):
    """(GPT in eval mode, tokenizer, sampling settings) of a bundled model, or of a training output
    directory of that bundle's trainer (gpt.json, gpt.safetensors, tokenizer.safetensors)."""
    from lineray.models.bundles import bundle_module
    from lineray.models.checkpoint import load_checkpoint
    from lineray.models.transformer import Transformer
    b = bundle_module(bundle)
    d = Path(model_dir) if model_dir is not None else b.ASSET_DIR
    model = Transformer(b.model_config(d / b.GPT_JSON))
    load_checkpoint(model, d / b.GPT_FILE)
    return model.eval(), b.PatchTokenizer.load(d / b.TOKENIZER_FILE), b.model_sampling(d / b.GPT_JSON)


@dataclass
class Bench:
    """The model under test, its tokenizer, the judge and the real data they are compared with."""
    bundle: str
    model: torch.nn.Module
    tokenizer: torch.nn.Module
    judge: torch.nn.Module
    sampling: SamplingConfig
    heldout_labels: torch.Tensor  # [M]
    heldout_tokens: torch.Tensor  # [M, N]
    real_features: torch.Tensor  # [R, D] judge features of real images (reference for FD)
    copy_iou: Callable[[torch.Tensor], torch.Tensor] | None  # [N] long-range copy fidelity, if the data has one

    @classmethod
    def load(cls, bundle: str = "digits", model_dir: str | Path | None = None, judge: str | Path | None = None,
             heldout: int | None = None) -> "Bench":
        """A bundled model by name (model_dir None) or a training output directory of that bundle's
        trainer (gpt.json, gpt.safetensors, tokenizer.safetensors). heldout: use only the first N
        held-out images (quick runs)."""
        from lineray.models.bundles import bundle_module
        b = bundle_module(bundle)
        model, tokenizer, sampling = load_model(bundle, model_dir)
        judge_model = b.load_bundled_judge(judge or b.BUNDLED_JUDGE)
        held_images, held_labels = b.heldout_images(heldout)
        _, real_features = judge_model.predict(b.reference_images())
        return cls(bundle, model, tokenizer, judge_model, sampling, held_labels,
                   tokenizer.encode(held_images).flatten(1), real_features, getattr(b, "copy_iou", None))


def teacher_forced_logits(bench: Bench, spec: CacheSpec, batch_size: int) -> torch.Tensor:
    """[M, N, V] next-token logits of the real held-out sequences through `spec` (no CFG)."""
    out = []
    no_cfg = SamplingConfig(cfg_scale=1.0)
    for i in range(0, len(bench.heldout_labels), batch_size):
        cond = Condition.classes(bench.heldout_labels[i:i + batch_size])
        gen = generate_tokens(bench.model, cond, sampling=no_cfg, cache_spec=spec,
                              teacher_tokens=bench.heldout_tokens[i:i + batch_size], return_logits=True)
        out.append(gen.logits)
    return torch.cat(out)


def sample_images(bench: Bench, spec: CacheSpec, sampling: SamplingConfig, labels: torch.Tensor,
                  seeds: list[int], batch_size: int, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, N], images [B, 3, H, W] in [-1, 1]) generated with `spec`."""
    tokens, cache = [], None
    grid = bench.model.config.grid_size
    for i in range(0, len(labels), batch_size):
        cond = Condition.classes(labels[i:i + batch_size])
        rows = len(cond) * (2 if sampling.uses_cfg else 1)
        gen = generate_tokens(bench.model, cond, seeds[i:i + batch_size], sampling=sampling, cache_spec=spec,
                              cache=cache if cache is not None and cache.rows == rows else None)
        cache = gen.cache
        tokens.append(gen.tokens)
        if progress is not None:
            progress.update(len(cond))
    tokens = torch.cat(tokens)
    return tokens, bench.tokenizer.decode_codes(tokens.view(-1, grid, grid))


def evaluate(model_dir: str | Path | None = None, *, bundle: str = "digits", judge: str | Path | None = None,
             samples: int = 1000, batch_size: int = 500, sampling: SamplingConfig | None = None, policies=POLICIES,
             budgets=BUDGETS, linear_budgets=None, linear_decays=(), seed: int = 0, spread: bool = True, heldout: int | None = None,
             out_dir: str | Path | None = None, progress: bool = True) -> list[EvalRow]:
    """Evaluate every cache row; write the table, CSV, plot and sample grids when out_dir is given.

    spread: add the second full-cache row (seed set B) that measures run-to-run noise."""
    from tqdm import tqdm
    if samples < 2:
        raise ValueError(f"samples must be >= 2 (the Frechet distance needs a covariance), got {samples}")
    bench = Bench.load(bundle, model_dir, judge, heldout)
    sampling = sampling or bench.sampling
    cfg = bench.model.config
    labels = torch.arange(samples) % cfg.num_classes
    seed_sets = {"A": [seed + i for i in range(samples)]}
    if spread:
        seed_sets["B"] = [seed + SEED_SET_OFFSET + i for i in range(samples)]
    runs = [(budget, spec, "A") for budget, spec in cache_rows(policies, budgets, linear_decays, linear_budgets)]
    if spread:
        runs.insert(1, ("1", CacheSpec("full"), "B"))
    rows, grids = [], {}
    ref_logits = ref_tokens = None
    # Each finished row is kept in OUT/rows/ with the settings it ran with, so an interrupted table
    # (an hour and more on a laptop) resumes at its first missing row.
    settings = dict(bundle=bundle, model_dir=str(model_dir), samples=samples, seed=seed, heldout=heldout,
                    sampling=asdict(sampling))
    done_dir = Path(out_dir) / "rows" if out_dir is not None else None
    bar = tqdm(total=samples * len(runs), unit="img", desc="eval", disable=not progress, dynamic_ncols=True)
    for budget, spec, seed_set in runs:
        plan = spec.plan(cfg.grid_size, cfg.grid_size, cfg.image_tokens)
        bar.set_postfix_str(f"{plan.describe()}, seeds {seed_set}")
        done_file = None if done_dir is None else done_dir / f"{slug(spec.label)}_{slug(budget)}_{seed_set}.pt"
        done = finished_row(done_file, settings)
        if done is not None:
            rows.append(EvalRow(**done["row"]))
            if ref_logits is None:
                ref_logits, ref_tokens = done["logits"], done["tokens"]
            if "grid" in done:
                grids[(spec.label, budget)] = done["grid"].numpy()
            bar.update(samples)
            continue
        # Teacher forcing does not depend on the seeds: the second full row reuses the first's logits.
        logits = ref_logits if seed_set == "B" else teacher_forced_logits(bench, spec, batch_size)
        t0 = time.perf_counter()
        tokens, images = sample_images(bench, spec, sampling, labels, seed_sets[seed_set], batch_size, bar)
        seconds = time.perf_counter() - t0
        if ref_logits is None:  # the full cache comes first
            ref_logits, ref_tokens = logits, tokens
        predicted, features = bench.judge.predict(images)
        rows.append(EvalRow(
            policy=spec.label, budget=budget, kv_lines=plan.budget_lines, seeds=seed_set,
            heldout_nll=metrics.token_nll(logits, bench.heldout_tokens),
            kl_vs_full=float(metrics.kl_divergence(ref_logits, logits).mean()),
            top1_vs_full=metrics.top1_agreement(ref_logits, logits),
            token_agreement=metrics.token_agreement(ref_tokens, tokens) if seed_set == "A" else math.nan,
            frechet_distance=metrics.frechet_distance(features, bench.real_features),
            judge_accuracy=metrics.class_accuracy(predicted, labels),
            copy_iou=float(bench.copy_iou(images).mean()) if bench.copy_iou is not None else math.nan,
            images_per_s=samples / seconds))
        if seed_set == "A":
            # Two of each class per row for the policy sheets; ten of each for the full cache's own sheet.
            keep = (10 if spec.policy == "full" else 2) * cfg.num_classes
            grids[(spec.label, budget)] = to_uint8(images[:min(samples, keep)])
        if done_file is not None:
            keep_row = dict(settings=settings, row=asdict(rows[-1]), tokens=tokens)
            if logits is ref_logits and seed_set == "A":
                keep_row["logits"] = logits  # the reference of every later row
            if seed_set == "A":
                keep_row["grid"] = torch.from_numpy(grids[(spec.label, budget)])
            done_dir.mkdir(parents=True, exist_ok=True)
            torch.save(keep_row, done_file.with_suffix(".tmp"))
            done_file.with_suffix(".tmp").replace(done_file)
    bar.close()
    if out_dir is not None:
        write_outputs(rows, grids, Path(out_dir), sampling, samples, bundle)
    return rows


def finished_row(path: Path | None, settings: dict) -> dict | None:
    """A row finished by an earlier run with the same settings, or None."""
    if path is None or not path.is_file():
        return None
    done = torch.load(path, weights_only=True)
    return done if done.get("settings") == settings else None


# -- outputs -------------------------------------------------------------------
COLUMNS = [("policy", "policy", "{}"), ("budget", "budget", "{}"), ("kv_lines", "KV lines", "{}"),
           ("seeds", "seeds", "{}"),
           ("heldout_nll", "held-out NLL", "{:.4f}"), ("kl_vs_full", "KL vs full", "{:.4f}"),
           ("top1_vs_full", "top-1 vs full", "{:.3f}"), ("token_agreement", "same-seed tokens", "{:.3f}"),
           ("frechet_distance", "judge FD", "{:.2f}"), ("judge_accuracy", "judge acc", "{:.3f}"),
           ("copy_iou", "copy IoU", "{:.3f}"), ("images_per_s", "images/s", "{:.1f}")]


def _cell(value, fmt: str) -> str:
    return "-" if isinstance(value, float) and math.isnan(value) else fmt.format(value)


def markdown_table(rows: list[EvalRow]) -> str:
    columns = [c for c in COLUMNS if not all(_cell(getattr(r, c[0]), "{}") == "-" for r in rows)]  # drop empty ones
    head = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(getattr(r, key), fmt) for key, _, fmt in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def write_outputs(rows: list[EvalRow], grids: dict, out: Path, sampling: SamplingConfig, samples: int,
                  bundle: str = "digits") -> None:
    out.mkdir(parents=True, exist_ok=True)
    settings = (f"model {bundle}; {samples} samples per row (seeds A = seed + i; B = seed + {SEED_SET_OFFSET} + i); cfg_scale {sampling.cfg_scale:g}, temperature "
                f"{sampling.temperature:g}, top_k {sampling.top_k}, top_p {sampling.top_p:g}")
    (out / "quality.md").write_text(f"{settings}\n\n{markdown_table(rows)}\n")
    with open(out / "quality.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(EvalRow)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    plot_quality(rows, out / "quality_vs_budget.png", settings)
    full = grids.get(("full", "1"))
    if full is not None:  # columns are the classes 0-9, rows are seeds
        contact_sheet(list(full), cols=min(len(full), 10), min_cell=48).save(out / "samples_full.png")
    for policy in dict.fromkeys(r.policy for r in rows if r.policy != "full"):
        # One row of images per budget, the full cache on top; the same seeds in every row.
        keys = [(p, b) for (p, b) in grids if p == policy]
        cols = len(grids[keys[0]])
        if full is not None:
            keys.insert(0, ("full", "1"))
        images = [img for k in keys for img in grids[k][:cols]]
        captions = [("full" if k[0] == "full" else k[1]) for k in keys for _ in range(cols)]
        contact_sheet(images, captions, cols=cols, min_cell=48).save(out / f"samples_{slug(policy)}.png")


def plot_quality(rows: list[EvalRow], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("heldout_nll", "held-out NLL (nats/token)"), ("kl_vs_full", "KL vs full cache"),
              ("top1_vs_full", "top-1 agreement vs full"), ("token_agreement", "same-seed token agreement"),
              ("frechet_distance", "Frechet distance (judge features)"), ("judge_accuracy", "judge class accuracy")]
    if not all(math.isnan(r.copy_iou) for r in rows):
        panels.append(("copy_iou", "copy IoU (bottom band vs top band)"))
    full = next((r for r in rows if r.policy == "full"), None)
    other_seeds = next((r for r in rows if r.policy == "full" and r.seeds != "A"), None)
    fig, axes = plt.subplots(2, math.ceil(len(panels) / 2), figsize=(4.3 * math.ceil(len(panels) / 2), 7))
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (key, label) in zip(axes.flat, panels):
        for policy in dict.fromkeys(r.policy for r in rows if r.policy != "full"):
            pts = sorted((float(Fraction(r.budget)), getattr(r, key)) for r in rows if r.policy == policy)
            ax.plot(*zip(*pts), marker="o", label=policy)
        if full is not None:
            ax.axhline(getattr(full, key), color="black", linestyle="--", linewidth=1, label="full cache")
        if other_seeds is not None and key not in ("token_agreement", "kl_vs_full", "top1_vs_full", "heldout_nll"):
            ax.axhline(getattr(other_seeds, key), color="grey", linestyle=":", linewidth=1,
                       label="full cache, seeds B (spread)")
        ax.set_xlabel("KV budget (fraction of image lines)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- CLI -----------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from lineray.models.bundles import BUNDLES
    p.add_argument("--model", dest="bundle", default="digits", choices=list(BUNDLES),
                   help="the bundled model to evaluate (default digits)")
    p.add_argument("--out", type=Path, default=Path("outputs/eval"), help="directory for table, CSV and PNGs")
    p.add_argument("--samples", type=int, default=1000, help="generated images per row (classes cycle)")
    p.add_argument("--batch-size", type=int, default=500, help="images generated together")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES), help="cache policies to compare")
    p.add_argument("--budgets", nargs="+", default=list(BUDGETS), help="fractions of the image lines, e.g. 1/4")
    p.add_argument("--linear-budgets", nargs="+", default=None,
                   help="budgets of the linear rows (default: --budgets), e.g. 1/2 1/4 1/6 1/8 beside baselines at 1/4 1/6 1/8")
    p.add_argument("--linear-decays", nargs="+", type=float, default=[],
                   help="also rows of linear with these score_decay values (0 < d <= 1) at every budget")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED + i")
    p.add_argument("--no-spread", action="store_true",
                   help=f"skip the second full-cache row (seeds SEED + {SEED_SET_OFFSET} + i) that measures noise")
    p.add_argument("--heldout", type=int, default=None,
                   help="teacher-force only the first N held-out images (default: all; digits 360, shapes-24 500)")
    p.add_argument("--cfg-scale", type=float, default=None, help="default: the model's tuned setting")
    p.add_argument("--temperature", type=float, default=None, help="default: the model's tuned setting")
    p.add_argument("--top-k", type=int, default=None, help="default: the model's tuned setting")
    p.add_argument("--top-p", type=float, default=None, help="default: the model's tuned setting")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="a training output directory of --model's trainer (default: the bundled files)")
    p.add_argument("--judge", type=Path, default=None, help="judge.safetensors (default: the bundled judge)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def sampling_from_args(args, base: SamplingConfig) -> SamplingConfig:
    overrides = {k: getattr(args, k) for k in ("cfg_scale", "temperature", "top_k", "top_p")
                 if getattr(args, k) is not None}
    return SamplingConfig(**{**asdict(base), **overrides})


def run(args) -> int:
    from lineray.models.bundles import bundle_module
    bundle = bundle_module(args.bundle)
    if args.threads:
        torch.set_num_threads(args.threads)
    for b in [*args.budgets, *(args.linear_budgets or [])]:
        try:
            if not 0 < Fraction(b) < 1:
                raise ValueError
        except (ValueError, ZeroDivisionError):
            raise SystemExit(f"lineray eval: budget {b!r} must be a fraction between 0 and 1, like 1/4")
    base = bundle.model_sampling((args.model_dir or bundle.ASSET_DIR) / bundle.GPT_JSON)
    sampling = sampling_from_args(args, base)
    evaluate(args.model_dir, bundle=args.bundle, judge=args.judge, spread=not args.no_spread, samples=args.samples, batch_size=args.batch_size,
             sampling=sampling, policies=args.policies, budgets=args.budgets, linear_budgets=args.linear_budgets, linear_decays=args.linear_decays, seed=args.seed,
             heldout=args.heldout, out_dir=args.out, progress=not args.no_progress)
    print((args.out / "quality.md").read_text())
    print(f"wrote {args.out}/quality.csv, quality_vs_budget.png, samples_<policy>.png")
    return 0
