"""batch_size: a number or auto (the largest batch that fits memory), its settings and how a job resolves it."""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from pipeline_helpers import tiny_job

from lineray.models.sizing import largest_batch, memory_plan
from lineray.pipelines import JobConfig, JobConfigError, StageResources, batching
from lineray.pipelines.batching import GiB, resolve_batch_size

REPO = Path(__file__).resolve().parent.parent
GPT_B = dict(preset="GPT-B", checkpoint="random", decoder="random", grid_size=24)  # random weights: nothing is loaded
LINEAR = {"policy": "linear", "rho": "1/6"}


def b_job(**kw) -> JobConfig:
    """GPT-B 24x24 with CFG (cfg_scale 4) in fp32, 1 replica, batch_size auto unless kw says otherwise."""
    return JobConfig.from_dict(dict(source="bundled", output="out", model=GPT_B, sampling={"cfg_scale": 4.0}) | kw)


def fit(job: JobConfig, budget_bytes: int) -> int:
    return largest_batch(job.model.config(), job.cache, budget_bytes, torch.float32, cfg_rows=True, tp=job.tp)


def test_a_number_is_used_as_is():
    choice = resolve_batch_size(b_job(batch_size=7))
    assert (choice.size, choice.reason) == (7, "set in the job")
    assert choice.line() == "batch size 7 per replica (set in the job)"


def test_auto_with_a_budget_is_the_largest_batch_that_fits_capped():
    job = b_job(cache=LINEAR, memory_budget_gib=3, max_batch_size=10_000)
    n = fit(job, 3 * GiB)
    assert 100 < n < 10_000  # GPT-B fp32 weights ~0.8 GiB, ~18 MiB per image with CFG
    choice = resolve_batch_size(job)
    assert choice.size == n and "capped" not in choice.reason
    assert choice.reason.startswith(f"auto: {n} fit memory_budget_gib 3 with linear 4/24 lines")
    capped = resolve_batch_size(job.replace(max_batch_size=32))
    assert capped.size == 32 and capped.reason.endswith(f"{n} fit memory_budget_gib 3 with linear 4/24 lines "
                                                        "(96 tokens); capped by max_batch_size")


def test_without_cfg_an_image_needs_half_the_cache_rows():
    cfg_job = b_job(memory_budget_gib=3, max_batch_size=10_000)
    plain = resolve_batch_size(cfg_job.replace(sampling=replace(cfg_job.sampling, cfg_scale=1.0))).size
    assert plain > 1.5 * resolve_batch_size(cfg_job).size


def test_a_budget_below_the_weights_is_an_error_naming_both():
    job = b_job(memory_budget_gib=0.3)
    weights = memory_plan(job.model.config(), job.cache, torch.float32).weights_bytes
    assert weights > 0.3 * GiB
    with pytest.raises(JobConfigError, match=rf"not even 1 image fits memory_budget_gib 0.3: the weights alone "
                                             rf"take {weights / GiB:.1f} GiB"):
        resolve_batch_size(job)
    # tp=2 halves the weights of a rank: then it fits.
    assert resolve_batch_size(job.replace(tp=2)).size >= 1


def test_a_number_over_the_budget_is_an_error_naming_the_largest_that_fits():
    n = fit(b_job(), 2 * GiB)
    with pytest.raises(JobConfigError, match=rf"batch_size {n + 1} does not fit memory_budget_gib 2 with cache "
                                             rf"full: the largest batch that fits is {n}$"):
        resolve_batch_size(b_job(batch_size=n + 1, memory_budget_gib=2))
    ok = resolve_batch_size(b_job(batch_size=n, memory_budget_gib=2))
    assert ok.size == n and ok.reason == f"set in the job; up to {n} fit memory_budget_gib 2"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the driver sees a GPU here")
def test_auto_on_cuda_needs_a_budget_when_the_driver_sees_no_gpu():
    with pytest.raises(JobConfigError, match="batch_size auto on cuda needs memory_budget_gib.*cannot see a GPU"):
        resolve_batch_size(b_job(device="cuda"))
    with_budget = b_job(device="cuda", memory_budget_gib=4)
    assert resolve_batch_size(with_budget).size == fit(with_budget, 4 * GiB)
    assert resolve_batch_size(b_job(device="cuda", batch_size=8)).size == 8


def test_auto_on_cuda_uses_most_of_the_gpu_the_driver_sees(monkeypatch):
    from types import SimpleNamespace
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = SimpleNamespace(name="GPU", total_memory=10 * GiB)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: gpu)
    job = b_job(device="cuda", model=GPT_B | {"dtype": "bfloat16"}, max_batch_size=10_000)
    choice = resolve_batch_size(job)
    assert choice.size == largest_batch(job.model.config(), job.cache, 9 * GiB, torch.bfloat16)
    assert "fit 9.0 GiB (0.9 of the GPU's 10.0 GiB)" in choice.reason
    half = job.replace(resources=StageResources(generate_gpus=0.5))  # two replicas per GPU
    assert resolve_batch_size(half).size == largest_batch(job.model.config(), job.cache, int(4.5 * GiB), torch.bfloat16)


