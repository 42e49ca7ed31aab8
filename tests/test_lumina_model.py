"""Lumina-mGPT on lineray against transformers' Chameleon (a tiny random ChameleonForConditionalGeneration):
per-position logits, and the generation procedure against a reference loop written here from
MODELS.md B3 (Lumina's inference_solver: forced end-of-line / end-of-image, only image codes at image
positions, CFG with a separate unconditional sequence that starts at begin-of-image)."""
from dataclasses import replace

import pytest
import torch

from lineray.cache import CacheSpec
from lineray.kernels.sampling import SamplingConfig
from lineray.models.generate import Condition, generate_tokens, new_cache
from lineray.models.lumina.folder import load_model
from lineray.models.lumina.model import NOT_AN_IMAGE_CODE, image_codes, token_stream
from lineray.models.lumina.prompt import ImageSize, LuminaPromptEncoder
from lumina_fixtures import build_tiny_lumina

PROMPTS = ["a red fox in snow", "blue cat sits on the mat under the big sky", "green tree"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_lumina(tmp_path_factory.mktemp("lumina"))


def lineray_model(folder, size="64x64", **overrides):
    rows, cols = ImageSize.parse(size).grid
    return load_model(folder, grid_size=rows, grid_w=None if rows == cols else cols, max_prefix_len=40, **overrides)


# -- the LM --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["hf", "lumina"])
def test_per_position_logits_equal_transformers(tiny, layout):
    """Every position's logits (model.model + lm_head, before transformers masks the image tokens)."""
    folder = getattr(tiny, layout)
    ids = torch.tensor([[0, 40, 41, 42, 50, 23, 25, 24, 26, 9, 4, 17, 27, 30, 11, 26, 5]])
    with torch.no_grad():
        want = tiny.model.lm_head(tiny.model.model(input_ids=ids).last_hidden_state)
    # the whole vocabulary as head: every logit compared
    full, _ = lineray_model(folder, image_token_range=(0, 96), vocab_size=96)
    with torch.no_grad():
        got = full(ids[:, :1], ids[:, 1:])
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff < 1e-4, diff
    # the generation head: image-code rows only, everything else NOT_AN_IMAGE_CODE
    model, vocab = lineray_model(folder)
    with torch.no_grad():
        img = model(ids[:, :1], ids[:, 1:])
    assert img.shape[-1] == vocab.end_of_line + 1
    codes = slice(vocab.image_start, vocab.image_stop)
    assert (img[..., codes] - want[..., codes]).abs().max() < 1e-4
    assert (img[..., :vocab.image_start] == NOT_AN_IMAGE_CODE).all() and (img[..., vocab.image_stop:] == NOT_AN_IMAGE_CODE).all()


# -- the generation procedure ----------------------------------------------------------------------------
def reference_stream(hf, tokenizer_path, prompt: str, size: ImageSize, cfg_scale: float) -> list[int]:
    """Lumina's generation, greedy, from MODELS.md B3 with transformers' ChameleonModel + lm_head:
    the conditional sequence BOS + template + end-of-turn + [BOI, h, w]; the unconditional one
    [BOI, h, w] with its own cache and positions from 0; each step g*(cond - uncond) + uncond, then
    non-image tokens suppressed; end-of-line forced after every W codes, end-of-image after the last line."""
    from tokenizers import Tokenizer
    from transformers import DynamicCache
    tok = Tokenizer.from_file(str(tokenizer_path))
    tid = tok.token_to_id
    text = f"Generate an image of {size.width}x{size.height} according to the following prompt:\n{prompt}<reserved08706>"
    head = [tid("<racm3:break>"), tid(f"<reserved{8800 + size.height // 32:05d}>"),
            tid(f"<reserved{8800 + size.width // 32:05d}>")]
    cond_ids = [tid("<s>")] + tok.encode(text, add_special_tokens=False).ids + head
    image_ids = torch.tensor(sorted(i for n, i in tok.get_vocab().items() if n.startswith("IMGIMG")))
    rows, cols = size.height // 16, size.width // 16

    def run(ids, cache):
        with torch.no_grad():
            h = hf.model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True).last_hidden_state
            return hf.lm_head(h[0, -1])

    cond_cache, uncond_cache = DynamicCache(config=hf.config), DynamicCache(config=hf.config)
    cond = run(cond_ids, cond_cache)
    uncond = run(head, uncond_cache) if cfg_scale != 1.0 else None
    out = list(head)
    n = rows * (cols + 1)
    for i in range(n):
        if (i + 1) % (cols + 1) == 0:
            t = tid("<reserved08799>")
        else:
            g = cond if uncond is None else cfg_scale * (cond - uncond) + uncond
            allowed = torch.full_like(g, float("-inf"))
            allowed[image_ids] = g[image_ids]
            t = int(allowed.argmax())
        out.append(t)
        if i + 1 < n:
            cond = run([t], cond_cache)
            if uncond is not None:
                uncond = run([t], uncond_cache)
    return out + [tid("<eoss>")]


