"""KV cache policies: exactness with a covering budget, bounded memory, which tokens survive, config errors."""
import pytest
import torch

from lineray.cache import CacheConfigError, CacheSpec, KVCache
from lineray.kernels.sampling import SamplingConfig
from lineray.models.generate import Condition, generate_tokens
from lineray.models.sizing import peak_allocated_bytes
from conftest import tiny_model

SAMPLING = SamplingConfig(cfg_scale=3.0, top_k=50)


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
@pytest.mark.parametrize("spec", [CacheSpec("linear", rho=1.0), CacheSpec("linear", lines=8, pool=3, cfg_shared=True),
                                  CacheSpec("window", lines=8), CacheSpec("heavy_hitter", lines=8)])
def test_covering_budget_reproduces_full_cache_exactly(model_type, spec):
    model = tiny_model(8, model_type)
    if model_type == "c2i":
        cond = Condition.classes([1, 2, 3])
    else:
        cfg = model.config
        mask = torch.ones(3, cfg.cls_token_num, dtype=torch.bool)
        mask[0, :4] = False
        cond = Condition(captions=torch.randn(3, cfg.cls_token_num, cfg.caption_dim), caption_mask=mask)
    full = generate_tokens(model, cond, [1, 2, 3], sampling=SAMPLING, return_logits=True)
    other = generate_tokens(model, cond, [1, 2, 3], sampling=SAMPLING, cache_spec=spec, return_logits=True)
    assert torch.equal(other.tokens, full.tokens)
    assert torch.equal(other.logits, full.logits)


def test_rho_one_sixth_on_24x24_holds_at_most_prefix_96_24_slots_and_never_grows():
    from lineray.models.generate import new_cache
    model = tiny_model(24)
    P, hd, L, heads = 1, model.config.head_dim, model.config.n_layer, model.local_heads
    rows = 2  # one image with CFG
    limit = L * rows * heads * (P + 96 + 24) * hd * 2 * torch.float32.itemsize
    cache = new_cache(model, CacheSpec("linear", rho=1 / 6), rows, True)
    seen = []
    generate_tokens(model, Condition.classes([1]), [1], sampling=SAMPLING, cache=cache,
                    on_step=lambda i: seen.append((cache.n, cache.memory().kv_bytes, cache.k.data_ptr())))
    assert cache.capacity == P + 96 + 24
    assert {b for _, b, _ in seen} == {limit}  # allocated once, never regrown
    assert len({ptr for _, _, ptr in seen}) == 1
    assert max(n for n, _, _ in seen) <= P + 96 + 24
    assert min(n for n, _, _ in seen[100:]) >= P + 96  # the budget is really used, not just allocated
    full = new_cache(model, CacheSpec(), rows, True).memory().kv_bytes
    assert full == L * rows * heads * (P + 576) * hd * 2 * torch.float32.itemsize
    assert limit / full < 0.22


def test_memory_report_matches_tensor_storage():
    model = tiny_model(16)
    gen = generate_tokens(model, Condition.classes([1, 2]), [1, 2], sampling=SAMPLING,
                          cache_spec=CacheSpec("heavy_hitter", lines=4))
    c, m = gen.cache, gen.cache.memory()
    assert m.kv_bytes == c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size()
    assert m.kv_bytes_per_layer * model.config.n_layer == m.kv_bytes
    assert m.meta_bytes == c.pos.numel() * 4 + c.scores.numel() * 4
    assert (m.rows, m.heads, m.slots) == (4, 4, 1 + 5 * 16)


# -- eviction on hand-made scores ----------------------------------------------------------------
def hand_cache(spec: CacheSpec, grid=(6, 4), rows=2, heads=2, layers=1, prefix=2, cfg_rows=False):
    h, w = grid
    cache = KVCache(spec.plan(h, w), n_layers=layers, rows=rows, heads=heads, head_dim=4, prefix_len=prefix,
                    dtype=torch.float32, cfg_rows=cfg_rows)
    cache.reset()
    q = torch.zeros(rows, heads, prefix, 4)
    cache.attend(0, q, q, q)
    cache.advance(prefix)
    return cache


