"""Tensor parallelism for the Janus family: two real gloo ranks (torch.multiprocessing, no Ray) load
their slices of one checkpoint (heads, FFN columns, gen_head fc1 rows + bias, fc2 columns; embeddings
and the aligner whole) and decode a mixed-length batch of text prompts. tp=2 must give tp=1's tokens
(and logits, to float tolerance) for every cache policy, in the dynamic and the static step, with
and without qk-norm. Then the same through the workers: a TPReplica of two Ray actors fed text
Conditions, with random weights from a ModelSpec.
"""
import itertools

import pytest
import torch

from lineray.cache import CacheSpec
from lineray.kernels.sampling import SamplingConfig
from lineray.models.checkpoint import load_checkpoint
from lineray.models.generate import Condition, generate_tokens
from lineray.models.layers import TPGroup
from lineray.models.transformer import Transformer
from gloo_ranks import run_on_two_ranks
from test_family import PROMPTS, SEEDS, janus_tiny
from test_tp import ray_local  # noqa: F401 - the private local Ray of the TP replica tests

SAMPLING = SamplingConfig(cfg_scale=5.0)
SPECS = {"full": CacheSpec(), "linear": CacheSpec("linear", lines=2), "window": CacheSpec("window", lines=2),
         "head_aggregate": CacheSpec("linear", lines=2, head_aggregate=True, pool=3)}
VARIANTS = {"janus": {}, "qk_norm": {"qk_norm": True}}
CASES = list(itertools.product(VARIANTS, SPECS, ["dynamic", "static"]))


def run_cases(tp: TPGroup, ckpt_dir: str) -> dict:
    out = {}
    for variant, overrides in VARIANTS.items():
        model = Transformer(janus_tiny(**overrides).config, tp)
        load_checkpoint(model, f"{ckpt_dir}/{variant}.pt")  # each rank reads its slices
        model.eval()
        for v, name, mode in CASES:
            if v == variant:
                gen = generate_tokens(model, Condition.prompts(PROMPTS), SEEDS, sampling=SAMPLING,
                                      cache_spec=SPECS[name], step_mode=mode, return_logits=True)
                out[v, name, mode] = (gen.tokens, gen.logits)
    return out


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("janus_ckpt")
    for variant, overrides in VARIANTS.items():
        torch.save(janus_tiny(**overrides).state_dict(), tmp / f"{variant}.pt")
    return str(tmp)


@pytest.fixture(scope="module")
def tp2(tmp_path_factory, ckpt_dir):
    return run_on_two_ranks(run_cases, ckpt_dir, tmp=tmp_path_factory.mktemp("tp2"))


@pytest.fixture(scope="module")
def tp1(ckpt_dir):
    return run_cases(TPGroup(), ckpt_dir)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant,name", [(v, n) for v in VARIANTS for n in SPECS])
def test_janus_tp2_equals_tp1_in_every_step_mode(tp1, tp2, variant, name):
    ref_tokens, ref_logits = tp1[variant, name, "dynamic"]
    for out in (tp1[variant, name, "static"], tp2[variant, name, "dynamic"], tp2[variant, name, "static"]):
        assert torch.equal(out[0], ref_tokens)
        torch.testing.assert_close(out[1], ref_logits, atol=1e-4, rtol=1e-4)


def test_a_rank_holds_its_share_of_the_janus_weights(ckpt_dir):
    """Rank 1 of 2: half the heads, FFN and gen_head hidden columns; embeddings, aligner and fc2's bias whole."""
    full = torch.load(f"{ckpt_dir}/qk_norm.pt", weights_only=True)
    shard = Transformer(janus_tiny(qk_norm=True).config, TPGroup(rank=1, size=2))
    load_checkpoint(shard, f"{ckpt_dir}/qk_norm.pt")
    got = dict(shard.named_parameters())
    assert torch.equal(got["output.fc1.weight"], full["output.fc1.weight"][32:])
    assert torch.equal(got["output.fc1.bias"], full["output.fc1.bias"][32:])
    assert torch.equal(got["output.fc2.weight"], full["output.fc2.weight"][:, 32:])
    assert torch.equal(got["output.fc2.bias"], full["output.fc2.bias"])
    assert torch.equal(got["layers.0.attention.q_norm.weight"], full["layers.0.attention.q_norm.weight"][2:])
    assert torch.equal(got["image_embedding.fc1.bias"], full["image_embedding.fc1.bias"])
    assert torch.equal(got["prompt_embedding.weight"], full["prompt_embedding.weight"])


@pytest.mark.timeout(240)
def test_a_tp2_replica_of_ray_workers_generates_text_prompts_like_tp1(ray_local):
    from lineray.models.spec import ModelSpec
    from lineray.workers.instrumented import InstrumentedTPReplica
    from lineray.workers.replica import ReplicaConfig
    from lineray.workers.tp_replica import TPOptions
    spec = ModelSpec(preset="janus-tiny", checkpoint="random", decoder="random")
    cache = CacheSpec("linear", lines=2)
    cond = Condition.prompts(PROMPTS)
    ref = generate_tokens(spec.build_model(), cond, SEEDS, sampling=SAMPLING, cache_spec=cache, return_logits=True)
    with pytest.raises(ValueError, match="tp=3 does not fit janus-tiny: its 4 attention heads"):
        InstrumentedTPReplica(ReplicaConfig(model=spec, cache=cache, sampling=SAMPLING, tp=3))
    options = TPOptions(poll_s=0.05, ping_timeout_s=10.0, stall_timeout_s=60.0, setup_timeout_s=120.0)
    with InstrumentedTPReplica(ReplicaConfig(model=spec, cache=cache, sampling=SAMPLING, tp=2), options) as replica:
        tokens, logits = replica.generate_with_logits(cond, SEEDS)
        assert torch.equal(tokens, ref.tokens)
        torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=1e-4)
        ranks = replica.rank_info()
        assert all(r.kv.heads == 2 and r.kv.kv_bytes * 2 == ref.cache.memory().kv_bytes for r in ranks)


def test_random_weights_are_the_same_slices_at_any_tp():
    """ModelSpec's random weights: every rank's tensors are its slices of the tp=1 model's (biases too:
    fc1's split with its rows, fc2's whole), so tp=N generates what tp=1 does."""
    from lineray.models.layers import checkpoint_tensors
    from lineray.models.spec import ModelSpec, slice_2d
    spec = ModelSpec(preset="janus-tiny", checkpoint="random", decoder="random")
    full = {t.key: t.target for t in checkpoint_tensors(spec.build_model())}
    for rank in range(2):
        for t in checkpoint_tensors(spec.build_model(tp=TPGroup(rank, 2))):
            f = full[t.key]
            want = t.load_shard(lambda rows=None, cols=None, f=f: slice_2d(f, rows, cols)) if t.split else f
            assert torch.equal(t.target, want), f"rank {rank}: {t.key}"
