"""Quality metrics on hand-built cases, and `lineray eval` end to end on the bundled model (small)."""
import argparse
import csv
import json
import math

import pytest
import torch

from lineray.quality import add_arguments, cache_rows, evaluate, markdown_table, metrics
from lineray.quality.runner import finished_row


def test_kl_of_identical_distributions_is_zero():
    logits = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    assert metrics.kl_divergence(logits, logits).abs().max() < 1e-12
    # A constant shift of the logits is the same distribution.
    assert metrics.kl_divergence(logits, logits + 3.0).abs().max() < 1e-9


def test_kl_known_value_and_direction():
    p = torch.tensor([0.5, 0.5], dtype=torch.float64).log()
    q = torch.tensor([0.9, 0.1], dtype=torch.float64).log()
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(P || Q) = 0.5108
    assert metrics.kl_divergence(p, q).item() == pytest.approx(expected, abs=1e-9)
    reverse = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(Q || P) = 0.3681
    assert metrics.kl_divergence(q, p).item() == pytest.approx(reverse, abs=1e-9)


def test_top1_and_token_agreement_and_accuracy():
    ref = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    other = torch.tensor([[0.0, 3.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.5, 0.0]])
    assert metrics.top1_agreement(ref, other) == pytest.approx(0.5)
    assert metrics.token_agreement(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 0, 4]])) == 0.75
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.token_agreement(torch.zeros(2, 3), torch.zeros(3, 2))
    assert metrics.class_accuracy(torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 1, 9, 3, 9])) == pytest.approx(0.6)