def generate(model, vocab, enc, prompts, size, cfg_scale, spec=CacheSpec(), seeds=None, **kw):
    ids = enc.encode(prompts, size)
    gen = generate_tokens(model, Condition.prompts(ids), seeds or list(range(len(ids))),
                          sampling=SamplingConfig(cfg_scale=cfg_scale, temperature=0.0), cache_spec=spec, **kw)
    return ids, gen


@pytest.mark.parametrize("size", ["64x64", "96x64", "64x96"])
@pytest.mark.parametrize("cfg_scale", [3.0, 1.0])
def test_greedy_tokens_equal_the_reference_loop(tiny, size, cfg_scale):
    size = ImageSize.parse(size)
    model, vocab = lineray_model(tiny.lumina, str(size))
    enc = LuminaPromptEncoder.from_folder(tiny.lumina)
    ids, gen = generate(model, vocab, enc, PROMPTS[:2], size, cfg_scale)
    rows, cols = size.grid
    assert gen.tokens.shape == (2, rows * (cols + 1))
    for r, prompt in enumerate(PROMPTS[:2]):
        stream = token_stream(gen.tokens[r], ids[r], vocab.end_of_image).tolist()
        assert stream == reference_stream(tiny.model, tiny.lumina / "tokenizer.json", prompt, size, cfg_scale)
        # the layout: BOI, h, w; W codes then end-of-line, H times; end-of-image
        assert stream[:3] == [vocab.begin_of_image, vocab.size_id(size.height // 32), vocab.size_id(size.width // 32)]
        assert stream[-1] == vocab.end_of_image
        lines = torch.tensor(stream[3:-1]).view(rows, cols + 1)
        assert (lines[:, -1] == vocab.end_of_line).all()
        assert ((lines[:, :-1] >= vocab.image_start) & (lines[:, :-1] < vocab.image_stop)).all()
    codes = image_codes(gen.tokens, model.config, vocab)
    assert codes.shape == (2, rows, cols) and codes.max() < vocab.image_count
    assert len(set(codes.flatten().tolist())) > 3  # not a degenerate constant image


def test_sampled_tokens_keep_the_layout(tiny):
    model, vocab = lineray_model(tiny.lumina, "96x64")
    enc = LuminaPromptEncoder.from_folder(tiny.lumina)
    ids = enc.encode(PROMPTS[:2], "96x64")
    gen = generate_tokens(model, Condition.prompts(ids), [7, 8], sampling=SamplingConfig(cfg_scale=4.0, top_k=2000))
    lines = gen.tokens.view(2, 4, 7)
    assert (lines[..., -1] == vocab.end_of_line).all()
    assert ((lines[..., :-1] >= vocab.image_start) & (lines[..., :-1] < vocab.image_stop)).all()
    again = generate_tokens(model, Condition.prompts(ids[1:]), [8], sampling=SamplingConfig(cfg_scale=4.0, top_k=2000))
    assert torch.equal(again.tokens[0], gen.tokens[1])  # the seeds contract with text prompts


# -- caches and batches --------------------------------------------------------------------------------
@pytest.mark.parametrize("step_mode", ["dynamic", "static"])
def test_linear_with_a_budget_covering_the_image_equals_full(tiny, step_mode):
    model, vocab = lineray_model(tiny.lumina, "96x64")
    enc = LuminaPromptEncoder.from_folder(tiny.lumina)
    _, full = generate(model, vocab, enc, PROMPTS, "96x64", 3.0, return_logits=True, step_mode=step_mode)
    _, lin = generate(model, vocab, enc, PROMPTS, "96x64", 3.0, CacheSpec("linear", rho=1.0), return_logits=True,
                      step_mode=step_mode)
    assert torch.equal(full.tokens, lin.tokens)
    torch.testing.assert_close(lin.logits, full.logits, atol=1e-5, rtol=1e-5)


def test_linear_slots_hold_whole_lines_with_their_end_of_line(tiny):
    """rho 1/4 of a 4-line 96x64 image: a line is W + 1 = 7 tokens (codes + end-of-line); the cache
    keeps the prefix + 1 line and the line being written, never more, at every step."""
    model, vocab = lineray_model(tiny.lumina, "96x64")
    enc = LuminaPromptEncoder.from_folder(tiny.lumina)
    spec = CacheSpec("linear", rho="1/4")
    cache = new_cache(model, spec, rows=2 * len(PROMPTS), use_cfg=True)
    plan = cache.plan
    assert (plan.grid_w, plan.budget_lines, plan.budget, plan.visual_capacity) == (7, 1, 7, 14)
    assert cache.capacity == 40 + 14  # max_prefix_len + visual capacity
    visual = []
    ids, gen = generate(model, vocab, enc, PROMPTS, "96x64", 3.0, spec, cache=cache, step_mode="dynamic",
                        on_step=lambda i: visual.append(cache.n - cache.prefix_len))
    # visual slots filled when token i is sampled (before it is written): two lines fill up to 14 slots,
    # then every line end keeps one whole line of 7 (its end-of-line included) and evicts 7
    assert visual == list(range(14)) + list(range(7, 14)) * 2
    assert cache.n - cache.prefix_len <= plan.visual_capacity
    _, full = generate(model, vocab, enc, PROMPTS, "96x64", 3.0)
    assert gen.tokens.shape == full.tokens.shape
    lines = gen.tokens.view(3, 4, 7)
    assert (lines[..., -1] == vocab.end_of_line).all()


def test_mixed_length_batch_equals_each_prompt_alone(tiny):
    model, vocab = lineray_model(tiny.lumina, "64x64")
    enc = LuminaPromptEncoder.from_folder(tiny.lumina)
    for spec in (CacheSpec(), CacheSpec("linear", rho="1/2")):
        ids, batch = generate(model, vocab, enc, PROMPTS, "64x64", 3.0, spec, seeds=[1, 2, 3])
        assert len({len(i) for i in ids}) == 3
        for r, prompt in enumerate(PROMPTS):
            _, alone = generate(model, vocab, enc, [prompt], "64x64", 3.0, spec, seeds=[r + 1])
            assert torch.equal(alone.tokens[0], batch.tokens[r]), (spec.policy, r)


# -- decoding --------------------------------------------------------------------------------------------
def test_generated_tokens_decode_through_the_vqgan(tiny, tmp_path):
    """Greedy tokens -> Meta-layout VQGAN beside the folder -> images of the requested (non-square) size,
    equal to the functional VQGAN reference on the codes the reference loop's tokens name."""
    from test_vqgan import DDCONFIG, reference_decode, write_meta_files

    from lineray.images import to_uint8
    from lineray.models.lumina.folder import LuminaFolderError, load_vq_decoder
    from lumina_fixtures import CODE_POSITION, IMAGE_START, N_CODES
    with pytest.raises(LuminaFolderError, match="no Chameleon VQGAN"):
        load_vq_decoder(tiny.lumina)
    sd = write_meta_files(tmp_path, DDCONFIG, n_embed=N_CODES, embed_dim=8)
    decoder = load_vq_decoder(tiny.lumina, tmp_path)
    size = ImageSize.parse("96x64")
    model, vocab = lineray_model(tiny.lumina, str(size))
    enc = LuminaPromptEncoder.from_folder(tiny.lumina)
    _, gen = generate(model, vocab, enc, PROMPTS[:2], size, 3.0)
    images = decoder.decode_codes(gen.tokens.view(2, model.config.grid_h, model.config.line_tokens))
    assert images.shape == (2, 3, 64, 96)
    code_of_id = {IMAGE_START + CODE_POSITION[c]: c for c in range(N_CODES)}  # the fixture's names, not vocab.py
    for r, prompt in enumerate(PROMPTS[:2]):
        stream = reference_stream(tiny.model, tiny.lumina / "tokenizer.json", prompt, size, 3.0)
        lines = torch.tensor(stream[3:-1]).view(4, 7)[:, :6]
        codes = torch.tensor([[code_of_id[int(t)] for t in row] for row in lines])
        torch.testing.assert_close(images[r:r + 1], reference_decode(sd, codes[None], DDCONFIG), atol=2e-5, rtol=1e-4)
    pixels = to_uint8(images)
    assert pixels.shape == (2, 64, 96, 3)


# -- sizes -------------------------------------------------------------------------------------------------
def test_a_grid_view_equals_the_model_built_at_that_grid(tiny):
    """Transformer.for_grid: one loaded model makes 64x96 images exactly as a model built at 64x96 does, and
    stays a 96x64 model itself (its own forced end-of-line positions untouched)."""
    model, vocab = lineray_model(tiny.lumina, "96x64")
    built, _ = lineray_model(tiny.lumina, "64x96")
    enc = LuminaPromptEncoder.from_folder(tiny.lumina)
    view = model.for_grid(6, 4)
    assert view.config == built.config and view.output is model.output and model.for_grid(6, 4) is view
    for spec in (CacheSpec(), CacheSpec("linear", rho="1/3")):
        _, want = generate(built, vocab, enc, PROMPTS, "64x96", 3.0, spec, seeds=[1, 2, 3])
        _, got = generate(view, vocab, enc, PROMPTS, "64x96", 3.0, spec, seeds=[1, 2, 3])
        assert torch.equal(got.tokens, want.tokens)
    _, own = generate(model, vocab, enc, PROMPTS[:1], "96x64", 3.0)
    assert own.tokens.shape == (1, 4 * 7) and (own.tokens.view(4, 7)[:, -1] == vocab.end_of_line).all()
    with pytest.raises(ValueError, match="larger than this model makes"):
        model.for_grid(64, 64)  # 1024x1024 on a 768 model
    with pytest.raises(ValueError, match="more than 4:1"):
        model.for_grid(2, 10)


def sample_reference(hf, tokenizer_path, prompt: str, template_size: ImageSize, seed: int, cfg_scale: float,
                     sampling: SamplingConfig, target_px: int) -> list[int]:
    """Lumina's generation with the size drawn, from MODELS.md B3 + Corrections: after begin-of-image the height
    and width tokens are sampled from the conditional sequence alone (no CFG) under the image top-k at the
    temperature, restricted (lineray's rule) to the target's crop sizes, with the uniforms of the image's size
    stream; then the image with CFG (the unconditional sequence starts at [BOI, h, w]) drawn with the image's
    uniforms. Returns [BOI, h, w, lines..., EOI]."""
    from tokenizers import Tokenizer
    from transformers import DynamicCache

    from lineray.kernels.sampling import image_uniforms, sample
    from lineray.models.lumina.model import size_uniforms
    from lineray.models.lumina.sizes import crop_sizes
    tok = Tokenizer.from_file(str(tokenizer_path))
    tid = tok.token_to_id
    size_id = {g: tid(f"<reserved{8800 + g:05d}>") for g in range(1, 7)}
    text = (f"Generate an image of {template_size.width}x{template_size.height} according to the following "
            f"prompt:\n{prompt}<reserved08706>")
    cond_ids = [tid("<s>")] + tok.encode(text, add_special_tokens=False).ids + [tid("<racm3:break>")]
    crops = [(s.height // 32, s.width // 32) for s in crop_sizes(target_px)]
    image_ids = torch.tensor(sorted(i for n, i in tok.get_vocab().items() if n.startswith("IMGIMG")))
    plain = SamplingConfig(cfg_scale=1.0, temperature=sampling.temperature, top_k=sampling.top_k)

    def run(ids, cache):
        with torch.no_grad():
            h = hf.model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True).last_hidden_state
            return hf.lm_head(h[0, -1])

    def draw_size(logits, allowed, u):  # over the size tokens in g order, the others suppressed
        g = torch.tensor([logits[size_id[k]] for k in range(1, 7)])
        g = torch.where(torch.tensor([k in allowed for k in range(1, 7)]), g, float("-inf"))
        return int(sample(g[None], u[None], plain)) + 1

    cond_cache = DynamicCache(config=hf.config)
    u_size = size_uniforms([seed])[0]
    h = draw_size(run(cond_ids, cond_cache), {a for a, _ in crops}, u_size[0])
    w = draw_size(run([size_id[h]], cond_cache), {b for a, b in crops if a == h}, u_size[1])
    head = [tid("<racm3:break>"), size_id[h], size_id[w]]
    rows, cols = 2 * h, 2 * w
    n = rows * (cols + 1)
    u = image_uniforms([seed], n)[0]
    cond = run([size_id[w]], cond_cache)
    uncond_cache = DynamicCache(config=hf.config)
    uncond = run(head, uncond_cache)
    out = list(head)
    for i in range(n):
        if (i + 1) % (cols + 1) == 0:
            t = tid("<reserved08799>")
        else:
            g = cfg_scale * (cond - uncond) + uncond
            allowed = torch.full_like(g, float("-inf"))
            allowed[image_ids] = g[image_ids]
            t = int(sample(allowed[None], u[i:i + 1], sampling))
        out.append(t)
        if i + 1 < n:
            cond, uncond = run([t], cond_cache), run([t], uncond_cache)
    return out + [tid("<eoss>")]


def test_sampled_sizes_equal_the_reference_loop(tiny):
    """size "sample": each seed draws its own size (at least two distinct in the batch, every one a crop size of
    the tiny model's 96 px target); each image's size tokens and image tokens equal the reference's, which
    generates it alone."""
    from lineray.models.lumina.sizes import crop_sizes
    from lineray.models.spec import ModelSpec
    from lineray.workers.replica import LocalReplica, ReplicaConfig, sample_sizes_then_generate
    sampling = SamplingConfig(cfg_scale=3.0, temperature=1.0, top_k=2000)
    spec = ModelSpec(preset="lumina-tiny", checkpoint=str(tiny.lumina), size="sample")
    replica = LocalReplica(ReplicaConfig(model=spec, sampling=sampling))
    enc = spec.prompt_encoder()
    vocab = enc.vocab
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[0]]
    seeds = [3, 4, 5, 6, 7, 8]
    ids = enc.encode(prompts, "sample")
    assert all(i[-1] == vocab.begin_of_image for i in ids)
    tokens, grids = sample_sizes_then_generate(replica, ids, seeds)
    assert len(set(grids)) >= 2, grids  # the grouping path runs
    crops = {s.grid for s in crop_sizes(96)}
    assert set(grids) <= crops
    for r, (prompt, seed) in enumerate(zip(prompts, seeds)):
        rows, cols = grids[r]
        assert tokens[r].shape == (rows * (cols + 1),)
        head = [vocab.begin_of_image, vocab.size_id(rows // 2), vocab.size_id(cols // 2)]
        stream = head + tokens[r].tolist() + [vocab.end_of_image]
        want = sample_reference(tiny.model, tiny.lumina / "tokenizer.json", prompt, ImageSize(96, 64), seed, 3.0,
                                sampling, 96)
        assert stream == want, r
