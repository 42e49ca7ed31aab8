"""The decode loop: prefill the condition, then one token per step through the KV cache.

Plain and synchronous (gpt-fast style). Rows are [cond; uncond] when CFG is on;
both halves are fed the same sampled token. The loop does not know the model's
family: a prefix of any kind (class label, caption features, prompt token ids
left-padded to the batch's longest) goes through `model.prefill`, the CFG null rows
come from `model.null_rows`, and each row keeps its own RoPE positions in the cache.
Every tensor-parallel rank runs this
same loop on its shard and samples the same token, because logits are gathered
before sampling and the uniforms come from each image's own seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lineray.cache import CacheSpec, KVCache
from lineray.kernels.sampling import SamplingConfig, guided_logits, image_uniforms, sample
from lineray.models.transformer import Transformer


class GenerationError(ValueError):
    """Bad generation input (labels, captions, prompts, seeds); the message says which."""


@dataclass
class Condition:
    """What each image is conditioned on: class labels (c2i), caption embeddings (t2i) or prompt
    token ids (text: left-padded to the batch's longest, with a mask)."""
    labels: torch.Tensor | None = None  # [B] int64
    captions: torch.Tensor | None = None  # [B, T, caption_dim]
    caption_mask: torch.Tensor | None = None  # [B, T] bool, True = real token
    prompt_ids: torch.Tensor | None = None  # [B, T] int64, left-padded
    prompt_mask: torch.Tensor | None = None  # [B, T] bool, True = real token

    @classmethod
    def classes(cls, labels) -> "Condition":
        return cls(labels=torch.as_tensor(list(labels) if not torch.is_tensor(labels) else labels, dtype=torch.long))

    @classmethod
    def prompts(cls, token_lists, pad_id: int = 0) -> "Condition":
        """Token id lists (a tokenizer's output, one per image) -> left-padded ids and their mask.
        The padding's id never matters (masked; pad_id only fills the slots)."""
        token_lists = [list(t) for t in token_lists]
        empty = [i for i, t in enumerate(token_lists) if not t]
        if empty:
            raise GenerationError(f"prompt {empty[0]} has no tokens")
        T = max((len(t) for t in token_lists), default=0)
        ids = torch.full((len(token_lists), T), pad_id, dtype=torch.long)
        mask = torch.zeros(len(token_lists), T, dtype=torch.bool)
        for r, t in enumerate(token_lists):
            ids[r, T - len(t):] = torch.as_tensor(t, dtype=torch.long)
            mask[r, T - len(t):] = True
        return cls(prompt_ids=ids, prompt_mask=mask)

    def __len__(self) -> int:
        for t in (self.labels, self.captions, self.prompt_ids):
            if t is not None:
                return len(t)
        return 0

    def select(self, idx) -> "Condition":
        pick = (lambda t: None if t is None else t[idx])
        return Condition(pick(self.labels), pick(self.captions), pick(self.caption_mask), pick(self.prompt_ids),
                         pick(self.prompt_mask))


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, N] int64
    logits: torch.Tensor | None  # [B, N, V] fp32 guided logits, when asked for
    cache: KVCache


