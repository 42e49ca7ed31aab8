"""benchmarks/gpu_smoke.sh on a machine without a GPU says so and succeeds; its benchmark case runs (on CPU)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_smoke_without_a_gpu_says_it_needs_one_and_exits_0():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)  # no GPU, even on a GPU machine
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_smoke.sh"), "--quick"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "gpu_smoke: needs a CUDA GPU (torch.cuda.is_available() is False here); nothing to do."


def test_a_gpu_smoke_case_runs_and_reports_its_columns_on_cpu():
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "benchmarks" / "gpu_smoke.py")
    gpu_smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_smoke)
    row = gpu_smoke.run_case(dict(preset="GPT-tiny", policy="linear:1/6", batch=1, mode="default", grid=8,
                                  dtype="float32", device="cpu"))
    assert set(row) == {"ms_per_step", "images_per_s", "kv_gib", "peak_gib", "host_idle"}
    assert row["ms_per_step"] > 0 and row["images_per_s"] > 0 and 0 < row["kv_gib"] < 1e-3
    assert row["host_idle"] is None  # measured on CUDA only
