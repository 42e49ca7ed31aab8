"""Train the bundled digits GPT: tokenizer fit, then next-token training with label dropout for CFG.

    python -m lineray.models.digits.train --out DIR --minutes 25 --seed 0

writes DIR/tokenizer.safetensors, DIR/gpt.safetensors and DIR/gpt.json. The run is
deterministic given --seed and --steps. With --minutes and no --steps, the step
count is set from the speed of the first steps (before the learning-rate warmup
ends, so the run equals `--steps N` with the N it prints and records).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lineray.models.config import GPTConfig, preset
from lineray.models.digits import GPT_FILE, GPT_JSON, TOKENIZER_FILE
from lineray.models.digits.data import Augment, AugmentedBatches, load_digits_split, render
from lineray.models.digits.tokenizer import PatchTokenizer
from lineray.models.training import heldout_nll, learning_rate, make_optimizer, save_model, use_bf16
from lineray.models.transformer import Transformer


@dataclass
class TrainConfig:
    out: Path
    seed: int = 0
    steps: int | None = None  # None: chosen from --minutes after timing the first steps
    minutes: float = 25.0
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * this
    warmup_steps: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    label_dropout: float = 0.1  # labels replaced by the null class, so CFG has an unconditional model
    codebook_size: int = 16
    preset: str = "GPT-digits"
    model_overrides: dict = field(default_factory=dict)  # e.g. {"n_layer": 1, "dim": 32} for tests
    autocast: str = "auto"  # "bf16", "off", or "auto" (bf16 only where the CPU has native bf16)
    threads: int = 1
    eval_every: int = 100
    log_every: int = 10
    tokenizer: Path | None = None  # reuse a fitted tokenizer instead of fitting one

    def model_config(self) -> GPTConfig:
        return preset(self.preset, vocab_size=self.codebook_size, num_classes=10, grid_size=16,
                      **self.model_overrides)


CALIBRATION_STEPS = (3, 13)  # steps timed to pick the step count from --minutes


def fit_tokenizer(cfg: TrainConfig, train_images8: torch.Tensor, held_images: torch.Tensor) -> tuple[PatchTokenizer, dict]:
    if cfg.tokenizer is not None:
        tok = PatchTokenizer.load(cfg.tokenizer)
    else:
        gen = torch.Generator().manual_seed(cfg.seed)
        images = torch.cat([render(train_images8, Augment(), gen) for _ in range(8)])
        tok = PatchTokenizer.fit(images, cfg.codebook_size, seed=cfg.seed)
    if tok.codebook_size != cfg.codebook_size:
        raise ValueError(f"tokenizer {cfg.tokenizer} has {tok.codebook_size} codes, --codebook-size is {cfg.codebook_size}")
    tok.save(cfg.out / TOKENIZER_FILE)
    recon = tok.reconstruction_error(held_images)
    print(f"tokenizer: {tok.codebook_size} codes over 2x2 patches; held-out reconstruction "
          f"MSE {recon['mse']:.4f}, PSNR {recon['psnr_db']:.1f} dB", flush=True)
    return tok, recon


def train(cfg: TrainConfig) -> dict:
    t_start = time.time()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    bf16 = use_bf16(cfg.autocast)
    train_set, held = load_digits_split()
    held_images = render(held.images)
    tok, recon = fit_tokenizer(cfg, train_set.images, held_images)
    held_tokens = tok.encode(held_images).flatten(1)

    model_cfg = cfg.model_config()
    model = Transformer(model_cfg).init_weights(generator=torch.Generator().manual_seed(cfg.seed)).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(model, cfg)
    batches = AugmentedBatches(train_set, cfg.batch_size, seed=cfg.seed + 1)
    drop_gen = torch.Generator().manual_seed(cfg.seed + 2)
    print(f"model: {model_cfg.n_layer} layers, dim {model_cfg.dim}, {model_cfg.n_head} heads, vocab "
          f"{model_cfg.vocab_size}, {n_params / 1e6:.2f}M parameters; batch {cfg.batch_size}, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, {cfg.threads} thread(s)", flush=True)

    total = cfg.steps
    calib_t0 = None
    t_loop = time.time()
    history = []
    info: dict = {}
    step = 0
    while total is None or step < total:
        if total is None and step == CALIBRATION_STEPS[0]:
            calib_t0 = time.time()
        if total is None and step == CALIBRATION_STEPS[1]:
            per_step = (time.time() - calib_t0) / (CALIBRATION_STEPS[1] - CALIBRATION_STEPS[0])
            remaining = cfg.minutes * 60 - (time.time() - t_start)
            # ~8% of the time goes to held-out evaluations and checkpoints.
            total = max(step + 1, step + int(0.92 * remaining / per_step))
            print(f"{per_step:.2f} s/step: {total} steps fit in {cfg.minutes:g} min "
                  f"(reproduce with --steps {total})", flush=True)
        lr = learning_rate(cfg, step, total or 10**9)
        for group in opt.param_groups:
            group["lr"] = lr
        images, labels = next(batches)
        tokens = tok.encode(images).flatten(1)
        drop = torch.rand(len(labels), generator=drop_gen) < cfg.label_dropout
        labels = labels.masked_fill(drop, model_cfg.num_classes)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(labels, tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1

        if step % cfg.log_every == 0 or step == total:
            elapsed = time.time() - t_loop
            rate = step / elapsed
            eta = f"ETA {(total - step) / rate / 60:.1f} min" if total else "timing"
            print(f"step {step}/{total or '?'} loss {loss.item():.4f} lr {lr:.2e} "
                  f"{rate:.2f} steps/s {eta}", flush=True)
        if step == total or step % cfg.eval_every == 0:
            nll = heldout_nll(model, held.labels, held_tokens, bf16)
            history.append((step, round(nll, 4)))
            info = {"seed": cfg.seed, "steps": step, "batch_size": cfg.batch_size, "lr": cfg.lr,
                    "warmup_steps": cfg.warmup_steps, "label_dropout": cfg.label_dropout,
                    "autocast": "bf16" if bf16 else "off", "threads": cfg.threads, "parameters": n_params,
                    "heldout_nll": round(nll, 4), "heldout_sequences": len(held),
                    "tokenizer_mse": round(recon["mse"], 5), "tokenizer_psnr_db": round(recon["psnr_db"], 2),
                    "train_seconds": round(time.time() - t_start, 1), "heldout_history": history}
            save_model(model, cfg.out, GPT_FILE, GPT_JSON, info)
            print(f"step {step}: held-out NLL {nll:.4f} nats/token; saved {cfg.out / GPT_FILE}", flush=True)
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train the digits GPT (and its tokenizer).")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--minutes", type=float, default=25.0, help="time budget, used when --steps is not given")
    p.add_argument("--steps", type=int, default=None, help="exact number of optimiser steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--codebook-size", type=int, default=16)
    p.add_argument("--tokenizer", type=Path, default=None, help="reuse this tokenizer.safetensors")
    p.add_argument("--autocast", choices=["auto", "bf16", "off"], default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--layers", type=int, default=None, help="override the preset's n_layer")
    p.add_argument("--dim", type=int, default=None, help="override the preset's width")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in (("n_layer", args.layers), ("dim", args.dim)) if v is not None}
    cfg = TrainConfig(out=args.out, seed=args.seed, steps=args.steps, minutes=args.minutes,
                      batch_size=args.batch_size, lr=args.lr, codebook_size=args.codebook_size,
                      tokenizer=args.tokenizer, autocast=args.autocast, threads=args.threads,
                      eval_every=args.eval_every, model_overrides=overrides)
    info = train(cfg)
    print(json.dumps({k: v for k, v in info.items() if k != "heldout_history"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