def check_condition(model: Transformer, cond: Condition) -> None:
    cfg = model.config
    if len(cond) == 0:
        raise GenerationError("no prompts given: the batch is empty")
    if cfg.model_type == "c2i":
        if cond.labels is None:
            raise GenerationError("this is a class-conditional (c2i) model: give class labels")
        bad = cond.labels[(cond.labels < 0) | (cond.labels >= cfg.num_classes)]
        if len(bad):
            raise GenerationError(f"class id {int(bad[0])} is out of range: this model has "
                                  f"{cfg.num_classes} classes (0..{cfg.num_classes - 1})")
    elif cfg.model_type == "text":
        if cond.prompt_ids is None or cond.prompt_mask is None:
            raise GenerationError("this model is prompted with text: give prompt token ids (Condition.prompts)")
        T = cond.prompt_ids.size(1)
        if T > cfg.prefix_len:
            longest = int(cond.prompt_mask.sum(1).argmax())
            raise GenerationError(f"prompt {longest} has {T} tokens; this model takes at most {cfg.prefix_len} "
                                  f"(max_prefix_len)")
        bad = cond.prompt_ids[cond.prompt_mask & ((cond.prompt_ids < 0) | (cond.prompt_ids >= cfg.text_vocab_size))]
        if len(bad):
            raise GenerationError(f"prompt token id {int(bad[0])} is out of range: the text vocabulary has "
                                  f"{cfg.text_vocab_size} ids")
        if not cond.prompt_mask[:, -1].all():
            raise GenerationError("prompt token ids must be left-padded (Condition.prompts does it)")
    else:
        if cond.captions is None:
            raise GenerationError("this is a text-conditional (t2i) model: give caption embeddings")
        want = (cfg.cls_token_num, cfg.caption_dim)
        if tuple(cond.captions.shape[1:]) != want:
            raise GenerationError(f"caption embeddings must be [batch, {want[0]}, {want[1]}], "
                                  f"got {list(cond.captions.shape)}")


def condition_rows(model: Transformer, cond: Condition, use_cfg: bool):
    """The model input for the prefill rows, and the key mask over condition tokens (or None)."""
    device = model.device
    if model.config.model_type == "c2i":
        x, mask = cond.labels.to(device), None
    elif model.config.model_type == "text":
        x, mask = cond.prompt_ids.to(device), cond.prompt_mask.to(device=device, dtype=torch.bool)
    else:
        x = cond.captions.to(device=device, dtype=model.dtype)
        mask = None if cond.caption_mask is None else cond.caption_mask.to(device=device, dtype=torch.bool)
    if use_cfg:
        null, null_mask = model.null_rows(x, mask)
        x = torch.cat([x, null])
        if mask is not None:
            mask = torch.cat([mask, null_mask])
    return x, mask


def reusable_cache(cache: KVCache | None, model: Transformer, spec: CacheSpec) -> KVCache | None:
    """`cache` if it serves the model's grid (generate_tokens resizes it for the batch), else None: a replica drops
    its cache before a batch of another grid (Transformer.for_grid) allocates one, so the peak stays one cache."""
    if cache is not None and cache.plan != model.config.cache_plan(spec):
        return None
    return cache


def new_cache(model: Transformer, cache_spec: CacheSpec, rows: int, use_cfg: bool) -> KVCache:
    cfg = model.config
    return KVCache(cfg.cache_plan(cache_spec), n_layers=cfg.n_layer, rows=rows, heads=model.local_heads,
                   head_dim=cfg.head_dim, prefix_len=cfg.prefix_len, dtype=model.dtype, device=model.device,
                   cfg_rows=use_cfg, reduce_scores=model.tp.all_reduce if model.tp.size > 1 else None)


# -- the decode step ----------------------------------------------------------------------------
# "dynamic": attend over the filled slots only (shapes change every step; Python counters).
# "static": attend over the whole fixed capacity with a mask, counters in device tensors: one shape
#   per batch size. "compiled": the static step under torch.compile(fullgraph=True). "cuda_graph": the
#   static step captured once per cache and batch, then replayed (CUDA only).
# "auto": cuda_graph on CUDA; on CPU static for evicting caches and dynamic for a full one, whose
#   static step would attend over the whole image from the first token (benchmarks/decode_throughput.py).
STEP_MODES = ("auto", "dynamic", "static", "compiled", "cuda_graph")


def resolve_step_mode(mode: str, device: torch.device, cache: KVCache) -> str:
    if mode not in STEP_MODES:
        raise GenerationError(f"unknown decode step mode {mode!r}; choose one of {', '.join(STEP_MODES)}")
    if mode == "cuda_graph" and device.type != "cuda":
        raise GenerationError("step_mode cuda_graph needs a CUDA device")
    if mode != "auto":
        return mode
    if device.type == "cuda":
        return "cuda_graph"
    return "static" if cache.plan.evicts else "dynamic"


