"""Train the bundled shapes GPT (24x24 tokens): tokenizer fit, then next-token training with label
dropout for CFG. Checkpoints regularly and resumes where it stopped.

    python -m lineray.models.shapes.train --out DIR --steps 2000

writes DIR/tokenizer.safetensors, DIR/train_state.pt (model + optimiser + step, rewritten every
--checkpoint-minutes and at every held-out evaluation), and DIR/gpt.safetensors + DIR/gpt.json
(the weights to ship; rewritten at every held-out evaluation). Run the same command again after a
kill: it loads DIR/train_state.pt and continues; the result equals an uninterrupted run up to the
floating-point effects of bf16 (each batch and its label dropout are a function of (seed, step)).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lineray.models.config import GPTConfig
from lineray.models.shapes import GPT_FILE, GPT_JSON, PRESET, TOKENIZER_FILE
from lineray.models.shapes.data import NUM_CLASSES, PATCH, SceneBatches, heldout_scenes, make_scenes
from lineray.models.patch_tokenizer import PatchTokenizer
from lineray.models.training import heldout_nll, learning_rate, make_optimizer, save_model, use_bf16
from lineray.models.transformer import Transformer

STATE_FILE = "train_state.pt"


@dataclass
class TrainConfig:
    out: Path
    seed: int = 0
    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * this
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    label_dropout: float = 0.1  # labels replaced by the null class, so CFG has an unconditional model
    codebook_size: int = 64
    model_overrides: dict = field(default_factory=dict)  # e.g. {"n_layer": 1, "dim": 32} for tests
    autocast: str = "auto"  # "bf16", "off", or "auto" (bf16 where the CPU has native bf16)
    threads: int = 2
    eval_every: int = 200
    heldout: int = 200  # held-out scenes in the periodic NLL
    checkpoint_minutes: float = 5.0
    log_every: int = 10
    tokenizer: Path | None = None  # reuse a fitted tokenizer instead of fitting one
    session_minutes: float | None = None  # checkpoint and stop this session after this long (resume later)
    session_steps: int | None = None  # the same, counted in steps (tests)

    def model_config(self) -> GPTConfig:
        return GPTConfig(**{**PRESET, "vocab_size": self.codebook_size, **self.model_overrides})

    def fingerprint(self) -> dict:
        """The settings a resumed run must share with the run it continues (all but `steps`, which may grow)."""
        return {"seed": self.seed, "steps": self.steps, "batch_size": self.batch_size, "lr": self.lr,
                "warmup_steps": self.warmup_steps, "label_dropout": self.label_dropout,
                "model": self.model_config().to_dict()}


def fit_tokenizer(cfg: TrainConfig) -> tuple[PatchTokenizer, dict]:
    path = cfg.out / TOKENIZER_FILE
    if cfg.tokenizer is not None:
        tok = PatchTokenizer.load(cfg.tokenizer)
    elif path.is_file():  # a resumed run keeps the tokenizer its tokens were made with
        tok = PatchTokenizer.load(path)
    else:
        scenes = make_scenes(1000, seed=cfg.seed + 11,
                             labels=torch.randint(NUM_CLASSES, (1000,), generator=torch.Generator().manual_seed(cfg.seed)))
        tok = PatchTokenizer.fit(scenes.images, cfg.codebook_size, seed=cfg.seed, patch=PATCH)
    if tok.codebook_size != cfg.codebook_size or tok.patch != PATCH:
        raise ValueError(f"tokenizer has {tok.codebook_size} codes over {tok.patch}x{tok.patch} patches; "
                         f"this run needs {cfg.codebook_size} over {PATCH}x{PATCH}")
    if not path.is_file() or cfg.tokenizer is not None:
        tok.save(path)
    recon = tok.reconstruction_error(heldout_scenes().images)
    print(f"tokenizer: {tok.codebook_size} codes over {PATCH}x{PATCH} patches; held-out reconstruction "
          f"MSE {recon['mse']:.4f}, PSNR {recon['psnr_db']:.1f} dB", flush=True)
    return tok, recon


def save_state(path: Path, model, opt, step: int, history: list, seconds: float, cfg: TrainConfig) -> None:
    """Atomic checkpoint (tensors and plain values only, so it loads with weights_only=True)."""
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "history": history, "train_seconds": seconds, "fingerprint": json.dumps(cfg.fingerprint())}, tmp)
    os.replace(tmp, path)


def load_state(path: Path, model, opt, cfg: TrainConfig) -> tuple[int, list, float]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    # both as JSON gives them (a config's tuples come back as lists)
    theirs, ours = json.loads(state["fingerprint"]), json.loads(json.dumps(cfg.fingerprint()))
    diff = {k: (theirs.get(k), ours.get(k)) for k in ours if k != "steps" and theirs.get(k) != ours.get(k)}
    if diff:
        raise SystemExit(f"{path} was written by a run with other settings {diff} (checkpoint, this run); "
                         f"use the same options, or another --out to start afresh")
    if theirs["steps"] != cfg.steps:
        # Extending a run (more --steps): the cosine schedule is recomputed over the new total, so the
        # learning rate steps back up (a warm restart). Not bit-equal to a run planned that long.
        print(f"{path}: the run was planned for {theirs['steps']} steps, now {cfg.steps}: the learning-rate "
              f"schedule is recomputed over the new total", flush=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return int(state["step"]), [tuple(h) for h in state["history"]], float(state["train_seconds"])


def dropout_labels(labels: torch.Tensor, p: float, null_class: int, seed: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 7_919 + step)
    return labels.masked_fill(torch.rand(len(labels), generator=gen) < p, null_class)


def train(cfg: TrainConfig) -> dict:
    t_start = time.time()
    torch.set_num_threads(cfg.threads)
    cfg.out.mkdir(parents=True, exist_ok=True)
    bf16 = use_bf16(cfg.autocast)
    tok, recon = fit_tokenizer(cfg)
    held = heldout_scenes(cfg.heldout)
    held_tokens = tok.encode(held.images).flatten(1)

    model_cfg = cfg.model_config()
    model = Transformer(model_cfg).init_weights(generator=torch.Generator().manual_seed(cfg.seed)).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(model, cfg)
    step, history, seconds_before = 0, [], 0.0
    state_path = cfg.out / STATE_FILE
    if state_path.is_file():
        step, history, seconds_before = load_state(state_path, model, opt, cfg)
        print(f"resumed from {state_path} at step {step}/{cfg.steps} "
              f"({seconds_before / 60:.1f} min of training so far)", flush=True)
    print(f"model: {model_cfg.n_layer} layers, dim {model_cfg.dim}, {model_cfg.n_head} heads, vocab "
          f"{model_cfg.vocab_size}, {model_cfg.grid_size}x{model_cfg.grid_size} tokens, {n_params / 1e6:.2f}M "
          f"parameters; batch {cfg.batch_size}, {'bf16 autocast' if bf16 else 'fp32'}, {cfg.threads} thread(s)",
          flush=True)

    batches = SceneBatches(cfg.batch_size, seed=cfg.seed + 1, step=step)
    t_loop, step0 = time.time(), step
    t_saved = time.time()
    losses: list[float] = []
    info: dict = {}

    def elapsed() -> float:
        return seconds_before + time.time() - t_start

    def record(nll: float) -> dict:
        return {"seed": cfg.seed, "steps": step, "total_steps": cfg.steps, "batch_size": cfg.batch_size,
                "lr": cfg.lr, "warmup_steps": cfg.warmup_steps, "label_dropout": cfg.label_dropout,
                "autocast": "bf16" if bf16 else "off", "threads": cfg.threads, "parameters": n_params,
                "heldout_nll": round(nll, 4), "heldout_sequences": len(held),
                "tokenizer_mse": round(recon["mse"], 5), "tokenizer_psnr_db": round(recon["psnr_db"], 2),
                "train_seconds": round(elapsed(), 1), "heldout_history": history}

    while step < cfg.steps:
        lr = learning_rate(cfg, step, cfg.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        images, labels = next(batches)
        tokens = tok.encode(images).flatten(1)
        labels = dropout_labels(labels, cfg.label_dropout, model_cfg.num_classes, cfg.seed, step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(labels, tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        losses.append(loss.item())

        if step % cfg.log_every == 0 or step == cfg.steps:
            per_step = (time.time() - t_loop) / (step - step0)
            print(f"step {step}/{cfg.steps} loss {sum(losses) / len(losses):.4f} lr {lr:.2e} "
                  f"{per_step:.2f} s/step elapsed {elapsed() / 60:.1f} min "
                  f"ETA {(cfg.steps - step) * per_step / 60:.1f} min", flush=True)
            losses.clear()
        evaluate_now = step == cfg.steps or step % cfg.eval_every == 0
        if evaluate_now:
            nll = heldout_nll(model, held.labels, held_tokens, bf16, batch_size=50)
            history.append((step, round(nll, 4)))
            info = record(nll)
            save_model(model, cfg.out, GPT_FILE, GPT_JSON, info)
            print(f"step {step}: held-out NLL {nll:.4f} nats/token; saved {cfg.out / GPT_FILE}", flush=True)
        session_over = ((cfg.session_steps is not None and step - step0 >= cfg.session_steps)
                        or (cfg.session_minutes is not None and time.time() - t_start > cfg.session_minutes * 60))
        if evaluate_now or session_over or time.time() - t_saved > cfg.checkpoint_minutes * 60:
            save_state(state_path, model, opt, step, history, elapsed(), cfg)
            t_saved = time.time()
        if session_over and step < cfg.steps:
            print(f"session over at step {step}/{cfg.steps}: saved {state_path}; run the same command to resume",
                  flush=True)
            return {"steps": step, "stopped": True, "train_seconds": round(elapsed(), 1)}
    if not info:  # resumed a finished run: report what it recorded
        info = json.loads((cfg.out / GPT_JSON).read_text())["training"]
    print(f"training done: {step} steps, total training time {info['train_seconds'] / 60:.1f} min "
          f"(this session {(time.time() - t_start) / 60:.1f} min)", flush=True)
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train the shapes GPT (and its tokenizer); resumes from --out.")
    p.add_argument("--out", type=Path, required=True, help="output directory (also the resume checkpoint)")
    p.add_argument("--steps", type=int, default=TrainConfig.steps,
                   help="total optimiser steps (raise it on a finished run's --out to train on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps)
    p.add_argument("--codebook-size", type=int, default=TrainConfig.codebook_size)
    p.add_argument("--tokenizer", type=Path, default=None, help="reuse this tokenizer.safetensors")
    p.add_argument("--autocast", choices=["auto", "bf16", "off"], default="auto")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the machine is shared)")
    p.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    p.add_argument("--checkpoint-minutes", type=float, default=TrainConfig.checkpoint_minutes,
                   help="rewrite DIR/train_state.pt at least this often")
    p.add_argument("--session-minutes", type=float, default=None,
                   help="checkpoint and exit after this long (a later run of the same command resumes)")
    p.add_argument("--layers", type=int, default=None, help="override the preset's n_layer")
    p.add_argument("--dim", type=int, default=None, help="override the preset's width")
    p.add_argument("--heads", type=int, default=None, help="override the preset's n_head")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in (("n_layer", args.layers), ("dim", args.dim), ("n_head", args.heads))
                 if v is not None}
    cfg = TrainConfig(out=args.out, seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      warmup_steps=args.warmup_steps, codebook_size=args.codebook_size, tokenizer=args.tokenizer,
                      autocast=args.autocast, threads=args.threads, eval_every=args.eval_every,
                      checkpoint_minutes=args.checkpoint_minutes, session_minutes=args.session_minutes,
                      model_overrides=overrides)
    info = train(cfg)
    print(json.dumps({k: v for k, v in info.items() if k != "heldout_history"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