def test_auto_on_cpu_shares_the_nodes_available_memory_among_ranks(monkeypatch):
    monkeypatch.setattr(batching, "available_memory", lambda: 24 * GiB)
    job = b_job(replicas=3, max_batch_size=10_000)  # 0.5 x 24 GiB / 3 ranks = 4 GiB each
    choice = resolve_batch_size(job)
    assert choice.size == fit(job, 4 * GiB)
    assert "auto: " in choice.reason and "fit 4.0 GiB (0.5 of the node's 24.0 GiB available / 3 ranks)" in choice.reason
    tp = job.replace(replicas=1, tp=2)  # 6 GiB for each of 2 ranks, each with half the weights and heads
    assert resolve_batch_size(tp).size == fit(tp, 6 * GiB) > fit(job, 6 * GiB)
    monkeypatch.setattr(batching, "available_memory", lambda: GiB)
    with pytest.raises(JobConfigError, match="not even 1 image fits 0.2 GiB"):
        resolve_batch_size(job)


def test_available_memory_is_what_this_machine_reports():
    free = batching.available_memory()
    total = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    assert 0 < free <= total


def test_linear_one_sixth_fits_at_least_four_times_the_full_cache():
    """The point of LineAR: GPT-B at 24x24 tokens under one budget."""
    full = resolve_batch_size(b_job(memory_budget_gib=8, max_batch_size=100_000)).size
    linear = resolve_batch_size(b_job(cache=LINEAR, memory_budget_gib=8, max_batch_size=100_000)).size
    assert full > 0 and linear >= 4 * full


def test_batch_settings_parse_and_name_bad_values():
    base = tiny_job("bundled", "out")
    del base["max_batch_size"]
    job = JobConfig.from_dict(base)
    assert (job.batch_size, job.memory_budget_gib, job.max_batch_size, job.batch_cap) == ("auto", None, None, 64)
    assert job.replace(device="cuda").batch_cap > 64  # on a GPU, memory decides
    assert JobConfig.from_dict(base | {"batch_size": 12, "memory_budget_gib": 1.5}).batch_size == 12
    assert JobConfig.from_dict(base | {"memory_budget_gib": 2}).memory_budget_gib == 2
    for key, value, message in [("batch_size", "lots", "batch_size must be a whole number or 'auto', got 'lots'"),
                                ("batch_size", 0, "batch_size must be a whole number >= 1 or 'auto', got 0"),
                                ("batch_size", 2.5, "batch_size must be"), ("batch_size", True, "batch_size must be"),
                                ("memory_budget_gib", -1, "memory_budget_gib must be > 0, got -1"),
                                ("memory_budget_gib", "12GiB", "memory_budget_gib must be"),
                                ("memory_budget_gib", float("nan"), "memory_budget_gib must be"),
                                ("max_batch_size", 0, "max_batch_size must be a whole number >= 1")]:
        with pytest.raises(JobConfigError, match=message):
            JobConfig.from_dict(base | {key: value})
    # The batch does not decide the images (each has its own seed): resuming with another batch is fine.
    assert job.replace(batch_size=5, memory_budget_gib=3).fingerprint() == job.fingerprint()
    with pytest.raises(ValueError, match="not resolved"):
        job.read_ahead_images
    assert job.replace(batch_size=4).read_ahead_images == 2 * 4 + 8 * 4


def test_cli_flags(tmp_path):
    from lineray import cli

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_job("bundled", str(tmp_path / "out"), batch_size=8)))
    parser = argparse.ArgumentParser()
    cli.add_generate_arguments(parser)
    job = cli.job_from_args(parser.parse_args([str(path), "--batch-size", "auto", "--memory-budget-gib", "1.5",
                                               "--max-batch-size", "32"]))
    assert (job.batch_size, job.memory_budget_gib, job.max_batch_size) == ("auto", 1.5, 32)
    assert cli.job_from_args(parser.parse_args([str(path), "--batch-size", "16"])).batch_size == 16
    with pytest.raises(JobConfigError, match="batch_size must be a whole number or 'auto', got 'lots'"):
        cli.job_from_args(parser.parse_args([str(path), "--batch-size", "lots"]))


def test_shipped_job_configs_resolve(monkeypatch):
    monkeypatch.setattr(batching, "available_memory", lambda: 16 * GiB)
    s3 = JobConfig.from_yaml(REPO / "configs" / "jobs" / "s3_example.yaml")  # cuda, with a budget: no GPU needed
    assert resolve_batch_size(s3).size == s3.max_batch_size
    digits = JobConfig.from_yaml(REPO / "configs" / "jobs" / "digits.yaml")
    assert digits.batch_size == "auto" and resolve_batch_size(digits).size == digits.max_batch_size == 16
