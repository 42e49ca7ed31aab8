"""Generation: per-image seeds, sampling filters, CFG interval, dtypes, and clear errors."""
import subprocess
import sys

import pytest
import torch

from lineray.cache import CacheSpec
from lineray.kernels.sampling import SamplingConfig, guided_logits, image_uniforms, sample
from lineray.models.generate import Condition, GenerationError, generate_tokens
from conftest import tiny_model

SAMPLING = SamplingConfig(cfg_scale=2.5, temperature=1.0, top_k=40, top_p=0.95)


def test_same_seed_same_image_regardless_of_batch_and_position():
    model = tiny_model(8)
    alone = generate_tokens(model, Condition.classes([7]), [1234], sampling=SAMPLING).tokens[0]
    for labels, seeds, where in [([1, 7, 3], [5, 1234, 9], 1), ([7, 7], [1234, 77], 0),
                                 ([2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 1234], 5)]:
        out = generate_tokens(model, Condition.classes(labels), seeds, sampling=SAMPLING).tokens
        assert torch.equal(out[where], alone)
    other = generate_tokens(model, Condition.classes([7]), [1235], sampling=SAMPLING).tokens[0]
    assert not torch.equal(other, alone)


@pytest.mark.parametrize("spec", [CacheSpec(), CacheSpec("linear", lines=2)], ids=["full", "linear"])
def test_a_tail_batch_padded_to_the_cache_gives_its_own_images(spec):
    """A CUDA-graph step pads a tail batch to its cache's batch (one graph per job): the padding must
    change none of the real images, keep the cache's size, and return only the real rows."""
    from lineray.models.generate import new_cache
    model = tiny_model(8)
    alone = generate_tokens(model, Condition.classes([3, 8]), [11, 12], sampling=SAMPLING, cache_spec=spec,
                            return_logits=True)
    cache = new_cache(model, spec, rows=2 * 5, use_cfg=True)
    padded = generate_tokens(model, Condition.classes([3, 8]), [11, 12], sampling=SAMPLING, cache_spec=spec,
                             return_logits=True, cache=cache, pad_to=5)
    assert torch.equal(padded.tokens, alone.tokens) and padded.tokens.shape == (2, 64)
    assert torch.allclose(padded.logits, alone.logits, atol=1e-5) and padded.logits.shape[0] == 2
    assert padded.cache is cache and cache.rows == 10


def test_uniforms_depend_only_on_their_seed():
    a = image_uniforms([3, 4], 50)
    b = image_uniforms([9, 4, 3], 50)
    assert torch.equal(a[0], b[2]) and torch.equal(a[1], b[1])
    assert a.min() >= 0 and a.max() < 1


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]])).repeat(2000, 1)
    u = torch.rand(2000, generator=torch.Generator().manual_seed(0))
    top2 = sample(logits, u, SamplingConfig(top_k=2))
    assert set(top2.tolist()) == {0, 1}
    nucleus = sample(logits, u, SamplingConfig(top_p=0.85))  # 0.5 + 0.3 < 0.85 -> the third token stays in
    assert set(nucleus.tolist()) == {0, 1, 2}
    assert set(sample(logits, u, SamplingConfig(temperature=0)).tolist()) == {0}
    free = sample(logits, u, SamplingConfig())
    freq = torch.bincount(free, minlength=5).float() / 2000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04]), atol=0.04, rtol=0)


def test_cfg_formula_and_interval():
    logits = torch.tensor([[1.0, 2.0], [0.0, 4.0]])  # [cond; uncond] for one image
    cfg = SamplingConfig(cfg_scale=3.0, cfg_interval=5)
    assert torch.equal(guided_logits(logits, 1, 0, cfg), torch.tensor([[3.0, -2.0]]))
    assert torch.equal(guided_logits(logits, 1, 6, cfg), torch.tensor([[1.0, 2.0]]))  # past the interval: cond only


def test_bfloat16_generation_tracks_fp32():
    model = tiny_model(8)
    s = SamplingConfig(cfg_scale=2.0)
    teacher = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    ref = generate_tokens(model, Condition.classes([1, 2]), sampling=s, teacher_tokens=teacher, return_logits=True)
    bf = generate_tokens(model.to(torch.bfloat16), Condition.classes([1, 2]), sampling=s, teacher_tokens=teacher,
                         return_logits=True)
    assert bf.cache.k.dtype == torch.bfloat16
    assert (bf.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean() > 0.9
    assert (bf.logits - ref.logits).abs().mean() < 0.05 * ref.logits.abs().mean() + 0.05


@pytest.mark.parametrize("labels,seeds,message", [
    ([10], [1], "class id 10 is out of range: this model has 10 classes"),
    ([-1], [1], "class id -1 is out of range"),
    ([], [], "no prompts given"),
    ([1, 2], [1], "need one seed per image"),
])
def test_bad_generation_input_is_refused(labels, seeds, message):
    with pytest.raises(GenerationError, match=message):
        generate_tokens(tiny_model(4), Condition.classes(labels), seeds)


def test_sampling_settings_are_checked():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="cfg_scale"):
        SamplingConfig(cfg_scale=0.5)


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "lineray.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


