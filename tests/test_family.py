"""The family interface with the Janus-Pro family on a tiny random model: text prompts of different
lengths in one batch (left padding, key mask, per-row positions), the cache policies, step modes,
the CFG null prompt, 1D rotate-half RoPE, qk-norm, parameter names, memory plan and errors."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lineray.cache import CacheSpec
from lineray.kernels.rope import apply_rope, rope_table_1d, rope_table_2d
from lineray.kernels.sampling import SamplingConfig
from lineray.models.config import FAMILY_SWITCHES, GPTConfig, preset
from lineray.models.family import FAMILIES
from lineray.models.generate import Condition, GenerationError, generate_tokens
from lineray.models.layers import HeadLayerNorm, TPGroup
from lineray.models.sizing import memory_plan
from lineray.models.transformer import Attention, Transformer

SAMPLING = SamplingConfig(cfg_scale=5.0, temperature=1.0)  # Janus-Pro's defaults: CFG 5, T 1, no top-k
BOS, PAD, BOI = 1, 2, 9
PROMPTS = [[BOS, 20, 21, 22, 23, BOI], [BOS, 30, BOI], [BOS, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, BOI]]
SEEDS = [101, 202, 303]


def janus_tiny(grid: int = 6, seed: int = 0, **overrides) -> Transformer:
    """janus-tiny with random weights: N(0, 0.2) everywhere but the norms, so logits are not flat."""
    cfg = replace(preset("janus-tiny", grid_size=grid), **{"bos_token_id": BOS, "cfg_pad_token_id": PAD, **overrides})
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
                    else 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return janus_tiny()


def generate(model, prompts, seeds, **kw):
    return generate_tokens(model, Condition.prompts(prompts), seeds, sampling=kw.pop("sampling", SAMPLING),
                           return_logits=True, **kw)


# -- the prompt batch ---------------------------------------------------------------------------
def test_prompts_are_left_padded_with_a_mask():
    cond = Condition.prompts([[1, 5, 9], [1, 9], [1, 6, 7, 8, 9]])
    assert cond.prompt_ids.tolist() == [[0, 0, 1, 5, 9], [0, 0, 0, 1, 9], [1, 6, 7, 8, 9]]
    assert cond.prompt_mask.sum(1).tolist() == [3, 2, 5] and cond.prompt_mask[:, -1].all()
    assert len(cond) == 3 and cond.select([2]).prompt_ids.tolist() == [[1, 6, 7, 8, 9]]
    with pytest.raises(GenerationError, match="prompt 1 has no tokens"):
        Condition.prompts([[1, 9], []])


def test_cfg_null_prompt_keeps_bos_and_the_last_token(model):
    cond = Condition.prompts([[BOS, 5, 6, 7, BOI], [BOS, BOI], [BOS, 8, 6, 5, 4, 3, BOI]])
    null, mask = model.null_rows(cond.prompt_ids, cond.prompt_mask)
    assert torch.equal(mask, cond.prompt_mask)
    assert null.tolist() == [[0, 0, BOS, PAD, PAD, PAD, BOI], [0, 0, 0, 0, 0, BOS, BOI],
                             [BOS, PAD, PAD, PAD, PAD, PAD, BOI]]
    no_pad = janus_tiny(cfg_pad_token_id=None)
    with pytest.raises(ValueError, match="CFG pad token id"):
        generate(no_pad, PROMPTS[:1], SEEDS[:1])
    assert generate(no_pad, PROMPTS[:1], SEEDS[:1], sampling=SamplingConfig(cfg_scale=1.0)).tokens.shape == (1, 36)


@pytest.mark.parametrize("spec", [CacheSpec(), CacheSpec("linear", lines=2)], ids=["full", "linear"])
def test_mixed_length_batch_equals_each_prompt_alone(model, spec):
    batch = generate(model, PROMPTS, SEEDS, cache_spec=spec)
    assert batch.tokens.shape == (3, 36)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], [SEEDS[i]], cache_spec=spec)
        assert torch.equal(batch.tokens[i], alone.tokens[0]), f"prompt {i}"
        torch.testing.assert_close(batch.logits[i], alone.logits[0], atol=1e-4, rtol=1e-4)  # summation order
    reordered = generate(model, PROMPTS[::-1], SEEDS[::-1], cache_spec=spec)
    assert torch.equal(reordered.tokens, batch.tokens.flip(0))


def test_whole_sequence_pass_equals_cached_decode(model):
    """forward() (training, reference) with the same left padding and positions gives the decode's logits."""
    gen = generate(model, PROMPTS, SEEDS, sampling=SamplingConfig(cfg_scale=1.0))
    cond = Condition.prompts(PROMPTS)
    with torch.no_grad():
        logits = model(cond.prompt_ids, gen.tokens[:, :-1], cond.prompt_mask)
    torch.testing.assert_close(logits, gen.logits, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", ["linear", "window", "heavy_hitter"])
def test_a_budget_covering_the_image_equals_full(model, policy):
    full = generate(model, PROMPTS, SEEDS)
    covering = generate(model, PROMPTS, SEEDS, cache_spec=CacheSpec(policy, lines=6))
    assert torch.equal(covering.tokens, full.tokens)
    assert torch.equal(covering.logits, full.logits)


def test_linear_one_sixth_holds_prefix_plus_96_plus_24_slots():
    model = janus_tiny(grid=24)
    gen = generate(model, PROMPTS[:2], SEEDS[:2], cache_spec=CacheSpec("linear", rho="1/6"))
    cache, cfg = gen.cache, model.config
    assert cache.capacity == cfg.max_prefix_len + 96 + 24
    assert cache.k.shape == (cfg.n_layer, 4, cfg.n_head, cfg.max_prefix_len + 120, cfg.head_dim) == cache.v.shape
    # After the last token was fed: the batch's prefix (whole), the 4-line budget (its newest line is
    # line 22) and the 23 tokens of line 23 (token 575 is sampled, never fed).
    T = max(map(len, PROMPTS[:2]))
    assert cache.prefix_len == T and cache.n == T + 96 + 23
    kept = cache.kept_positions(0)  # both CFG rows of both images compressed, per head
    assert kept.shape == (4, cfg.n_head, 96 + 23) and (kept >= 0).all()
    assert (kept[..., 72:] == torch.arange(528, 575, dtype=kept.dtype)).all()  # the recent line + the open one
    assert len({tuple(k) for k in kept[..., :72].reshape(-1, 72).tolist()}) > 1  # selected per row and head
    assert memory_plan(cfg, CacheSpec("linear", rho="1/6"), torch.float32).kv_bytes_per_image * 2 \
        == cache.memory().kv_bytes


@pytest.mark.parametrize("spec", [CacheSpec(), CacheSpec("linear", lines=2, pool=3), CacheSpec("window", lines=2)],
                         ids=["full", "linear", "window"])
def test_every_step_mode_gives_the_same_tokens(model, spec):
    ref = generate(model, PROMPTS, SEEDS, cache_spec=spec, step_mode="dynamic")
    static = generate(model, PROMPTS, SEEDS, cache_spec=spec, step_mode="static")
    torch._dynamo.reset()
    compiled = generate(model, PROMPTS, SEEDS, cache_spec=spec, step_mode="compiled", compile_backend="aot_eager")
    assert torch.equal(static.tokens, ref.tokens) and torch.equal(compiled.tokens, ref.tokens)
    torch.testing.assert_close(static.logits, ref.logits, atol=2e-5, rtol=1e-5)


def test_a_cache_reused_for_a_batch_of_other_lengths(model):
    """A worker keeps one cache per batch size: prefixes of another length reuse it (capacity max_prefix_len)."""
    first = generate(model, PROMPTS, SEEDS, step_mode="static")
    other = [[BOS, 3, BOI], [BOS, BOI], [BOS] + list(range(10, 30)) + [BOI]]
    again = generate(model, other, SEEDS, cache=first.cache, step_mode="static")
    fresh = generate(model, other, SEEDS, step_mode="static")
    assert again.cache is first.cache and torch.equal(again.tokens, fresh.tokens)


def test_a_family_with_end_of_line_tokens(monkeypatch):
    """Lines of W codes + 1 forced token (Lumina's layout) on a non-square grid: the forced token lands
    at the end of every line in every step mode, and a LineAR line is W + 1 tokens."""
    W, H, EOL = 5, 4, 31
    forced = lambda cfg: torch.tensor([EOL if (i + 1) % (W + 1) == 0 else -1 for i in range(cfg.image_tokens)])
    monkeypatch.setitem(FAMILIES, "eol-test", replace(FAMILIES["janus"], name="eol-test", forced_tokens=forced))
    monkeypatch.setitem(FAMILY_SWITCHES, "eol-test", {})
    cfg = replace(janus_tiny().config, family="eol-test", grid_size=H, grid_w=W, line_extra=1)
    model = Transformer(cfg).eval()
    model.load_state_dict(janus_tiny().state_dict())
    spec = CacheSpec("linear", lines=2)
    ref = generate(model, PROMPTS, SEEDS, cache_spec=spec, step_mode="dynamic")
    assert ref.tokens.shape == (3, H * (W + 1)) and (ref.tokens.view(3, H, W + 1)[..., -1] == EOL).all()
    assert (ref.tokens.view(3, H, W + 1)[..., :-1] != EOL).any()
    assert ref.cache.plan.grid_w == W + 1 and ref.cache.capacity == cfg.max_prefix_len + 3 * (W + 1)
    static = generate(model, PROMPTS, SEEDS, cache_spec=spec, step_mode="static")
    assert torch.equal(static.tokens, ref.tokens)


# -- the kernels ------------------------------------------------------------------------------------
def rotate_half_reference(x, positions, base=10000.0):
    """HF Llama's apply_rotary_pos_emb, written out: x [B, S, H, D], positions [B, S]."""
    d = x.size(-1)
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = positions[..., None].double() * inv_freq  # [B, S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return x.double() * emb.cos() + torch.cat([-x2, x1], dim=-1).double() * emb.sin()


def test_rope_1d_rotate_half_matches_the_reference():
    x = torch.randn(2, 5, 3, 16, generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    table = rope_table_1d(64, 16)
    ours = apply_rope(x, table[positions], "half")
    torch.testing.assert_close(ours.double(), rotate_half_reference(x, positions), atol=1e-5, rtol=1e-5)
    shared = apply_rope(x, table[:5], "half")  # one table for every row = per-row tables of the same positions
    assert torch.equal(shared, apply_rope(x, table[positions[:1].expand(2, -1)], "half"))
    assert torch.equal(ours[:, 0, :, :], apply_rope(x, table[positions], "half")[:, 0])
    # The same rotation in LlamaGen's interleaved layout is the half layout with features permuted.
    perm = torch.arange(16).view(2, 8).t().reshape(-1)  # interleaved position of half-layout feature
    inter = apply_rope(x[..., perm], table[positions], "interleaved")
    assert torch.allclose(inter, ours[..., perm], atol=1e-6)
    assert torch.equal(apply_rope(x, rope_table_2d(2, 2, 16, prefix_len=1)[:5]),
                       apply_rope(x, rope_table_2d(2, 2, 16, prefix_len=1)[:5], "interleaved"))


def test_qk_norm_is_a_per_head_layernorm_applied_before_rope():
    torch.manual_seed(0)
    norm = HeadLayerNorm(4, 8, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(2, 3, 4, 8)
    ref = torch.stack([F.layer_norm(x[:, :, h], (8,), norm.weight[h], norm.bias[h], 1e-5) for h in range(4)], dim=2)
    torch.testing.assert_close(norm(x), ref)

    cfg = preset("janus-tiny", qk_norm=True)
    attn = Attention(cfg, TPGroup())
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 5, cfg.dim)
    table = rope_table_1d(5, cfg.head_dim)
    q, k, v = attn.wqkv(x).split(cfg.dim, dim=-1)
    shape = (2, 5, cfg.n_head, cfg.head_dim)
    q = apply_rope(ref_norm(q.view(shape), attn.q_norm), table, "half").transpose(1, 2)
    k = apply_rope(ref_norm(k.view(shape), attn.k_norm), table, "half").transpose(1, 2)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim) + torch.full((5, 5), -math.inf).triu(1), -1)
    ref = attn.wo((att @ v.view(shape).transpose(1, 2)).transpose(1, 2).reshape(2, 5, cfg.dim))
    torch.testing.assert_close(attn(x, table), ref, atol=1e-5, rtol=1e-5)
    assert {"q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias"} <= dict(attn.named_parameters()).keys()