def write_token(cache, grid_index):
    """Append a token whose K and V carry its grid index, so we can see they move with it."""
    rows, heads = cache.rows, cache.heads
    kv = torch.full((rows, heads, 1, 4), float(grid_index))
    for layer in range(cache.k.size(0)):
        cache.attend(layer, torch.zeros(rows, heads, 1, 4), kv, kv)


def fill_lines(cache, n_lines, score_fn):
    """Generate n_lines lines; before each line end, overwrite the scores with score_fn(grid_index)."""
    w = cache.plan.grid_w
    for i in range(n_lines * w):
        write_token(cache, i)
        if (i + 1) % w == 0 and cache.scores is not None:
            P = cache.prefix_len
            pos = cache.pos[..., P:cache.n + 1]
            cache.scores[..., P:cache.n + 1] = score_fn(pos.float())
        cache.advance(1)


def test_eviction_keeps_condition_recent_lines_and_top_scores():
    # 6x4 grid, budget 3 lines (12 tokens), R = 1: after line 3 the 16 tokens shrink to 12.
    cache = hand_cache(CacheSpec("linear", lines=3, recent_lines=1))
    favourite = {1, 2, 5, 6, 9, 10, 13, 14}  # a known pattern: the middle columns of each line score high
    fill_lines(cache, 4, lambda p: torch.where(torch.isin(p, torch.tensor(sorted(favourite)).float()), 10.0 + p, p / 100))
    kept = cache.kept_positions(0)
    # 12 kept = last line (12..15) + the 8 best of lines 0..2 = the favourites there
    # 6 favourites of lines 0..2, then the 2 best leftovers (score p/100: 11 and 8), then line 3
    want = sorted({1, 2, 5, 6, 9, 10, 11, 8, 12, 13, 14, 15})
    for r in range(2):
        for h in range(2):
            assert kept[r, h].tolist() == want
    assert cache.n == 2 + 12
    # K and V moved with their tokens, and the condition slots are untouched
    assert torch.equal(cache.k[0, 0, 0, 2:14, 0], torch.tensor(want, dtype=torch.float32))
    assert torch.equal(cache.v[0, 1, 1, 2:14, 0], torch.tensor(want, dtype=torch.float32))
    assert (cache.pos[0, :, :, :2] == -1).all()


def test_selection_is_per_row_and_head_by_default_and_shared_when_asked():
    def per_head_scores(p):
        s = torch.zeros_like(p)
        s[:, :, 0] = p[:, :, 0]  # head 0 prefers recent tokens
        s[:, :, 1] = -p[:, :, 1]  # head 1 prefers old tokens
        return s
    cache = hand_cache(CacheSpec("linear", lines=2, recent_lines=1))
    fill_lines(cache, 3, per_head_scores)
    kept = cache.kept_positions(0)
    assert kept[0, 0].tolist() == [4, 5, 6, 7, 8, 9, 10, 11]  # after 2 evictions head 0 keeps line 1
    assert kept[0, 1].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]  # head 1 keeps line 0

    agg = hand_cache(CacheSpec("linear", lines=2, recent_lines=1, head_aggregate=True))
    fill_lines(agg, 3, lambda p: per_head_scores(p) * torch.tensor([1.0, 2.0]).view(1, 1, 2, 1))
    k = agg.kept_positions(0)
    assert torch.equal(k[:, 0], k[:, 1])  # one choice for both heads, led by head 1 (weight 2)
    assert k[0, 0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]


def test_cfg_rows_share_the_conditional_rows_choice():
    def row_scores(p):
        s = p.clone()
        s[:, 1] = -p[:, 1]  # the unconditional row would choose differently
        return s
    indep = hand_cache(CacheSpec("linear", lines=2), rows=2, cfg_rows=True)
    fill_lines(indep, 3, row_scores)
    assert not torch.equal(indep.kept_positions(0)[0], indep.kept_positions(0)[1])
    shared = hand_cache(CacheSpec("linear", lines=2, cfg_shared=True), rows=2, cfg_rows=True)
    fill_lines(shared, 3, row_scores)
    assert torch.equal(shared.kept_positions(0)[0], shared.kept_positions(0)[1])


