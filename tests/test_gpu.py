"""GPU-only checks, skipped without CUDA; `bash benchmarks/gpu_smoke.sh` runs them on a GPU node.

What the CPU suite cannot show: the model on a GPU samples the CPU's tokens, the CUDA-graph
step replays the eager one, a tp=2 replica runs on NCCL across two GPUs (and names a rank
that dies), and the VQ decoder in bf16 + channels_last on the GPU gives the CPU's images.
"""
import copy
import inspect
import os
import shutil
import signal
import tempfile

import pytest
import torch

from lineray.cache import CacheSpec
from lineray.kernels.sampling import SamplingConfig
from lineray.models.generate import Condition, generate_tokens
from lineray.models import spec as model_spec
from lineray.models.spec import ModelSpec
from lineray.models.vq import VQConfig, VQDecoder
from lineray.workers.config import ReplicaConfig
from lineray.workers.devices import enable_tf32

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (run benchmarks/gpu_smoke.sh on a GPU node)")

# Random weights: checkpoint/decoder "random" in issue 12's ModelSpec, None before it.
RANDOM = getattr(model_spec, "RANDOM", None)
TINY = ModelSpec(preset="GPT-tiny", checkpoint=RANDOM, decoder=RANDOM, grid_size=8)  # fp32, random weights
SAMPLING = SamplingConfig(cfg_scale=4.0, temperature=1.0)
COND = Condition.classes([1, 7, 3])
SEEDS = [11, 12, 13]
POLICIES = {"full": CacheSpec(), "linear": CacheSpec(policy="linear", lines=3)}  # linear evicts: 3 of 8 lines


def set_tf32(on: bool) -> None:
    if on:
        enable_tf32()
        return
    try:
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
    except AttributeError:  # torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def tf32_on() -> bool:
    try:
        return torch.backends.cuda.matmul.fp32_precision == "tf32"
    except AttributeError:  # torch < 2.9
        return torch.backends.cuda.matmul.allow_tf32


@pytest.fixture
def exact_fp32():
    """TF32 off, so fp32 on the GPU rounds like fp32 on the CPU."""
    saved = tf32_on()
    set_tf32(False)
    yield
    set_tf32(saved)


def assert_same_images(tokens, logits, ref_tokens, ref_logits, atol):
    """Tokens equal, logits close. Under TF32 a near-tie may flip one sample (and the rest of that
    image follows it): then the tokens must agree for at least half the image and the logits up to
    and including the step that flipped."""
    tokens, logits = tokens.cpu(), logits.cpu()
    n = tokens.size(1)
    for i in range(len(ref_tokens)):
        differ = (tokens[i] != ref_tokens[i]).nonzero()
        d = int(differ[0]) if len(differ) else n
        assert d >= n // 2, f"image {i}: tokens differ from step {d} of {n}"
        err = (logits[i, :min(d + 1, n)] - ref_logits[i, :min(d + 1, n)]).abs().max().item()
        assert err < atol, f"image {i}: logits differ by {err:.2e} before the tokens do"


def reference(policy: str):
    out = generate_tokens(TINY.build_model(), COND, SEEDS, sampling=SAMPLING, cache_spec=POLICIES[policy],
                          return_logits=True)
    return out.tokens, out.logits


@pytest.mark.parametrize("policy", POLICIES)
def test_cuda_samples_the_cpu_tokens(policy, exact_fp32):
    tokens, logits = reference(policy)
    out = generate_tokens(TINY.build_model(device="cuda"), COND, SEEDS, sampling=SAMPLING,
                          cache_spec=POLICIES[policy], return_logits=True)
    assert out.tokens.is_cuda
    assert torch.equal(out.tokens.cpu(), tokens)
    assert (out.logits.cpu() - logits).abs().max().item() < 1e-3


@pytest.mark.parametrize("policy", POLICIES)
def test_cuda_graph_replay_equals_the_eager_step(policy, exact_fp32):
    if "step_mode" not in inspect.signature(generate_tokens).parameters:
        pytest.skip("needs the static-shape step: generate_tokens(step_mode=...) (issue 16)")
    model = TINY.build_model(device="cuda")
    eager = generate_tokens(model, COND, SEEDS, sampling=SAMPLING, cache_spec=POLICIES[policy],
                            return_logits=True, step_mode="dynamic")
    cache = None
    for mode in ("static", "cuda_graph", "cuda_graph"):  # the second cuda_graph run replays the captured graph
        out = generate_tokens(model, COND, SEEDS, sampling=SAMPLING, cache_spec=POLICIES[policy], cache=cache,
                              return_logits=True, step_mode=mode)
        cache = out.cache
        assert torch.equal(out.tokens, eager.tokens), mode
        assert (out.logits - eager.logits).abs().max().item() < 1e-4, mode
    # Another batch size on the same cache: a graph of its own, the same images as eager.
    two = generate_tokens(model, COND.select([2, 0]), [SEEDS[2], SEEDS[0]], sampling=SAMPLING, cache=cache,
                          step_mode="cuda_graph")
    assert torch.equal(two.tokens, eager.tokens[[2, 0]])