RANDOM_TINY = ["--model", "GPT-tiny", "--checkpoint", "random", "--vq", "random", "--grid-size", "2"]


@pytest.mark.parametrize("args,message", [
    (RANDOM_TINY + ["--classes", "3,1000"], "class id 1000 is out of range"),
    (RANDOM_TINY + ["--classes", ""], "no prompts given"),
    (["--model", "GPT-B", "--checkpoint", "/no/such/c2i_B_256.pt", "--vq", "random"],
     "checkpoint not found: /no/such/c2i_B_256.pt"),
    (RANDOM_TINY + ["--cache", "linear", "--rho", "0"], "rho must be in (0, 1]"),
    (RANDOM_TINY + ["--tp", "3"], "tp=3 does not fit GPT-tiny: its 4 attention heads must split evenly "
                                  "across ranks; valid tensor-parallel sizes are 1, 2, 4"),
])
def test_cli_errors_are_one_line(args, message):
    r = run_cli("sample", *args, "--out", "/tmp/lineray-cli-test-unused")
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("lineray: error:") and message in last, r.stderr
    assert "Traceback" not in r.stderr


def test_cli_sample_writes_pngs_and_contact_sheet(tmp_path):
    from PIL import Image
    r = run_cli("sample", *RANDOM_TINY, "--classes", "1,2,3", "--count", "2", "--cache", "linear",
                "--cache-lines", "1", "--cfg-scale", "2", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    pngs = sorted(p.name for p in tmp_path.glob("0*.png"))
    assert pngs == [f"{i:04d}_class{c}.png" for i, c in enumerate([1, 1, 2, 2, 3, 3])]
    assert Image.open(tmp_path / "0000_class1.png").size == (32, 32)
    assert Image.open(tmp_path / "contact_sheet.png").size[0] > 96


def test_cli_sample_tp2_matches_tp1(tmp_path):
    """`lineray sample --tp 2` starts a private Ray, splits the model over two gloo ranks, same images."""
    common = ["sample", *RANDOM_TINY, "--classes", "4,5", "--cfg-scale", "2"]
    one = run_cli(*common, "--out", str(tmp_path / "tp1"))
    two = run_cli(*common, "--tp", "2", "--out", str(tmp_path / "tp2"), timeout=240)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    for name in ("0000_class4.png", "0001_class5.png"):
        assert (tmp_path / "tp1" / name).read_bytes() == (tmp_path / "tp2" / name).read_bytes()


def test_compiled_dense_parts_match_eager():
    """ReplicaConfig.compile: torch.compile'd norms and FFN give the eager logits (to float tolerance)."""
    eager = tiny_model(8)
    compiled = tiny_model(8).compile_dense()
    assert all(layer.feed_forward._compiled_call_impl is not None for layer in compiled.layers)
    cond, seeds = Condition.classes([1, 2, 3]), [5, 6, 7]
    s = SamplingConfig(cfg_scale=2.0)
    a = generate_tokens(eager, cond, seeds, sampling=s, return_logits=True)
    b = generate_tokens(compiled, cond, [5, 6, 7], sampling=s, teacher_tokens=a.tokens, return_logits=True)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type,spec", [("c2i", CacheSpec("linear", lines=3, pool=3)), ("t2i", CacheSpec())])
def test_static_decode_step_compiles_without_graph_breaks(model_type, spec):
    """The whole static step (all layers, guidance, sampling) is one graph: fullgraph=True raises on
    any break. aot_eager traces and functionalises it like inductor does, without the C++ codegen
    (benchmarks/decode_throughput.py runs inductor). Same tokens as the eager static step."""
    model = tiny_model(8, model_type)
    cfg = model.config
    cond = Condition.classes([1, 2]) if model_type == "c2i" else \
        Condition(captions=torch.randn(2, cfg.cls_token_num, cfg.caption_dim),
                  caption_mask=torch.arange(cfg.cls_token_num).expand(2, -1) >= torch.tensor([[3], [0]]))
    s = SamplingConfig(cfg_scale=2.0, top_k=40, top_p=0.9, cfg_interval=30)
    eager = generate_tokens(model, cond, [3, 4], sampling=s, cache_spec=spec, step_mode="static")
    torch._dynamo.reset()
    compiled = generate_tokens(model, cond, [3, 4], sampling=s, cache_spec=spec, step_mode="compiled",
                               compile_backend="aot_eager")
    assert torch.equal(compiled.tokens, eager.tokens)


def test_step_modes_are_checked():
    with pytest.raises(GenerationError, match="unknown decode step mode 'fast'"):
        generate_tokens(tiny_model(4), Condition.classes([1]), [1], step_mode="fast")
    with pytest.raises(GenerationError, match="cuda_graph needs a CUDA device"):
        generate_tokens(tiny_model(4), Condition.classes([1]), [1], step_mode="cuda_graph")