def test_anchor_line_window_and_heavy_hitter():
    anchored = hand_cache(CacheSpec("linear", lines=3, anchor_lines=1, recent_lines=1))
    fill_lines(anchored, 6, lambda p: p)  # recent tokens always win, but line 0 is an anchor
    assert anchored.kept_positions(0)[0, 0].tolist() == [0, 1, 2, 3, 16, 17, 18, 19, 20, 21, 22, 23]

    window = hand_cache(CacheSpec("window", lines=2))
    fill_lines(window, 5, lambda p: -p)  # scores are ignored: the last two lines stay
    assert window.scores is None  # no score buffer is even allocated
    assert window.kept_positions(0)[1, 1].tolist() == list(range(12, 20))

    # heavy hitter: scores accumulate over lines; an old token that was hot once stays
    hh = hand_cache(CacheSpec("heavy_hitter", lines=2, recent_lines=1))
    hh.reset()
    hh.attend(0, *(torch.zeros(2, 2, 2, 4),) * 3)
    hh.advance(2)
    w = 4
    for i in range(5 * w):
        write_token(hh, i)
        if i == 3:  # token 0 gets a big score once, in line 0
            hh.scores[..., 2] += 50.0
        hh.scores[..., 2:hh.n + 1] += 0.01
        hh.advance(1)
    assert 0 in hh.kept_positions(0)[0, 0].tolist()


def test_score_decay_keeps_a_fading_share_of_older_lines_attention():
    # 4-wide grid, budget 3 lines, R = 1: at the end of line 3, 8 of lines 0-2's 12 tokens stay. Token 1
    # is attended hard (10 in all) while line 0 is written, never after; lines 1 and 2 get 0.1 per query
    # from then on. LineAR as published (decay 0) scores by line 3's attention only: lines 1-2 win, token 1
    # goes. Carried over at decay 0.5, token 1 still has 10 * 0.5**3 = 1.25 at line 3's end, more than
    # any token of lines 1-2 (<= 0.4 + 0.2 + 0.1), and stays.
    def run(decay):
        cache = hand_cache(CacheSpec("linear", lines=3, recent_lines=1, score_decay=decay))
        cache.reset()
        cache.attend(0, *(torch.zeros(2, 2, 2, 4),) * 3)
        cache.advance(2)
        for i in range(4 * 4):  # four lines: one eviction, at the end of line 3
            write_token(cache, i)
            if i < 4:  # line 0 being written: token 1 is the hot one
                cache.scores[..., 3] += 10.0 / 4
            else:  # afterwards lines 1 and 2 (grid 4..11, wherever their slots are) get 0.1 a query
                held = cache.pos[..., :cache.n + 1]
                cache.scores[..., :cache.n + 1] += 0.1 * ((held >= 4) & (held < 12)).float()
            cache.advance(1)
        return cache.kept_positions(0)[0, 0].tolist()

    assert run(0.0) == list(range(4, 16))
    kept = run(0.5)
    assert 1 in kept and len(kept) == 12 and kept[-4:] == [12, 13, 14, 15]


def test_linear_with_its_full_score_kept_is_heavy_hitter_with_linear_layout():
    # decay 1 accumulates every query's attention, as heavy_hitter's score does: with the same layout
    # (one recent line, the rest scored) the two policies keep the same tokens and sample the same image.
    model = tiny_model(8)
    cond = Condition.classes([1, 2, 3])
    carried = generate_tokens(model, cond, [1, 2, 3], sampling=SAMPLING, return_logits=True,
                              cache_spec=CacheSpec("linear", lines=3, score_decay=1.0))
    hh = generate_tokens(model, cond, [1, 2, 3], sampling=SAMPLING, return_logits=True,
                         cache_spec=CacheSpec("heavy_hitter", lines=3, recent_lines=1))
    forgetting = generate_tokens(model, cond, [1, 2, 3], sampling=SAMPLING, return_logits=True,
                                 cache_spec=CacheSpec("linear", lines=3))
    assert torch.equal(carried.logits, hh.logits) and torch.equal(carried.tokens, hh.tokens)
    assert not torch.equal(carried.logits, forgetting.logits)  # the score matters at this budget


