"""Parity with transformers' JanusForConditionalGeneration (issue 13): lineray loads the tiny random model's
folder and gives the same greedy image tokens at guidance 5 and 1, gen-head logits within 1e-4 at every
step, for two prompts of different lengths batched together (left padding) while transformers runs each
alone; the deepseek layouts give identical tokens; the VQ decoder gives transformers' pixels."""
import pytest
import torch

from janus_fixtures import GUIDANCES, PROMPTS, janus  # noqa: F401 (janus: the session fixture)
from lineray.cache import CacheSpec
from lineray.kernels.sampling import SamplingConfig
from lineray.models.checkpoint import load_checkpoint
from lineray.models.generate import Condition, generate_tokens
from lineray.models.janus import folder as jfolder
from lineray.models.transformer import Transformer

GREEDY = dict(temperature=0.0)  # lineray's greedy (kernels/sampling.py: argmax)


def lineray_model(d):
    cfg = jfolder.read_config(d)
    model = Transformer(cfg).eval()
    load_checkpoint(model, jfolder.lm_reader(d, cfg))
    return model


def generate(model, d, guidance, cache_spec=CacheSpec()):
    ids = jfolder.prompt_encoder(d, model.config.max_prefix_len).encode(PROMPTS)
    return generate_tokens(model, Condition.prompts(ids), [0, 1], return_logits=True, cache_spec=cache_spec,
                           sampling=SamplingConfig(cfg_scale=guidance, **GREEDY))


@pytest.mark.parametrize("guidance", GUIDANCES)
def test_the_oracle_loop_is_transformers_generate(janus, guidance):
    """The hand-written loop that records per-step logits gives `generate`'s tokens (each prompt alone).
    transformers' generate fails at guidance exactly 1 (5.24: it keeps the doubled rows without CFG), so
    there it runs at 1 + 1e-6, whose guided logits differ from the conditional ones by ~1e-6."""
    for p in range(len(PROMPTS)):
        oracle = janus.oracle[p, guidance]
        ids = torch.tensor([oracle.ids])
        out = janus.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                                   do_sample=False, guidance_scale=guidance if guidance > 1 else 1 + 1e-6)
        assert torch.equal(out[0], oracle.tokens)


# LineAR with a budget of the whole grid (4 lines) keeps every token: it must give the full cache's outputs.
CACHES = {"full": CacheSpec(), "linear-all-lines": CacheSpec("linear", lines=4)}


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("guidance", GUIDANCES)
def test_greedy_tokens_and_logits_equal_transformers(janus, guidance, cache):
    lengths = [len(janus.oracle[p, guidance].ids) for p in range(2)]
    assert lengths[0] < lengths[1]  # batched together, the first prompt is left-padded
    gen = generate(lineray_model(janus.tf_dir), janus.tf_dir, guidance, CACHES[cache])
    for p in range(2):
        oracle = janus.oracle[p, guidance]
        assert len(set(oracle.tokens.tolist())) >= 4  # not a degenerate one-token image
        assert gen.tokens[p].tolist() == oracle.tokens.tolist()
        # guided logits = the logits sampled from; at guidance 1 those are the conditional row's raw logits
        diff = (gen.logits[p] - oracle.guided).abs().max().item()
        assert diff < 1e-4, f"prompt {p}: max gen-head logit difference {diff:.2e}"
        if guidance == 1.0:
            assert torch.allclose(gen.logits[p], oracle.logits[:, 0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["bin", "bin-shards", "safetensors-shards"])
def test_deepseek_layouts_give_identical_tokens(janus, layout):
    d = janus.deepseek_dirs[layout]
    gen = generate(lineray_model(d), d, 5.0)
    reference = generate(lineray_model(janus.tf_dir), janus.tf_dir, 5.0)
    assert torch.equal(gen.tokens, reference.tokens)
    assert torch.equal(gen.logits, reference.logits)  # the same tensors: bit for bit
    assert gen.tokens[0].tolist() == janus.oracle[0, 5.0].tokens.tolist()


@pytest.mark.parametrize("layout", ["transformers", "bin"])
def test_vq_decoder_pixels_equal_transformers(janus, layout):
    d = janus.tf_dir if layout == "transformers" else janus.deepseek_dirs[layout]
    vq = jfolder.load_vq_decoder(d)
    assert (vq.config.codebook_size, vq.config.ch_mult, vq.config.num_res_blocks) == (32, (1, 1, 2), 1)
    codes = torch.stack([janus.oracle[p, g].tokens for p in range(2) for g in GUIDANCES])  # [4, 16]
    grid = janus.model.config.vq_config.num_patches
    with torch.no_grad():
        theirs = janus.model.decode_image_tokens(codes).permute(0, 3, 1, 2)  # [B, 3, H, W], not clamped
        latents = vq.quantize.lookup(codes.view(-1, grid, grid))
        ours = vq.decoder(vq.post_quant_conv(latents))
    assert ours.shape == theirs.shape == (4, 3, 16, 16)
    assert (ours - theirs).abs().max().item() < 1e-4
    torch.testing.assert_close(vq.decode_codes(codes.view(-1, grid, grid)), theirs.clamp(-1, 1), atol=1e-4, rtol=0)
