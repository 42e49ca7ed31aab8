"""Decode attention backends: the Triton kernel against the torch reference, and backend dispatch.

No GPU here: the kernel runs under Triton's interpreter on CPU tensors. Triton 3.9 reads
TRITON_INTERPRET when `@triton.jit` decorates the kernel (import time), so the comparison
runs in a subprocess with the variable set (this file run as a script) and nothing leaks
into the other tests.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lineray.kernels import attention
from lineray.kernels.attention import attend, attend_sdpa, attend_torch, attention_backend

ROOT = Path(__file__).resolve().parents[1]

# name: (R, H, n, D, dtype, with bias, with scores, block_n, splits). Small: the interpreter is slow.
# bias "shared": one [1, 1, 1, n] mask for every row (the static step's slot mask).
# VISIBLE: cases run like the static step: slots from `visible` on are masked and hold NaN; the
# kernel is told the count and must not read them (the torch reference gets clean values).
CASES = {
    "n1_scores": (2, 2, 1, 16, "float32", False, True, 16, 1),
    "ragged_bias_scores": (2, 3, 37, 24, "float32", True, True, 16, 1),  # n % block != 0, D not a power of 2
    "exact_blocks_bias": (1, 2, 32, 16, "float32", True, False, 16, 1),
    "one_partial_block": (3, 2, 50, 32, "float32", False, False, 64, 1),
    "bf16_bias_scores": (2, 2, 37, 32, "bfloat16", True, True, 16, 1),
    "fp16_scores": (2, 2, 20, 16, "float16", False, True, 16, 1),
    # split over the sequence: a whole masked first chunk, a ragged last one, more splits than blocks
    "split3_bias_scores": (2, 3, 37, 24, "float32", True, True, 16, 3),
    "split2_no_scores": (1, 1, 70, 16, "float32", False, False, 16, 2),
    "split8_shared_bias_scores": (2, 2, 40, 16, "bfloat16", "shared", True, 8, 8),
    "static_step_visible": (2, 2, 40, 16, "float32", "shared", True, 8, 3),
}
VISIBLE = {"static_step_visible": 30}  # chunks of 16: masked, partly visible, not read
# (output vs same-dtype torch path, output vs fp32 reference, scores vs torch path)
# Low precision: the torch path also rounds logits and probs to the input dtype. The interpreter
# (3.9) casts fp32 -> bf16 by truncation, not round-to-nearest as on a GPU: up to 2^-7 relative.
TOL = {"float32": (1e-5, 1e-5, 1e-5), "float16": (2e-3, 1e-3, 1e-3), "bfloat16": (1.6e-2, 8e-3, 4e-3)}


def _make_case(R, H, n, D, dtype, with_bias, with_scores, seed=0):
    """Cache-like views: slices of bigger [layers, R, H, capacity, D] tensors, so nothing is contiguous."""
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    cap = n + 7
    kc = torch.randn(2, R, H, cap, D, generator=g).to(dt)
    vc = torch.randn(2, R, H, cap, D, generator=g).to(dt)
    qkv = (torch.randn(R, H, 1, 3 * D, generator=g) * 2).to(dt)  # q as a slice of a fused projection
    bias = scores = None
    if with_bias:
        full = torch.zeros(R, 1, 1, cap)
        full[0, ..., : min(18, n - 1)] = float("-inf")  # a whole first block masked, never the whole row
        full[-1, ..., 1:n:3] = float("-inf")
        bias = full[..., :n] if with_bias != "shared" else full[:1, ..., :n]
    if with_scores:
        scores = torch.rand(2, R, H, cap, generator=g)[1, :, :, :n]  # pre-existing values: probs are ADDED
    return qkv[..., :D], kc[1, :, :, :n], vc[1, :, :, :n], bias, scores


def _err(out, ref) -> float:
    """Max error relative to max(1, |ref|): low-precision outputs round by a relative step."""
    return ((out.float() - ref.float()).abs() / ref.float().abs().clamp(min=1)).max().item()


def _run_interpreter_cases() -> dict:
    """Runs in the subprocess (TRITON_INTERPRET=1): max errors of the kernel per case."""
    from lineray.kernels.triton_attention import attend_triton

    results = {}
    for name, (R, H, n, D, dtype, with_bias, with_scores, block_n, splits) in CASES.items():
        q, k, v, bias, scores = _make_case(R, H, n, D, dtype, with_bias, with_scores)
        kt, vt, visible = k, v, None
        if name in VISIBLE:
            bias[..., VISIBLE[name]:] = float("-inf")
            kt, vt = k.clone(), v.clone()
            kt[:, :, VISIBLE[name]:] = vt[:, :, VISIBLE[name]:] = float("nan")
            visible = torch.tensor(VISIBLE[name])
        s_ref = None if scores is None else scores.clone()
        s_buf = None if scores is None else scores._base.clone()  # whole buffer: the view's outside must not change
        s_tri = None if scores is None else s_buf[1, :, :, :n]
        out = attend_triton(q, kt, vt, bias, s_tri, block_n=block_n, num_splits=splits, n_visible=visible)
        ref = attend_torch(q, k, v, bias, s_ref)
        ref32 = attend_torch(q.float(), k.float(), v.float(), bias)
        res = {
            "dtype": str(out.dtype).removeprefix("torch."), "shape": list(out.shape),
            "out_err": _err(out, ref),
            "out_err_fp32": _err(out, ref32),
            "finite": bool(torch.isfinite(out).all()),
        }
        if scores is not None:
            res["scores_err"] = (s_tri - s_ref).abs().max().item()
            outside = s_buf.clone()
            outside[1, :, :, :n] = scores._base[1, :, :, :n]
            res["outside_unchanged"] = bool(torch.equal(outside, scores._base))
            res["added"] = (s_tri - scores).sum().item()  # probabilities sum to 1 per (row, head)
        results[name] = res
    return results


@pytest.fixture(scope="module")
def interpreter_results():
    pytest.importorskip("triton", reason="triton not installed: the kernel cannot be checked")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("LINERAY_ATTENTION", None)
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_triton_kernel_matches_torch_path(interpreter_results, name):
    R, H, n, D, dtype, with_bias, with_scores, _, _ = CASES[name]
    res = interpreter_results[name]
    tol_out, tol_fp32, tol_scores = TOL[dtype]
    assert res["dtype"] == dtype and res["shape"] == [R, H, 1, D]
    assert res["finite"]
    assert res["out_err"] <= tol_out, res
    assert res["out_err_fp32"] <= tol_fp32, res
    if with_scores:
        assert res["scores_err"] <= tol_scores, res
        assert res["outside_unchanged"], res
        assert res["added"] == pytest.approx(R * H, rel=1e-4), res


def test_triton_kernel_compiles_for_a_gpu(monkeypatch, tmp_path):
    """The interpreter accepts code the compiler rejects (loop-carried types, casts): lower the
    kernel ahead of time for sm_80 down to a cubin, which needs no GPU."""
    triton = pytest.importorskip("triton", reason="triton not installed")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the kernel was decorated for the interpreter")
    from triton.backends.compiler import GPUTarget
    from lineray.kernels import triton_attention as ta

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    flags = {"HAS_BIAS": True, "HAS_LIMIT": True, "BLOCK_N": 32, "BLOCK_D": 64}
    fp32 = {"bias_ptr", "scores_ptr", "m_ptr", "l_ptr", "acc_ptr"}
    for kernel in (ta._decode_attention_kernel, ta._add_probabilities_kernel):
        sig = {a: "constexpr" if a in flags else "fp32" if a == "scale" else "*i64" if a == "limit_ptr" else
               ("*fp32" if a in fp32 else "*bf16") if a.endswith("_ptr") else "i32"
               for a in kernel.arg_names}
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=flags)
        compiled = triton.compile(src, target=GPUTarget("cuda", 80, 32), options={"enable_fp_fusion": True})
        assert compiled.asm["cubin"]


def test_sdpa_path_matches_torch_path():
    q, k, v, bias, _ = _make_case(2, 3, 37, 24, "float32", True, False)
    torch.testing.assert_close(attend_sdpa(q, k, v, bias), attend_torch(q, k, v, bias), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend_sdpa(q, k, v), attend_torch(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("forced", attention.BACKENDS)
def test_cpu_always_uses_the_torch_path(monkeypatch, forced):
    monkeypatch.setattr(attention, "BACKEND", forced)
    assert attention_backend("cpu", True) == attention_backend(torch.device("cpu"), False) == "torch"
    q, k, v, bias, scores = _make_case(2, 2, 9, 8, "float32", True, True)
    s_ref = scores.clone()
    assert torch.equal(attend(q, k, v, bias, scores), attend_torch(q, k, v, bias, s_ref))
    assert torch.equal(scores, s_ref)


@pytest.mark.parametrize("forced, triton_ok, needs_scores, expected", [
    ("auto", True, True, "triton"), ("auto", True, False, "triton"),
    ("auto", False, True, "torch"), ("auto", False, False, "sdpa"),
    ("torch", True, False, "torch"), ("triton", True, True, "triton"),
    ("sdpa", True, False, "sdpa"), ("sdpa", True, True, "torch"),  # SDPA has no probabilities
])
def test_cuda_dispatch(monkeypatch, forced, triton_ok, needs_scores, expected):
    # torch.device("cuda") needs no GPU; only the choice is tested here.
    monkeypatch.setattr(attention, "BACKEND", forced)
    monkeypatch.setattr(attention, "_triton_attend", lambda: object() if triton_ok else None)
    assert attention_backend("cuda:0", needs_scores) == expected


def test_forcing_triton_without_triton_fails_loudly(monkeypatch):
    monkeypatch.setattr(attention, "BACKEND", "triton")
    monkeypatch.setattr(attention, "_triton_attend", lambda: None)
    with pytest.raises(RuntimeError, match="triton"):
        attention_backend("cuda", False)


def test_env_var_and_import_without_triton():
    """LINERAY_ATTENTION is read at import; the package imports with triton blocked; bad values fail."""
    script = """
import importlib, os, sys
sys.modules["triton"] = None  # any `import triton` now raises ImportError
import lineray, lineray.cache.kv
from lineray.kernels import attention as a
assert a.BACKEND == "sdpa" and a._triton_attend() is None
assert a.attention_backend("cuda", False) == "sdpa" and a.attention_backend("cpu", False) == "torch"
os.environ["LINERAY_ATTENTION"] = "auto"; importlib.reload(a)
assert a.attention_backend("cuda", False) == "sdpa" and a.attention_backend("cuda", True) == "torch"
os.environ["LINERAY_ATTENTION"] = "flash"
try:
    importlib.reload(a)
except ValueError as e:
    print("ok", e)
"""
    env = dict(os.environ, LINERAY_ATTENTION="SDPA", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("ok") and "flash" in proc.stdout


if __name__ == "__main__":  # the interpreter subprocess
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.set_num_threads(1)
    print(json.dumps(_run_interpreter_cases()))