def test_score_pooling_favours_neighbourhoods():
    # 4-wide grid; line 0 (tokens 0-3) scores 1, token 5 scores 3, the rest 0. Budget 3 lines, R=2:
    # 4 of tokens 0..7 survive. Alone, 5 and three of 0..3 win. Summed over 3x3 neighbourhoods,
    # 1, 2, 5 and 6 score 6 and win: 6 (score 0 itself) sits inside the hot region, 0 and 3 on its edge.
    def scores(p):
        s = torch.zeros_like(p)
        s[p == 5] = 3.0
        for t in (0, 1, 2, 3):
            s[p == t] = 1.0
        return s
    plain = hand_cache(CacheSpec("linear", lines=3, recent_lines=2))
    fill_lines(plain, 4, scores)
    pooled = hand_cache(CacheSpec("linear", lines=3, recent_lines=2, pool=3))
    fill_lines(pooled, 4, scores)
    plain_mid = set(plain.kept_positions(0)[0, 0].tolist()[:4])
    assert 5 in plain_mid and 6 not in plain_mid and len(plain_mid & {0, 1, 2, 3}) == 3
    assert set(pooled.kept_positions(0)[0, 0].tolist()[:4]) == {1, 2, 5, 6}


# -- configuration errors ------------------------------------------------------------------------
@pytest.mark.parametrize("kw,message", [
    (dict(policy="linear", rho=0.0), r"rho must be in \(0, 1\]"),
    (dict(policy="linear", rho=1.5), r"rho must be in \(0, 1\]"),
    (dict(policy="linear", lines=1, recent_lines=2), "smaller than the protected lines"),
    (dict(policy="linear", lines=2, recent_lines=1, anchor_lines=2), "smaller than the protected lines"),
    (dict(policy="linear"), "needs a budget"),
    (dict(policy="linear", rho=0.5, lines=3), "not both"),
    (dict(policy="lru", rho=0.5), "unknown cache policy 'lru'"),
    (dict(policy="linear", rho=0.5, pool=2), "pool must be an odd size"),
    (dict(policy="linear", lines=0), "cache lines must be >= 1"),
    (dict(policy="linear", rho=0.5, score_decay=1.5), r"score_decay must be in \[0, 1\]"),
    (dict(policy="heavy_hitter", rho=0.5, score_decay=0.5), "score_decay applies to the linear policy"),
])
def test_invalid_settings_fail_at_configuration(kw, message):
    with pytest.raises(CacheConfigError, match=message):
        CacheSpec(**kw).plan(24, 24, 576)


def test_grid_must_match_the_model():
    with pytest.raises(CacheConfigError, match="grid 16x16 does not match the model's 576 image tokens"):
        CacheSpec("linear", rho=0.25).plan(16, 16, 576)


def test_yaml_style_spec_and_budget_rounding():
    spec = CacheSpec.from_dict({"policy": "linear", "rho": "1/6"})
    assert spec.rho == pytest.approx(1 / 6)
    assert spec.plan(24, 24).budget == 96 and spec.plan(24, 24).visual_capacity == 120
    assert CacheSpec.from_dict({"policy": "linear", "rho": "1/4"}).plan(24, 24).budget == 144
    assert CacheSpec.from_dict({"policy": "linear", "rho": "1/8"}).plan(48, 49).budget == 294  # Lumina-768 rows
    with pytest.raises(CacheConfigError, match="unknown cache setting"):
        CacheSpec.from_dict({"policy": "linear", "ratio": 0.2})
    with pytest.raises(CacheConfigError, match="fraction like 1/6"):
        CacheSpec.from_dict({"policy": "linear", "rho": "one sixth"})


