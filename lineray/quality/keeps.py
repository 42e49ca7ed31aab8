"""Which tokens each cache policy keeps, per layer, where the shapes-24 bottom band needs the top band.

The bottom band copies the top band 16 lines down: drawing line 16 + j needs line j. After the
eviction at the end of line 15 + j, this counts how many of line j's shape ("ink") tokens each
layer still holds (averaged over heads and over the conditional CFG rows), for every policy and
budget; the same seeds in every row. It explains a quality table: a policy that has evicted the
line a layer is about to copy cannot copy it.

    python -m lineray.quality.keeps --model-dir DIR --samples 50 --budgets 1/4 1/6 --out OUT

prints one table per budget (rows: policy; columns: layer) and writes OUT/keeps_<budget>.png, the
fraction of images whose cache holds each grid cell at the end of line 15, one panel per policy
and layer.
"""
from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

import torch

from lineray.cache import CacheSpec
from lineray.kernels.sampling import SamplingConfig
from lineray.models.generate import Condition, generate_tokens

COPY_OFFSET = 16  # lines between a top-band line and its copy (shapes/data.py: BAND / PATCH * 2)
BACKGROUND = 0  # the tokenizer orders codes by brightness: 0 is the empty background patch
POLICIES = ("linear", "window", "heavy_hitter")


def held_masks(model, spec: CacheSpec, labels, seeds, sampling: SamplingConfig, line_ends: list[int]):
    """(tokens [B, N], held [len(line_ends), layers, B, N] bool: cell held by the conditional row, any head
    weighted by the fraction of heads holding it -> float in [0, 1])."""
    cfg = model.config
    grid, n_layers = cfg.grid_size, cfg.n_layer
    b = len(labels)
    held = torch.zeros(len(line_ends), n_layers, b, cfg.image_tokens)
    # on_step(i) runs once token i is sampled, when the cache holds tokens < i: at i = (e + 1) * grid the
    # line e has been written and compressed (a census after the last line would need one more step).
    wanted = {(e + 1) * grid: k for k, e in enumerate(line_ends) if e + 1 < grid}
    state = {}

    def on_step(i):
        k = wanted.get(i)
        if k is None:
            return
        cache = state["cache"]
        for layer in range(n_layers):
            pos = cache.kept_positions(layer)[:b].long()  # conditional rows [B, heads, n]
            onehot = torch.zeros(b, pos.size(1), cfg.image_tokens).scatter_(2, pos.clamp_min(0), (pos >= 0).float())
            held[k, layer] = onehot.mean(1)

    # The cache object exists only inside generate_tokens: build it here and pass it in.
    from lineray.models.generate import condition_rows, new_cache
    x, _ = condition_rows(model, Condition.classes(labels), sampling.uses_cfg)
    state["cache"] = new_cache(model, spec, x.size(0), sampling.uses_cfg)
    gen = generate_tokens(model, Condition.classes(labels), seeds, sampling=sampling, cache_spec=spec,
                          cache=state["cache"], on_step=on_step)
    return gen.tokens, held


def needed_ink_recall(tokens: torch.Tensor, held: torch.Tensor, line_ends: list[int], grid: int) -> torch.Tensor:
    """[len(line_ends), layers]: of the ink tokens in line e + 1 - COPY_OFFSET, the share held after line e."""
    out = torch.full((len(line_ends), held.size(1)), float("nan"))
    for k, e in enumerate(line_ends):
        src = e + 1 - COPY_OFFSET
        if src < 0:
            continue
        cells = slice(src * grid, (src + 1) * grid)
        ink = (tokens[:, cells] != BACKGROUND).float()  # [B, grid]
        if ink.sum() == 0:
            continue
        out[k] = (held[k][:, :, cells] * ink).sum((1, 2)) / ink.sum()
    return out


def main(argv=None) -> int:
    from lineray.quality.runner import load_model
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=None, help="a shapes training output (default: the bundle)")
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--budgets", nargs="+", default=["1/4", "1/6", "1/8"])
    p.add_argument("--linear-decays", nargs="+", type=float, default=[],
                   help="also linear with these score_decay values (the share of a score kept at each line end)")
    p.add_argument("--line-ends", nargs="+", type=int, default=[15, 17, 19, 21],
                   help="report after these lines' evictions (line 15 + j precedes the copy of line j)")
    p.add_argument("--out", type=Path, default=None, help="directory for keeps_<budget>.png")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _, sampling = load_model("shapes-24", args.model_dir)
    grid = model.config.grid_size
    labels = torch.arange(args.samples) % model.config.num_classes
    seeds = [args.seed + i for i in range(args.samples)]
    for budget in args.budgets:
        maps = {}
        print(f"\nbudget {budget}: share of the ink tokens of line e - 15 (the line about to be copied) that "
              f"each layer holds after line e; mean over {args.samples} images and all heads")
        header = "| policy | after line | " + " | ".join(f"layer {i}" for i in range(model.config.n_layer)) + " |"
        print(header + "\n|" + "---|" * (model.config.n_layer + 2))
        rho = float(Fraction(budget))
        specs = [CacheSpec(policy, rho=rho) for policy in args.policies]
        specs += [CacheSpec("linear", rho=rho, score_decay=d) for d in args.linear_decays]
        for spec in specs:
            tokens, held = held_masks(model, spec, labels, seeds, sampling, args.line_ends)
            recall = needed_ink_recall(tokens, held, args.line_ends, grid)
            for k, e in enumerate(args.line_ends):
                print(f"| {spec.label} | {e} | " + " | ".join(f"{v:.2f}" for v in recall[k].tolist()) + " |")
            maps[spec.label] = held[0].mean(1).view(model.config.n_layer, grid, grid)  # after the first line end
        if args.out is not None:
            plot_maps(maps, args.out / f"keeps_{budget.replace('/', '-')}.png",
                      f"shapes-24, budget {budget}: cells held after line {args.line_ends[0]} (share of images x heads)")
    return 0


def plot_maps(maps: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    policies = list(maps)
    layers = next(iter(maps.values())).size(0)
    fig, axes = plt.subplots(len(policies), layers, figsize=(1.9 * layers, 2.0 * len(policies)), squeeze=False)
    for r, policy in enumerate(policies):
        for layer in range(layers):
            ax = axes[r][layer]
            ax.imshow(maps[policy][layer].numpy(), vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"layer {layer}", fontsize=8)
            if layer == 0:
                ax.set_ylabel(policy, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