def decode_step(model: Transformer, cache: KVCache, tokens: torch.Tensor, uniforms: torch.Tensor,
                sampling: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One static-shape step: feed tokens [B] (the image token at grid index `cache.written`),
    then guide and sample the next one. Returns (guided logits [B, V] fp32, sampled tokens [B]).

    Every shape depends on the batch size only and no value goes back to the host, so this whole
    function compiles with fullgraph=True and replays as one CUDA graph. The caller runs
    `cache.commit_static()` after it (host counters, eviction at a line end).
    """
    rows = torch.cat([tokens, tokens]) if sampling.uses_cfg else tokens
    logits = model.decode_static(rows, cache)
    step = cache.written  # index of the token sampled now
    guided = guided_logits(logits, tokens.size(0), step, sampling)
    tok = sample(guided, uniforms.index_select(1, step.view(1)).squeeze(1), sampling)
    return guided, model.force_tokens(tok, step)


_compiled_steps: dict = {}


def compiled_decode_step(backend: str = "inductor"):
    """decode_step under torch.compile(fullgraph=True): a graph break is an error, not a slowdown.
    One compiled graph per batch size (cache) and sampling config; "aot_eager" traces without codegen."""
    if backend not in _compiled_steps:
        _compiled_steps[backend] = torch.compile(decode_step, fullgraph=True, backend=backend)
    return _compiled_steps[backend]


class CUDAGraphStep:
    """decode_step captured as one CUDA graph for a cache (its rows) and a sampling config; replayed
    with new tokens and uniforms copied into its static input buffers.

    Capture runs the step (warm-up) on the live cache, which is reset afterwards. Graphs live in
    `cache.graphs` and go with the cache's tensors (KVCache.resize drops them).
    """

    def __init__(self, model: Transformer, cache: KVCache, n_img: int, sampling: SamplingConfig):
        dev = cache.device
        self.tokens = torch.zeros(n_img, dtype=torch.long, device=dev)
        self.uniforms = torch.zeros(n_img, model.config.image_tokens, dtype=torch.float64, device=dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up: lazy inits and allocator pools outside the capture
            for _ in range(2):
                decode_step(model, cache, self.tokens, self.uniforms, sampling)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = decode_step(model, cache, self.tokens, self.uniforms, sampling)

    @classmethod
    def for_batch(cls, model: Transformer, cache: KVCache, n_img: int, sampling: SamplingConfig) -> "CUDAGraphStep":
        key = (id(model), n_img, sampling, cache.bias is not None)
        if key not in cache.graphs:
            cache.graphs[key] = cls(model, cache, n_img, sampling)
        return cache.graphs[key]

    def __call__(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.out


def static_step(mode: str, model: Transformer, cache: KVCache, uniforms: torch.Tensor, sampling: SamplingConfig,
                compile_backend: str = "inductor"):
    """tokens -> (guided logits, next tokens) for a static step mode, or None for "dynamic"."""
    if mode == "dynamic":
        return None
    if mode == "cuda_graph":
        graph = CUDAGraphStep.for_batch(model, cache, uniforms.size(0), sampling)
        graph.uniforms.copy_(uniforms)
        return graph
    fn = compiled_decode_step(compile_backend) if mode == "compiled" else decode_step
    return lambda tokens: fn(model, cache, tokens, uniforms, sampling)


@torch.inference_mode()
def generate_tokens(model: Transformer, cond: Condition, seeds: list[int] | None = None, *,
                    sampling: SamplingConfig = SamplingConfig(), cache_spec: CacheSpec = CacheSpec(),
                    teacher_tokens: torch.Tensor | None = None, return_logits: bool = False,
                    cache: KVCache | None = None, on_step=None, step_mode: str = "auto",
                    compile_backend: str = "inductor", pad_to: int | None = None) -> Generation:
    """Generate the image tokens of a batch.

    seeds: one per image (required unless teacher_tokens is given). teacher_tokens
    [B, N]: feed these instead of sampling (teacher forcing, for evaluation).
    cache: reuse a cache built by `new_cache` (resized in place, old tensors freed first, when
    the batch has another number of rows). on_step(i): called once token i is sampled, before it
    is written to the cache (for progress). step_mode: how decode steps run (STEP_MODES above);
    every mode gives the same tokens. compile_backend: torch.compile's backend for "compiled".
    pad_to: run a smaller batch padded to this many images (copies of its first image, dropped
    from the result). By default a CUDA-graph step pads a smaller (tail) batch to the batch its
    cache holds, so one captured graph serves every batch of a job.
    """
    check_condition(model, cond)
    cfg = model.config
    n_img, n_tok = len(cond), cfg.image_tokens
    device = model.device
    if pad_to is None and cache is not None and cache.cfg_rows == sampling.uses_cfg and (
            step_mode == "cuda_graph" or (step_mode == "auto" and device.type == "cuda")):
        pad_to = cache.rows // (2 if cache.cfg_rows else 1)
    if pad_to is not None and pad_to > n_img:
        # Images are independent (each has its own seed and rows), so padding changes none of them.
        fill = torch.cat([torch.arange(n_img), torch.zeros(pad_to - n_img, dtype=torch.long)])
        gen = generate_tokens(
            model, cond.select(fill), None if seeds is None else [seeds[int(j)] for j in fill],
            sampling=sampling, cache_spec=cache_spec, return_logits=return_logits, cache=cache,
            teacher_tokens=None if teacher_tokens is None else teacher_tokens[fill], on_step=on_step,
            step_mode=step_mode, compile_backend=compile_backend, pad_to=pad_to)
        return Generation(gen.tokens[:n_img], None if gen.logits is None else gen.logits[:n_img], gen.cache)
    if teacher_tokens is None:
        if seeds is None or len(seeds) != n_img:
            raise GenerationError(f"need one seed per image: {n_img} images, "
                                  f"{'no' if seeds is None else len(seeds)} seeds")
        uniforms = image_uniforms(seeds, n_tok, device)
    else:  # sampled tokens are discarded
        uniforms = torch.zeros(n_img, n_tok, dtype=torch.float64, device=device)
    x, key_mask = condition_rows(model, cond, sampling.uses_cfg)
    if cache is None:
        cache = new_cache(model, cache_spec, x.size(0), sampling.uses_cfg)
    else:
        cache.resize(x.size(0), sampling.uses_cfg)
    cache.reset(key_mask)
    step = static_step(resolve_step_mode(step_mode, device, cache), model, cache, uniforms, sampling,
                       compile_backend)
    if isinstance(step, CUDAGraphStep):
        cache.reset(key_mask)  # a first capture ran the step on the cache
    tokens = torch.empty(n_img, n_tok, dtype=torch.long, device=device)
    all_logits = torch.empty(n_img, n_tok, cfg.vocab_size, device=device) if return_logits else None
    logits = model.prefill(x, cache)
    for i in range(n_tok):
        if i == 0 or step is None:  # after the prefill, and every dynamic step
            if i > 0:
                logits = model.decode(torch.cat([tok, tok]) if sampling.uses_cfg else tok, cache)
            guided = guided_logits(logits, n_img, i, sampling)
            tok = model.force_tokens(sample(guided, uniforms[:, i], sampling), i)
        else:
            guided, tok = step(tok)
            cache.commit_static()
        if teacher_tokens is not None:
            tok = teacher_tokens[:, i].to(device)
        tokens[:, i] = tok
        if all_logits is not None:
            all_logits[:, i] = guided
        if on_step is not None:
            on_step(i)
    return Generation(tokens, all_logits, cache)