def test_nll_of_uniform_and_of_certain_predictions():
    tokens = torch.tensor([[3, 1, 4, 1]])
    assert metrics.token_nll(torch.zeros(1, 4, 16), tokens) == pytest.approx(math.log(16), abs=1e-6)
    sure = torch.full((1, 4, 16), -1e4).scatter(-1, tokens[..., None], 0.0)
    assert metrics.token_nll(sure, tokens) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_hand_cases():
    a = torch.randn(400, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # Same covariance, mean moved by (1, 2, 0, ...): FD = |shift|^2 = 5.
    shift = torch.tensor([1.0, 2.0, 0, 0, 0, 0], dtype=torch.float64)
    assert metrics.frechet_distance(a, a + shift) == pytest.approx(5.0, abs=1e-8)
    # 1-D, b = 2a: FD = (sigma_a - sigma_b)^2 + (mu_a - mu_b)^2 = var(a) + mean(a)^2.
    x = a[:, :1]
    expected = float(x.var(unbiased=True)) + float(x.mean()) ** 2
    assert metrics.frechet_distance(x, 2 * x) == pytest.approx(expected, rel=1e-8)
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        metrics.frechet_distance(a[:1], a)


def test_cache_rows_cover_every_policy_and_budget():
    rows = cache_rows()
    assert rows[0][1].policy == "full"
    assert len(rows) == 1 + 3 * 4
    lines = {(s.policy, b): s.plan(16, 16, 256).budget_lines for b, s in rows[1:]}
    assert lines[("linear", "1/2")] == 8 and lines[("linear", "1/4")] == 4
    assert lines[("window", "1/6")] == 3 and lines[("heavy_hitter", "1/8")] == 2
    with_decay = cache_rows(budgets=["1/4", "1/8"], linear_decays=[0.5], linear_budgets=["1/2", "1/4", "1/8"])
    assert [(b, s.policy) for b, s in with_decay[1:4]] == [("1/2", "linear"), ("1/4", "linear"), ("1/8", "linear")]
    assert [b for b, s in with_decay if s.policy == "window"] == ["1/4", "1/8"]
    assert [(b, s.label) for b, s in with_decay[-2:]] == [("1/4", "linear decay 0.5"), ("1/8", "linear decay 0.5")]
    assert with_decay[-1][1].score_decay == 0.5 and with_decay[1][1].label == "linear"


@pytest.mark.timeout(300)
def test_eval_end_to_end_on_bundled_model(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--samples", "20", "--policies", "linear", "window",
                              "--budgets", "1/4", "--no-progress"])
    assert args.bundle == "digits"  # the default model
    rows = evaluate(bundle=args.bundle, samples=args.samples, policies=args.policies, budgets=args.budgets,
                    heldout=60, out_dir=args.out, progress=False)
    full, other_seeds, linear, window = rows
    assert [r.policy for r in rows] == ["full", "full", "linear", "window"]
    assert [r.seeds for r in rows] == ["A", "B", "A", "A"]
    assert full.kl_vs_full == 0 and full.top1_vs_full == 1 and full.token_agreement == 1
    # The second seed set: same teacher-forced numbers, other samples (the run-to-run spread).
    assert other_seeds.heldout_nll == full.heldout_nll and other_seeds.kl_vs_full == 0
    assert math.isnan(other_seeds.token_agreement) and other_seeds.frechet_distance != full.frechet_distance
    assert all(math.isnan(r.copy_iou) for r in rows)  # digits have no copy structure
    assert linear.kv_lines == window.kv_lines == 4
    for r in rows:
        assert 0.0 < r.heldout_nll < math.log(16)  # a trained model beats uniform guessing
        assert 0.0 <= r.judge_accuracy <= 1.0 and r.frechet_distance >= 0 and r.images_per_s > 0
    assert linear.kl_vs_full > 0  # evicting 3/4 of the lines changes the predictions somewhat
    assert full.judge_accuracy >= 0.6  # the bundled model draws recognisable digits
    for name in ("quality.md", "quality.csv", "quality_vs_budget.png", "samples_linear.png", "samples_window.png"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "quality.csv") as f:
        assert [r["policy"] for r in csv.DictReader(f)] == ["full", "full", "linear", "window"]
    table = (tmp_path / "quality.md").read_text()
    assert "| full | 1 | 16 | A |" in table and "| full | 1 | 16 | B |" in table
    assert "copy IoU" not in table and "model digits" in table
    # Finished rows are kept: a rerun with the same settings loads them (a marker planted in one
    # kept row comes back) instead of sampling again; other settings do not reuse them.
    kept = sorted(p.name for p in (tmp_path / "rows").iterdir())
    assert kept == ["full_1_A.pt", "full_1_B.pt", "linear_1-4_A.pt", "window_1-4_A.pt"]
    saved = torch.load(tmp_path / "rows" / "window_1-4_A.pt", weights_only=True)
    saved["row"]["images_per_s"] = -1.0
    torch.save(saved, tmp_path / "rows" / "window_1-4_A.pt")
    again = evaluate(bundle=args.bundle, samples=args.samples, policies=args.policies, budgets=args.budgets,
                     heldout=60, out_dir=args.out, progress=False)
    assert again[-1].images_per_s == -1.0 and markdown_table(again[:3]) == markdown_table(rows[:3])
    assert finished_row(tmp_path / "rows" / "full_1_A.pt", {**saved["settings"], "seed": 1}) is None