# -- memory-aware batch sizing -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["GPT-B", "GPT-XL", "GPT-3B", "GPT-tiny"])
def test_param_count_matches_the_model(name):
    from lineray.models.config import preset
    from lineray.models.transformer import Transformer
    from lineray.models.sizing import param_count
    for mt in ("c2i", "t2i"):
        cfg = preset(name, model_type=mt)
        with torch.device("meta"):
            model = Transformer(cfg)
        assert param_count(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("spec", [CacheSpec(), CacheSpec("linear", rho=1 / 6), CacheSpec("window", lines=2)])
def test_planned_kv_bytes_equal_the_allocated_cache(spec):
    from lineray.models.generate import new_cache
    from lineray.models.sizing import memory_plan
    model = tiny_model(24)
    cache = new_cache(model, spec, rows=2 * 3, use_cfg=True)
    plan = memory_plan(model.config, spec, torch.float32)
    assert plan.kv_bytes_per_image * 3 == cache.memory().kv_bytes
    assert plan.meta_bytes_per_image * 3 == cache.memory().meta_bytes


def some_condition(model, n):
    cfg = model.config
    if cfg.model_type == "c2i":
        return Condition.classes([i % cfg.num_classes for i in range(n)])
    mask = torch.ones(n, cfg.cls_token_num, dtype=torch.bool)
    mask[0, :3] = False
    return Condition(captions=torch.randn(n, cfg.cls_token_num, cfg.caption_dim), caption_mask=mask)


@pytest.mark.parametrize("model_type,spec", [
    ("c2i", CacheSpec()), ("c2i", CacheSpec("linear", rho=1 / 4, pool=3)),
    ("c2i", CacheSpec("heavy_hitter", rho=1 / 4)), ("t2i", CacheSpec("linear", rho=1 / 4, head_aggregate=True))])
def test_planned_memory_covers_the_measured_peak(model_type, spec):
    """Cache + every temporary of a whole batch (prefill, steps, line-end evictions) stays within the
    plan, and the plan is not padded into uselessness. 6 layers: an eviction that gathered all layers
    at once (as it once did) would overshoot."""
    from lineray.models.sizing import memory_plan
    model = tiny_model(8, model_type, n_layer=6)
    n = 4
    cond = some_condition(model, n)
    measured = peak_allocated_bytes(lambda: generate_tokens(model, cond, list(range(n)), sampling=SAMPLING,
                                                            cache_spec=spec))
    planned = memory_plan(model.config, spec, torch.float32, tp=1).bytes_per_image * n
    assert 0.6 * planned <= measured <= planned, (measured, planned)


def test_a_cache_for_another_batch_size_frees_the_old_one_first():
    from lineray.models.generate import new_cache
    from lineray.models.sizing import memory_plan
    model, spec = tiny_model(8, n_layer=6), CacheSpec("linear", rho=1 / 4)

    def two_batches():  # the profiler sees a free only of what it saw allocated: both inside
        cache = new_cache(model, spec, rows=2 * 3, use_cfg=True)
        generate_tokens(model, some_condition(model, 3), [1, 2, 3], sampling=SAMPLING, cache=cache)
        generate_tokens(model, some_condition(model, 5), list(range(5)), sampling=SAMPLING, cache=cache)
        assert cache.rows == 10

    assert peak_allocated_bytes(two_batches) <= memory_plan(model.config, spec, torch.float32).bytes_per_image * 5


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name,model_type", [("GPT-B", "c2i"), ("GPT-tiny", "t2i")])
def test_planned_weights_are_what_a_rank_holds(name, model_type, tp):
    """Split layers are divided by tp, embeddings and norms are whole on every rank, RoPE is fp32."""
    from lineray.models.config import preset
    from lineray.models.layers import TPGroup
    from lineray.models.transformer import Transformer
    from lineray.models.sizing import memory_plan
    cfg = preset(name, model_type=model_type)
    with torch.device("meta"):
        rank0 = Transformer(cfg, TPGroup(rank=0, size=tp)).to(torch.bfloat16)
    held = sum(t.numel() * t.element_size() for t in [*rank0.parameters(), *rank0.buffers()])
    assert memory_plan(cfg, CacheSpec(), torch.bfloat16, tp=tp).weights_bytes == held
    if name == "GPT-B" and tp == 2:  # fp32: 237 MiB, not 211 (the embeddings are not split)
        assert round(memory_plan(cfg, CacheSpec(), torch.float32, tp=2).weights_bytes / 2**20) == 237


def test_largest_batch_under_a_cap_grows_with_compression():
    from lineray.models.config import preset
    from lineray.models.sizing import largest_batch, memory_plan
    cfg = preset("GPT-XL", grid_size=24)
    cap = memory_plan(cfg, CacheSpec()).weights_bytes + 8 * 2**30  # 8 GiB beside the bf16 weights
    full = largest_batch(cfg, CacheSpec(), cap)
    lin = largest_batch(cfg, CacheSpec("linear", rho=1 / 6), cap)
    assert full > 0 and lin >= 4 * full
    assert largest_batch(cfg, CacheSpec(), memory_plan(cfg, CacheSpec()).weights_bytes) == 0