def test_a_local_replica_on_cuda_uses_the_current_gpu_with_tf32(exact_fp32):
    from lineray.workers.replica import make_replica
    tokens, logits = reference("full")
    replica = make_replica(ReplicaConfig(model=TINY, sampling=SAMPLING, device="cuda"))
    assert replica.device == torch.device("cuda", torch.cuda.current_device())
    assert replica.model.tok_embeddings.weight.device == replica.device
    assert tf32_on()
    out = generate_tokens(replica.model, COND, SEEDS, sampling=SAMPLING, return_logits=True)
    assert_same_images(out.tokens, out.logits, tokens, logits, atol=2e-2)
    assert torch.equal(replica.generate(COND, SEEDS), out.tokens.cpu())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.timeout(600)
def test_tp2_on_nccl_matches_tp1_and_names_a_killed_rank():
    ray = pytest.importorskip("ray")
    from lineray.cluster.local import ensure_ray
    from lineray.workers.instrumented import InstrumentedTPReplica
    from lineray.workers.tp_replica import ReplicaError, TPOptions

    enable_tf32()  # as in the workers
    ref = generate_tokens(TINY.build_model(device="cuda"), COND, SEEDS, sampling=SAMPLING, return_logits=True)
    temp_dir = tempfile.mkdtemp(prefix="lr-gpu-", dir="/tmp")
    started = ensure_ray(num_cpus=4, temp_dir=temp_dir)
    try:
        opts = TPOptions(poll_s=0.05, ping_timeout_s=10, stall_timeout_s=60, setup_timeout_s=300, max_retries=0)
        replica = InstrumentedTPReplica(ReplicaConfig(model=TINY, sampling=SAMPLING, tp=2, device="cuda"), opts)
        with replica:
            tokens, logits = replica.generate_with_logits(COND, SEEDS)
            assert_same_images(tokens, logits, ref.tokens.cpu(), ref.logits.cpu(), atol=2e-2)
            ranks = replica.rank_info()
            assert len({r.pid for r in ranks}) == 2
            assert [r.device for r in ranks] == ["cuda:0", "cuda:0"]  # each sees only the GPU Ray gave it
            assert all(r.peak_device_bytes > 0 for r in ranks)
            assert ranks[0].kv.kv_bytes * 2 == ref.cache.memory().kv_bytes

            victim = ranks[1].pid

            def kill(i):
                if i == 5:
                    os.kill(victim, signal.SIGKILL)

            with pytest.raises(ReplicaError, match=rf"rank 1 \(pid {victim}\) died during"):
                replica.generate(COND, SEEDS, on_step=kill)
    finally:
        if started:
            ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_vq_decoder_in_bf16_channels_last_on_the_gpu_gives_the_cpu_images(exact_fp32):
    torch.manual_seed(0)
    vq = VQDecoder(VQConfig(codebook_size=64, ch=32, z_channels=64)).eval()
    codes = torch.randint(0, 64, (5, 4, 4))
    want = vq.decode_codes(codes)
    # fp32 in channels_last on the GPU: the CPU's images up to fp32 rounding.
    fp32 = copy.deepcopy(vq).to_device("cuda", dtype=torch.float32)
    assert fp32.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fp32.decode_codes(codes.cuda(), chunk_size=2).cpu(), want, atol=1e-4, rtol=1e-4)
    # The default on CUDA: bf16 (where the GPU has it), channels_last.
    gpu = copy.deepcopy(vq).to_device("cuda")
    weight = gpu.decoder.conv_in.weight
    assert weight.is_cuda and weight.is_contiguous(memory_format=torch.channels_last)
    assert weight.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    got = gpu.decode_codes(codes.cuda(), chunk_size=2).cpu()
    # bf16 through a random (untrained) decoder: ~5% mean error on CPU; a layout bug would be ~100%.
    assert (got - want).abs().mean() < 0.1 * want.abs().mean()