def ref_norm(x, norm):
    return F.layer_norm(x, x.shape[-1:], eps=norm.eps) * norm.weight + norm.bias


def test_a_qk_norm_model_decodes_like_its_whole_sequence_pass():
    model = janus_tiny(qk_norm=True)
    gen = generate(model, PROMPTS, SEEDS, sampling=SamplingConfig(cfg_scale=1.0))
    cond = Condition.prompts(PROMPTS)
    with torch.no_grad():
        logits = model(cond.prompt_ids, gen.tokens[:, :-1], cond.prompt_mask)
    torch.testing.assert_close(logits, gen.logits, atol=2e-5, rtol=1e-5)


# -- the family's shape ----------------------------------------------------------------------------------
def test_janus_parameter_names_are_the_contracts():
    cfg = preset("janus-tiny", n_layer=1)
    shapes = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    H, V, E, T = cfg.dim, cfg.vocab_size, cfg.image_embed_dim, cfg.text_vocab_size
    F_, D = cfg.ffn_hidden, cfg.head_hidden
    assert shapes == {
        "prompt_embedding.weight": (T, H),
        "layers.0.attention.wqkv.weight": (3 * H, H), "layers.0.attention.wo.weight": (H, H),
        "layers.0.feed_forward.w1.weight": (F_, H), "layers.0.feed_forward.w3.weight": (F_, H),
        "layers.0.feed_forward.w2.weight": (H, F_),
        "layers.0.attention_norm.weight": (H,), "layers.0.ffn_norm.weight": (H,), "norm.weight": (H,),
        "image_embedding.table.weight": (V, E), "image_embedding.fc1.weight": (H, E), "image_embedding.fc1.bias": (H,),
        "image_embedding.fc2.weight": (H, H), "image_embedding.fc2.bias": (H,),
        "output.fc1.weight": (D, H), "output.fc1.bias": (D,), "output.fc2.weight": (V, D), "output.fc2.bias": (V,)}