@pytest.mark.timeout(300)
def test_eval_runs_on_a_tiny_shapes_model(tmp_path):
    """`lineray eval --model shapes-24 --model-dir DIR` end to end, on a 2-step model and judge (24x24 tokens)."""
    from lineray.kernels.sampling import SamplingConfig
    from lineray.models.patch_tokenizer import PatchTokenizer
    from lineray.models.shapes.data import make_scenes
    from lineray.models.shapes.judge import train_judge
    from lineray.models.shapes.train import TrainConfig, train
    PatchTokenizer.fit(make_scenes(40, seed=3).images, 16, patch=4, max_patches=10_000).save(tmp_path / "tok.safetensors")
    train(TrainConfig(out=tmp_path / "gpt", steps=2, batch_size=2, warmup_steps=1, eval_every=2, heldout=4,
                      autocast="off", threads=1, codebook_size=16, model_overrides={"n_layer": 1, "dim": 32, "n_head": 2},
                      tokenizer=tmp_path / "tok.safetensors"))
    train_judge(tmp_path / "judge", steps=2, batch_size=8)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "shapes-24", "--model-dir", str(tmp_path / "gpt")])
    rows = evaluate(args.model_dir, bundle=args.bundle, judge=tmp_path / "judge" / "judge.safetensors", samples=4,
                    batch_size=4, sampling=SamplingConfig(cfg_scale=2.0), policies=["linear", "window"],
                    budgets=["1/6"], heldout=4, out_dir=tmp_path / "eval", progress=False)
    assert [(r.policy, r.kv_lines, r.seeds) for r in rows] == [("full", 24, "A"), ("full", 24, "B"),
                                                               ("linear", 4, "A"), ("window", 4, "A")]
    for r in rows:
        assert 0.0 <= r.copy_iou <= 1.0 and r.heldout_nll > 0 and r.frechet_distance >= 0
    assert rows[0].kl_vs_full == 0 and rows[2].kl_vs_full > 0
    table = (tmp_path / "eval" / "quality.md").read_text()
    assert "copy IoU" in table and "model shapes-24" in table and "| window | 1/6 | 4 | A |" in table
    for name in ("quality_vs_budget.png", "samples_full.png", "samples_linear.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0

    # Sampling tuning writes its choice into gpt.json; the kept-token census runs on the same model.
    from lineray.quality import keeps, tune
    judge_file = str(tmp_path / "judge" / "judge.safetensors")
    assert tune.main(["--model", "shapes-24", "--model-dir", str(tmp_path / "gpt"), "--judge", judge_file,
                      "--samples", "2", "--shipped", "--write"]) == 0
    record = json.loads((tmp_path / "gpt" / "gpt.json").read_text())
    assert record["sampling_check"]["samples"] == 2 and 0 <= record["sampling_check"]["accuracy"] <= 1
    assert "sampling" not in record  # a check does not change the settings
    assert keeps.main(["--model-dir", str(tmp_path / "gpt"), "--samples", "2", "--budgets", "1/6",
                       "--policies", "linear", "window", "--out", str(tmp_path / "keeps")]) == 0
    assert (tmp_path / "keeps" / "keeps_1-6.png").stat().st_size > 0


def test_kept_token_census_counts_exactly_what_the_cache_holds(make_tiny):
    """window keeps the last B lines: with B = 16 lines the line 16 back is still there after every line end
    (recall 1), with B = 15 it never is (recall 0); LineAR keeps some of it."""
    from lineray.cache import CacheSpec
    from lineray.kernels.sampling import SamplingConfig
    from lineray.quality.keeps import held_masks, needed_ink_recall
    model = make_tiny(grid=24)
    labels, seeds, ends = torch.tensor([1, 2, 3]), [0, 1, 2], [15, 17, 20]
    sampling = SamplingConfig(cfg_scale=2.0)
    for lines, expected in ((16, 1.0), (15, 0.0)):
        tokens, held = held_masks(model, CacheSpec("window", lines=lines), labels, seeds, sampling, ends)
        assert held.shape == (3, model.config.n_layer, 3, 576)
        assert torch.all(held.sum(-1) == lines * 24)  # every head of every layer holds B lines of cells
        recall = needed_ink_recall(tokens, held, ends, 24)
        assert torch.all(recall == expected), recall
    tokens, held = held_masks(model, CacheSpec("linear", lines=4), labels, seeds, sampling, ends)
    for k, e in enumerate(ends):
        assert torch.all(held[k, :, :, e * 24:(e + 1) * 24] == 1)  # R = 1: the newest line is always held
    recall = needed_ink_recall(tokens, held, ends, 24)
    assert torch.all((recall >= 0) & (recall <= 1))
    assert torch.all(held.sum(-1) == 4 * 24)
