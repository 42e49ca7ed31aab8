"""Tensor parallelism below the workers: two real gloo ranks (torch.multiprocessing, no Ray) run the
decode loop on their shards. tp=2 must give tp=1's tokens for every cache policy, including
head_aggregate (its scores are summed over all heads of all ranks), and the static-shape step must
give the dynamic step's tokens at tp=1 and tp=2, for c2i and t2i.
"""
import itertools

import pytest
import torch

from lineray.cache import CacheSpec
from lineray.kernels.sampling import SamplingConfig
from lineray.models.generate import Condition, generate_tokens
from lineray.models.layers import TPGroup
from lineray.models.spec import RANDOM, ModelSpec
from gloo_ranks import run_on_two_ranks

SAMPLING = SamplingConfig(cfg_scale=4.0, top_k=100)
SPECS = {"full": CacheSpec(), "linear": CacheSpec("linear", lines=3), "window": CacheSpec("window", lines=3),
         "heavy_hitter": CacheSpec("heavy_hitter", lines=4),
         "head_aggregate": CacheSpec("linear", lines=3, head_aggregate=True, pool=3)}
CASES = list(itertools.product(["c2i", "t2i"], SPECS, ["dynamic", "static"]))
SEEDS = [11, 12, 13]


def condition(model_type: str) -> Condition:
    if model_type == "c2i":
        return Condition.classes([1, 7, 3])
    g = torch.Generator().manual_seed(5)
    mask = torch.ones(3, 120, dtype=torch.bool)
    mask[0, :40] = False  # left padding, as T5 features have it
    return Condition(captions=torch.randn(3, 120, 2048, generator=g), caption_mask=mask)


def run_cases(tp: TPGroup) -> dict:
    out = {}
    for model_type in ("c2i", "t2i"):
        spec = ModelSpec(preset="GPT-tiny", checkpoint=RANDOM, decoder=RANDOM, grid_size=8, model_type=model_type)
        model = spec.build_model(tp=tp)
        for mt, name, mode in CASES:
            if mt == model_type:
                out[mt, name, mode] = generate_tokens(model, condition(mt), SEEDS, sampling=SAMPLING,
                                                      cache_spec=SPECS[name], step_mode=mode).tokens
    return out


@pytest.fixture(scope="module")
def tp2_tokens(tmp_path_factory):
    return run_on_two_ranks(run_cases, tmp=tmp_path_factory.mktemp("tp2"))


@pytest.fixture(scope="module")
def tp1_tokens():
    return run_cases(TPGroup())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model_type,name", [(mt, n) for mt in ("c2i", "t2i") for n in SPECS])
def test_tp2_equals_tp1_and_static_step_equals_dynamic(tp1_tokens, tp2_tokens, model_type, name):
    ref = tp1_tokens[model_type, name, "dynamic"]
    assert torch.equal(tp1_tokens[model_type, name, "static"], ref)
    assert torch.equal(tp2_tokens[model_type, name, "dynamic"], ref)
    assert torch.equal(tp2_tokens[model_type, name, "static"], ref)
