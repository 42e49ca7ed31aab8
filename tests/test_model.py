"""The LlamaGen GPT: cached decode == whole-sequence forward, presets, RoPE, t2i padding."""
import pytest
import torch

from lineray.cache import CacheSpec
from lineray.kernels.rope import apply_rope, rope_table_2d
from lineray.kernels.sampling import SamplingConfig
from lineray.models.config import preset
from lineray.models.generate import Condition, generate_tokens
from lineray.models.transformer import Transformer
from conftest import tiny_model


def condition(model, n=3, pad=True):
    cfg = model.config
    if cfg.model_type == "c2i":
        return Condition.classes(list(range(1, n + 1)))
    g = torch.Generator().manual_seed(7)
    caps = torch.randn(n, cfg.cls_token_num, cfg.caption_dim, generator=g)
    mask = torch.ones(n, cfg.cls_token_num, dtype=torch.bool)
    if pad:  # left padding as LlamaGen's T5 features have it
        mask[0, :5] = False
        mask[1, :2] = False
    return Condition(captions=caps, caption_mask=mask)


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
@pytest.mark.parametrize("grid", [16, 24])
def test_cached_decode_equals_full_forward(model_type, grid):
    model = tiny_model(grid, model_type)
    cond = condition(model)
    gen = generate_tokens(model, cond, [11, 12, 13], sampling=SamplingConfig(cfg_scale=1.0),
                          return_logits=True)
    x = cond.labels if model_type == "c2i" else cond.captions
    with torch.no_grad():
        full = model(x, gen.tokens[:, :-1], key_mask=cond.caption_mask)
    assert full.shape == gen.logits.shape == (3, grid * grid, model.config.vocab_size)
    torch.testing.assert_close(gen.logits, full, atol=1e-4, rtol=0)


def test_cached_decode_equals_full_forward_with_cfg():
    model = tiny_model(16)
    cond = condition(model)
    s = SamplingConfig(cfg_scale=3.0, top_k=20)
    gen = generate_tokens(model, cond, [1, 2, 3], sampling=s, return_logits=True)
    with torch.no_grad():
        c = model(cond.labels, gen.tokens[:, :-1])
        u = model(torch.full_like(cond.labels, model.config.num_classes), gen.tokens[:, :-1])
    torch.testing.assert_close(gen.logits, u + (c - u) * 3.0, atol=1e-4, rtol=0)


def test_padded_caption_tokens_do_not_matter():
    model = tiny_model(8, "t2i")
    cond = condition(model)
    other = Condition(captions=cond.captions.clone(), caption_mask=cond.caption_mask)
    other.captions[0, :5] = 100.0  # change only row 0's padded features
    s = SamplingConfig(cfg_scale=2.0)
    a = generate_tokens(model, cond, [1, 2, 3], sampling=s, return_logits=True)
    b = generate_tokens(model, other, [1, 2, 3], sampling=s, return_logits=True)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    # ...while a real (unpadded) token does matter
    other.captions[0, 7] += 1.0
    c = generate_tokens(model, other, [1, 2, 3], sampling=s, return_logits=True)
    assert (c.logits[0] - a.logits[0]).abs().max() > 1e-3


@pytest.mark.parametrize("name,layers,dim,heads,head_dim,ffn,params_m", [
    ("GPT-B", 12, 768, 12, 64, 2048, 111), ("GPT-L", 24, 1024, 16, 64, 2816, 343),
    ("GPT-XL", 36, 1280, 20, 64, 3584, 775), ("GPT-XXL", 48, 1536, 24, 64, 4096, 1410),
    ("GPT-3B", 24, 3200, 32, 100, 8704, 3100)])
def test_presets_have_published_shapes(name, layers, dim, heads, head_dim, ffn, params_m):
    cfg = preset(name)
    assert (cfg.n_layer, cfg.dim, cfg.n_head, cfg.head_dim, cfg.ffn_hidden) == (layers, dim, heads, head_dim, ffn)
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}  # the checkpoint's keys
    assert shapes["layers.0.attention.wqkv.weight"] == (3 * dim, dim)
    assert shapes["layers.0.feed_forward.w1.weight"] == shapes["layers.0.feed_forward.w3.weight"] == (ffn, dim)
    assert shapes["layers.0.feed_forward.w2.weight"] == (dim, ffn)
    assert shapes["cls_embedding.embedding_table.weight"] == (1001, dim)
    assert shapes["output.weight"] == (16384, dim)
    n = sum(v.numel() for v in model.parameters())
    assert abs(n / 1e6 - params_m) / params_m < 0.02


def test_t2i_preset_layout():
    with torch.device("meta"):
        model = Transformer(preset("GPT-XL", model_type="t2i"))
    shapes = {k: tuple(v.shape) for k, v in model.named_parameters()}
    assert model.config.cls_token_num == 120
    assert shapes["cls_embedding.cap_proj.fc1.weight"] == (1280, 2048)
    assert shapes["cls_embedding.cap_proj.fc2.weight"] == (1280, 1280)
    assert shapes["cls_embedding.uncond_embedding"] == (120, 2048)


def test_rope_2d_rows_then_columns_and_zero_for_condition():
    t = rope_table_2d(4, 4, 16, prefix_len=3)
    assert t.shape == (3 + 16, 8, 2)
    assert torch.count_nonzero(t[:3]) == 0  # condition tokens: zero rotation -> q, k == 0
    freqs = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    cell = 3 + 2 * 4 + 1  # row 2, column 1
    torch.testing.assert_close(t[cell, :4, 0], torch.cos(2 * freqs))
    torch.testing.assert_close(t[cell, 4:, 1], torch.sin(1 * freqs))
    x = torch.randn(1, 19, 2, 16)
    y = apply_rope(x, t)
    assert torch.count_nonzero(y[:, :3]) == 0
    torch.testing.assert_close(y[:, 3:].norm(dim=-1), x[:, 3:].norm(dim=-1))  # a rotation keeps norms


def test_cache_spec_grid_is_checked_against_model():
    from lineray.cache import CacheConfigError
    with pytest.raises(CacheConfigError, match="does not match"):
        CacheSpec(policy="linear", rho=0.25).plan(16, 16, 24 * 24)


def test_rope_stays_fp32_in_a_bf16_model():
    """LlamaGen rotates in fp32 at any dtype: `model.to(bfloat16)` must not round the cos/sin table."""
    model = tiny_model(24).to(torch.bfloat16)
    cfg = model.config
    table = rope_table_2d(24, 24, cfg.head_dim, cfg.rope_base, cfg.cls_token_num)
    assert model.rope.dtype == torch.float32 and torch.equal(model.rope, table)
    teacher = torch.randint(0, cfg.vocab_size, (2, 24 * 24), generator=torch.Generator().manual_seed(0))

    def logits(m):
        return generate_tokens(m, Condition.classes([1, 2]), sampling=SamplingConfig(cfg_scale=1.0),
                               teacher_tokens=teacher, return_logits=True).logits

    got = logits(model)
    model.rope = table.clone()  # the reference: the same bf16 model, the fp32 table set by hand
    assert torch.equal(got, logits(model))
    model.rope = table.to(torch.bfloat16).float()  # what a cast table rotates by: different logits
    assert (logits(model) - got).abs().max() > 1e-3
