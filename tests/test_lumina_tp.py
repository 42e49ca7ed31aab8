"""Lumina-mGPT under tensor parallelism: two real gloo ranks (torch.multiprocessing, no Ray) each read only
their slices of the published layout (heads of q/k/v and the qk-norms, FFN columns, their half of the
image-code rows of lm_head) and run the decode loop; tp=2 must give tp=1's tokens and logits, with the
full cache and an evicting LineAR cache, in the dynamic and the static step."""
import pytest
import torch

from lineray.cache import CacheSpec
from lineray.kernels.sampling import SamplingConfig
from lineray.models.generate import Condition, generate_tokens
from lineray.models.layers import TPGroup
from lineray.models.lumina.folder import load_model
from lineray.models.lumina.prompt import LuminaPromptEncoder
from gloo_ranks import run_on_two_ranks
from lumina_fixtures import build_tiny_lumina
from test_tp import ray_local  # noqa: F401 - the private local Ray of the TP replica tests

SAMPLING = SamplingConfig(cfg_scale=3.0, top_k=2000)
SPECS = {"full": CacheSpec(), "linear": CacheSpec("linear", rho="1/4")}
MODES = ("dynamic", "static")
PROMPTS = ["a red fox in snow", "blue cat sits on the mat under the big sky", "green tree"]
SEEDS = [11, 12, 13]


def run_cases(folder: str, tp: TPGroup) -> dict:
    model, _ = load_model(folder, tp=tp, grid_size=4, grid_w=6, max_prefix_len=40)  # 96x64 px
    enc = LuminaPromptEncoder.from_folder(folder)
    ids = enc.encode(PROMPTS, "96x64")
    out = {}
    for name, spec in SPECS.items():
        for mode in MODES:
            gen = generate_tokens(model, Condition.prompts(ids), SEEDS, sampling=SAMPLING, cache_spec=spec,
                                  step_mode=mode, return_logits=True)
            out[name, mode] = (gen.tokens, gen.logits, gen.cache.k[0].shape)
    # a second grid from the same loaded shard (Transformer.for_grid): 64x96 px, 6 lines of 4 codes
    gen = generate_tokens(model.for_grid(6, 4), Condition.prompts(enc.encode(PROMPTS, "64x96")), SEEDS,
                          sampling=SAMPLING, cache_spec=SPECS["linear"], return_logits=True)
    out["linear", "64x96"] = (gen.tokens, gen.logits, gen.cache.k[0].shape)
    return out


def rank_cases(tp: TPGroup, folder: str) -> dict:
    """run_cases on one rank of tp=2, and what that rank holds of the head and the qk-norm."""
    out = run_cases(folder, tp)
    model, _ = load_model(folder, tp=tp, grid_size=4, grid_w=6, max_prefix_len=40)
    out["head_rows"] = model.output.weight.shape[0]
    out["q_norm"] = model.layers[0].attention.q_norm.weight.detach().clone()
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(build_tiny_lumina(tmp_path_factory.mktemp("lumina")).lumina)


@pytest.fixture(scope="module")
def tp2(folder, tmp_path_factory):
    return run_on_two_ranks(rank_cases, folder, tmp=tmp_path_factory.mktemp("tp2"))


@pytest.mark.timeout(300)
def test_tp2_equals_tp1(folder, tp2):
    tp1 = run_cases(folder, TPGroup())
    ref = tp1["full", "dynamic"][0]
    for key in tp1:
        tokens, logits, kv_shape = tp1[key]
        assert torch.equal(tokens, ref) or key[0] != "full"
        assert torch.equal(tp2[key][0], tokens), key
        torch.testing.assert_close(tp2[key][1], logits, atol=1e-4, rtol=1e-4)
        assert tp2[key][2][1] * 2 == kv_shape[1]  # each rank caches half the heads
    assert torch.equal(tp1["linear", "static"][0], tp1["linear", "dynamic"][0])
    assert tp1["linear", "64x96"][0].shape == (3, 6 * 5)
    assert tp2["head_rows"] == 8 + 6  # half of the 16 image-code rows of lm_head + the 6 size-token rows whole
    assert tp2["q_norm"].shape == (2, 16)  # rank 0's two heads of the [1, 16] file value, repeated


@pytest.mark.timeout(300)
def test_a_tp2_replica_of_ray_workers_runs_two_grids_and_sampled_sizes_like_tp1(folder, ray_local):
    """Through the workers: one TPReplica of two Ray actors serves a 96x64 batch, then a 64x96 batch (the grid
    passed per call, the cache rebuilt for it), then a batch whose sizes the model draws; all equal tp=1."""
    from lineray.models.spec import ModelSpec
    from lineray.workers.replica import LocalReplica, ReplicaConfig, sample_sizes_then_generate
    from lineray.workers.tp_replica import TPOptions, TPReplica
    spec = ModelSpec(preset="lumina-tiny", checkpoint=folder)
    cfg = ReplicaConfig(model=spec, cache=SPECS["linear"], sampling=SAMPLING, tp=2)
    local = LocalReplica(ReplicaConfig(model=spec, cache=SPECS["linear"], sampling=SAMPLING))
    enc = spec.prompt_encoder()
    options = TPOptions(poll_s=0.05, ping_timeout_s=10.0, stall_timeout_s=60.0, setup_timeout_s=120.0)
    with TPReplica(cfg, options) as replica:
        for size, grid in (("96x64", None), ("64x96", (6, 4))):
            cond = Condition.prompts(enc.encode(PROMPTS, size))
            got = replica.generate(cond, SEEDS, grid=grid)
            assert got.shape == (3, 28 if grid is None else 30)
            assert torch.equal(got, local.generate(cond, SEEDS, grid=grid)), size
        drawn = enc.encode(PROMPTS, "sample")
        tokens, grids = sample_sizes_then_generate(replica, drawn, SEEDS)
        want, want_grids = sample_sizes_then_generate(local, drawn, SEEDS)
        assert grids == want_grids and all(torch.equal(a, b) for a, b in zip(tokens, want))