@pytest.mark.parametrize("name,layers,dim,heads,ffn,head_hidden,params_b", [
    ("janus-pro-1b", 24, 2048, 16, 5632, 2048, 1.49), ("janus-pro-7b", 30, 4096, 32, 11008, 4096, 6.59)])
def test_janus_presets_have_the_published_shapes(name, layers, dim, heads, ffn, head_hidden, params_b):
    from lineray.models.sizing import param_count
    cfg = preset(name)
    assert (cfg.family, cfg.model_type, cfg.rope, cfg.rope_style, cfg.norm_eps) == ("janus", "text", "1d", "half", 1e-6)
    assert (cfg.n_layer, cfg.dim, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.ffn_hidden, cfg.head_hidden) == \
        (layers, dim, heads, heads, 128, ffn, head_hidden)
    assert (cfg.text_vocab_size, cfg.vocab_size, cfg.image_embed_dim, cfg.grid_size, cfg.image_tokens) == \
        (102400, 16384, 8, 24, 576)
    assert round(param_count(cfg) / 1e9, 2) == params_b  # the LM with its text table, gen_embed/aligner/head
    assert preset("GPT-B").family == "llamagen" and set(FAMILIES) == set(FAMILY_SWITCHES) >= {"llamagen", "janus"}


def test_planned_weights_and_kv_are_what_the_model_and_cache_hold(model):
    cfg = model.config
    plan = memory_plan(cfg, CacheSpec(), torch.float32, cfg_rows=True)
    held = sum(p.numel() * 4 for p in model.parameters()) + model.rope.numel() * 4
    assert plan.weights_bytes == held
    gen = generate(model, PROMPTS, SEEDS)
    assert plan.kv_bytes_per_image * 3 == gen.cache.memory().kv_bytes
    assert plan.meta_bytes_per_image * 3 == gen.cache.memory().meta_bytes


# -- errors --------------------------------------------------------------------------------------------
def test_bad_text_input_is_refused_in_one_line(model):
    with pytest.raises(GenerationError, match="at most 32"):
        generate(model, [[BOS] + [5] * 40 + [BOI]], [1])
    with pytest.raises(GenerationError, match="token id 500 is out of range"):
        generate(model, [[BOS, 500, BOI]], [1])
    with pytest.raises(GenerationError, match="prompted with text"):
        generate_tokens(model, Condition.classes([1]), [1])
    with pytest.raises(ValueError, match="tp=3 does not fit janus-tiny: its 4 attention heads"):
        model.config.check_tp(3, "janus-tiny")
    with pytest.raises(ValueError, match="unknown model family 'dalle'; known families: llamagen, janus"):
        GPTConfig(n_layer=1, dim=8, n_head=2, family="dalle")
