"""LlamaGen after the family interface: the same tokens and logits as before it (recorded on main).

tests/data/llamagen_golden.pt was written by `python tests/test_family_llamagen_golden.py --write`
on main before the family interface landed: the bundled digits model (its real weights), the
shapes-24 shape (random weights; its weights are not shipped in this checkout) and a t2i GPT-tiny
with padded captions, under every cache policy and the dynamic, static and compiled step modes.
"""
import sys
from pathlib import Path

import pytest
import torch

from lineray.cache import CacheSpec
from lineray.kernels.sampling import SamplingConfig
from lineray.models.config import GPTConfig, preset
from lineray.models.generate import Condition, generate_tokens
from lineray.models.transformer import Transformer
from lineray.models.spec import ModelSpec

GOLDEN = Path(__file__).parent / "data" / "llamagen_golden.pt"
SPECS = {"full": CacheSpec(), "linear": CacheSpec("linear", rho=0.25),
         "linear_pool": CacheSpec("linear", lines=3, pool=3), "window": CacheSpec("window", lines=3), "heavy_hitter": CacheSpec("heavy_hitter", lines=4)}
MODES = ("dynamic", "static", "compiled")
SAMPLING = SamplingConfig(cfg_scale=3.0, temperature=1.0, top_k=50, top_p=0.95)


def models() -> dict:
    torch.manual_seed(0)
    from lineray.models.shapes import PRESET
    shapes = Transformer(GPTConfig(**PRESET, vocab_size=64)).init_weights(generator=torch.Generator().manual_seed(3))
    t2i = Transformer(preset("GPT-tiny", grid_size=8, model_type="t2i", caption_dim=32, cls_token_num=12))
    t2i.init_weights(generator=torch.Generator().manual_seed(4))
    for m in (shapes, t2i):
        with torch.no_grad():
            m.output.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
    captions = torch.randn(3, 12, 32, generator=torch.Generator().manual_seed(6))
    mask = torch.arange(12).expand(3, -1) >= torch.tensor([[0], [4], [9]])
    return {"digits": (ModelSpec().build_model(), Condition.classes([0, 3, 7])),
            "shapes-24": (shapes.eval(), Condition.classes([1, 5, 2])),
            "t2i": (t2i.eval(), Condition(captions=captions, caption_mask=mask))}


def run(model, cond, spec, mode):
    torch._dynamo.reset()
    return generate_tokens(model, cond, [11, 22, 33], sampling=SAMPLING, cache_spec=spec, step_mode=mode,
                           compile_backend="aot_eager", return_logits=True)


def record() -> dict:
    out = {}
    for name, (model, cond) in models().items():
        for policy, spec in SPECS.items():
            for mode in MODES:
                gen = run(model, cond, spec, mode)
                out[f"{name}/{policy}/{mode}"] = (gen.tokens, gen.logits[:, ::7].clone())
    return out


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


@pytest.fixture(scope="module")
def built():
    return models()


# Every recorded case would take minutes of CI; these cover each model, policy and step mode. The
# compiled step (slow to compile) runs once per model (test_generate checks it equals the static step).
CASES = [(name, policy) for name in ("digits", "t2i") for policy in SPECS] + \
        [("shapes-24", "full"), ("shapes-24", "linear")]


@pytest.mark.parametrize("name,policy", CASES)
def test_llamagen_tokens_and_logits_unchanged(golden, built, name, policy):
    model, cond = built[name]
    for mode in MODES if (policy == "linear_pool" or name == "shapes-24" and policy == "linear") else MODES[:2]:
        tokens, logits = golden[f"{name}/{policy}/{mode}"]
        gen = run(model, cond, SPECS[policy], mode)
        assert torch.equal(gen.tokens, tokens), f"{name} {policy} {mode}: tokens changed"
        torch.testing.assert_close(gen.logits[:, ::7], logits, atol=0, rtol=0)


if __name__ == "__main__" and "--write" in sys.argv:
    torch.set_num_threads(1)
    torch.save(record(), GOLDEN)
    print(f"wrote {GOLDEN}")
