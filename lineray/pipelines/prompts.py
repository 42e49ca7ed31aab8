"""One prompt row -> the images it asks for, or the reason it is rejected.

A row: `id` (required, unique), then `class` (class-conditional models), `text` /
`embedding` (LlamaGen t2i, caption features) or `prompt` (text-prompt families such as
Janus-Pro: the model reads token ids of the prompt), and optionally `seed`, `cfg`
(guidance scale), `count` (images for this prompt, default 1) and `size` (Lumina-mGPT:
"WIDTHxHEIGHT" or "sample"; default the job's model.size). A `prompt` row is
tokenized here, where it is checked (empty, longer than the model's context), so the
generators receive token ids and never tokenize (benchmarks/text_tokenization.py). Image k of a row gets the seed
`seed + k` when the row gives one, else a hash of (job seed, id, k): the output
never depends on batching, replica count or retries.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import numpy as np

from lineray.models.lumina.sizes import SAMPLE  # a row's size the model draws (Lumina-mGPT)

SEED_MASK = 2**63 - 1  # seeds stay non-negative int64 (Parquet, torch.Generator)
SAMPLED_GRID = (0, 0)  # the grid of an image whose size the model draws: known once generated


class RowError(ValueError):
    """A bad prompt row; the message is the reason recorded in the errors dataset."""


@dataclass(frozen=True)
class RowRules:
    """What a row must look like for this job's model."""
    model_type: str  # "c2i", "t2i" (caption embeddings) or "text" (prompt token ids)
    num_classes: int
    caption_tokens: int  # t2i: condition tokens (120 for LlamaGen)
    caption_dim: int  # t2i: caption feature size (2048 for FLAN-T5-XL)
    has_text_encoder: bool
    default_cfg: float
    job_seed: int
    max_count: int
    columns: tuple[tuple[str, str], ...] = ()  # (prompt field, the files' column name), from the job's `columns`
    max_prefix_len: int = 0  # "text": the most prompt tokens (template included) a row may have
    # "text": the family's PromptEncoder (encode(texts) -> token id lists); travels with the rules to the reader
    encoder: object = field(default=None, compare=False, repr=False)
    grid: tuple[int, int] = (0, 0)  # (rows, cols) of a row without `size`: the model's (or the job's model.size)
    default_size: str | None = None  # the job's model.size ("WxH", "sample") for rows without one; None: the model's

    @classmethod
    def for_job(cls, job) -> "RowRules":
        cfg = job.model.config()
        text = cfg.model_type == "text"
        return cls(model_type=cfg.model_type, num_classes=cfg.num_classes, caption_tokens=cfg.cls_token_num,
                   caption_dim=cfg.caption_dim, has_text_encoder=job.text_encoder is not None,
                   default_cfg=job.sampling.cfg_scale, job_seed=job.seed, max_count=job.max_count,
                   columns=tuple(sorted(job.columns.items())), max_prefix_len=cfg.max_prefix_len if text else 0,
                   encoder=job.model.prompt_encoder() if text else None,
                   grid=SAMPLED_GRID if job.model.samples_size else (cfg.grid_h, cfg.grid_width),
                   default_size=job.model.size)

    def row_size(self, record: dict) -> str | None:
        """The row's own image size, checked ("WxH" or "sample"); None: the job's."""
        value = record.get("size")
        if _missing(value):
            return None
        check = getattr(self.encoder, "check_size", None)
        if check is None:
            raise RowError(f"bad size {value!r}: this model makes images of one size; leave size out")
        try:
            return check(value)
        except ValueError as e:  # the family's PromptError names the rule
            raise RowError(f"bad size {value!r}: {e}") from None

    def grid_of(self, size: str | None) -> tuple[int, int]:
        """(rows, cols) of an image of this size; SAMPLED_GRID when the model draws it."""
        if size is None:
            return self.grid
        return SAMPLED_GRID if size == SAMPLE else self.encoder.grid(size)

    def rename(self, record: dict) -> dict:
        """The row with the files' column names mapped to the prompt fields (the mapping wins over a same-named column)."""
        if not self.columns:
            return record
        return {**record, **{name: record.get(column) for name, column in self.columns}}

    def prompt_ids(self, text: str, size: str | None = None) -> list[int]:
        return encode_prompt(self.encoder, text, self.max_prefix_len, size or self.default_size)


def encode_prompt(encoder, text: str, limit: int, size: str | None = None) -> list[int]:
    """A prompt's token ids (the family's template included, for an image of `size` when given: Lumina-mGPT);
    RowError if it is empty or longer than `limit`."""
    if not isinstance(text, str) or not text.strip():
        raise RowError("empty prompt")
    try:
        (ids,) = encoder.encode([text]) if size is None else encoder.encode([text], [size])
    except ValueError as e:  # the family's PromptError: it names the problem and the text's start
        raise RowError(str(e)) from None
    if len(ids) > limit:
        start = text if len(text) <= 40 else text[:40] + "..."
        raise RowError(f"prompt too long: {len(ids)} tokens with the template, this model takes at most {limit} "
                       f"({start!r})")
    return list(ids)


@dataclass
class Prompt:
    id: str
    label: int  # -1: none (t2i, text)
    text: str  # the caption (t2i) or the prompt (text); "": none
    embedding: np.ndarray | None  # [tokens, caption_dim] float32, t2i only
    seed: int | None
    cfg_scale: float
    count: int
    prompt_ids: list[int] | None = None  # "text": the prompt's token ids
    grid: tuple[int, int] = (0, 0)  # (rows, cols) of its images; SAMPLED_GRID: the model draws each one's size

    def image_seeds(self, job_seed: int) -> list[int]:
        if self.seed is not None:
            return [(self.seed + k) & SEED_MASK for k in range(self.count)]
        return [image_seed(job_seed, self.id, k) for k in range(self.count)]


def image_seed(job_seed: int, image_id: str, index: int) -> int:
    digest = hashlib.blake2b(f"{job_seed}\0{image_id}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & SEED_MASK


def _missing(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


def _show(value) -> str:
    """How a bad value appears in a reason: 12 whether it came as 12 (JSON) or "12" (CSV)."""
    if isinstance(value, str):
        try:
            return str(int(value.strip()))
        except ValueError:
            return repr(value)
    return repr(value)


def _whole(value, name: str, lo: int, hi: int | None = None) -> int:
    """An integer from JSON/CSV/Parquet (3, 3.0, "3"), within [lo, hi)."""
    n = None
    if isinstance(value, bool):
        n = None
    elif isinstance(value, (int, np.integer)):
        n = int(value)
    elif isinstance(value, (float, np.floating)) and float(value).is_integer():
        n = int(value)
    elif isinstance(value, str):
        try:
            n = int(value.strip())
        except ValueError:
            n = None
    if n is None or n < lo or (hi is not None and n >= hi):
        span = f"{lo}..{hi - 1}" if hi is not None else f">= {lo}"
        raise RowError(f"bad {name} {_show(value)}: must be a whole number {span}")
    return n


def parse_prompt(record: dict, rules: RowRules) -> Prompt:
    """Check one row against the rules; RowError says what is wrong."""
    if not isinstance(record, dict):
        raise RowError(f"row is a JSON {type(record).__name__}, not an object")
    given = record
    record = rules.rename(record)
    raw_id = record.get("id")
    if _missing(raw_id):
        raise RowError("missing id")
    if isinstance(raw_id, (dict, list, bool, float)):
        raise RowError(f"bad id {raw_id!r}: must be a string or an integer")
    pid = str(raw_id)

    text = record.get("text")
    text = "" if _missing(text) else text
    if not isinstance(text, str):
        raise RowError(f"bad text {text!r}: must be a string")
    label, embedding, prompt_ids = -1, None, None
    size = rules.row_size(record)
    if rules.model_type == "text":
        text, prompt_ids = _text_prompt(record, rules, given, size)
    elif rules.model_type == "c2i":
        value = record.get("class")
        if _missing(value):
            raise RowError(f"missing class: this class-conditional model needs a class label{_hint(given, 'class')}")
        try:
            label = _whole(value, "class", 0, rules.num_classes)
        except RowError:
            raise RowError(f"unknown class {_show(value)}: this model has {rules.num_classes} classes "
                           f"(0..{rules.num_classes - 1})") from None
    else:
        if not _missing(record.get("embedding")):
            embedding = parse_embedding(record["embedding"], rules)
        elif not text:
            raise RowError(f"missing text or embedding: this text-conditional model needs one{_hint(given, 'text')}")
        elif not rules.has_text_encoder:
            raise RowError("text row but the job has no text encoder: set text_encoder (a local FLAN-T5 folder) "
                           "or give a precomputed embedding")

    seed = None if _missing(record.get("seed")) else _whole(record["seed"], "seed", 0, 2**63)
    cfg_value = record.get("cfg", record.get("cfg_scale"))
    cfg_scale = rules.default_cfg
    if not _missing(cfg_value):
        try:
            cfg_scale = float(cfg_value)
        except (TypeError, ValueError):
            cfg_scale = float("nan")
        if not math.isfinite(cfg_scale) or cfg_scale < 1.0 or isinstance(cfg_value, bool):
            raise RowError(f"bad cfg {cfg_value if isinstance(cfg_value, str) else repr(cfg_value)}: the guidance scale must be a number >= 1")
    count = 1 if _missing(record.get("count")) else _whole(record["count"], "count", 1, rules.max_count + 1)
    return Prompt(pid, label, text, embedding, seed, cfg_scale, count, prompt_ids, rules.grid_of(size))


def _text_prompt(record: dict, rules: RowRules, given: dict, size: str | None) -> tuple[str, list[int]]:
    """The `prompt` of a text-prompt family's row and its token ids."""
    if "prompt" not in record:
        raise RowError(f"missing prompt: this text-to-image model needs a prompt column{_hint(given, 'prompt')}")
    value = record["prompt"]
    if _missing(value):
        raise RowError("empty prompt")
    if not isinstance(value, str):
        raise RowError(f"bad prompt {value!r}: must be text")
    return value, rules.prompt_ids(value, size)


def _hint(record: dict, field: str) -> str:
    """Where the row names its columns differently, say how to map them (columns: {class: class_label})."""
    names = [str(k) for k in record][:8]
    return f" (the row's columns: {', '.join(names)}; map one with columns: {{{field}: NAME}} / --column {field}=NAME)"


def parse_embedding(value, rules: RowRules) -> np.ndarray:
    """A caption embedding [tokens, caption_dim] (nested list, flat list, or JSON text of either)."""
    want = f"[tokens <= {rules.caption_tokens}, {rules.caption_dim}]"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError("bad embedding: not a JSON list of numbers") from None
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise RowError(f"wrong embedding shape: ragged or non-numeric; this model needs {want}") from None
    if arr.ndim == 1 and arr.size and arr.size % rules.caption_dim == 0:
        arr = arr.reshape(-1, rules.caption_dim)
    if arr.ndim != 2 or arr.shape[1] != rules.caption_dim or not 1 <= arr.shape[0] <= rules.caption_tokens:
        raise RowError(f"wrong embedding shape {list(arr.shape)}: this model needs {want}")
    if not np.isfinite(arr).all():
        raise RowError("bad embedding: it has NaN or infinite values")
    return arr


def hash64(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


class IdSet:
    """The ids seen so far, as 64-bit hashes in sorted numpy runs: ~8 bytes per id.

    A Python set of 10 million id strings would take ~1 GB; this takes ~80 MB. New
    hashes collect in a small set and are flushed into a sorted run; runs merge like
    a binary counter, so a lookup searches O(log n) runs. Two different ids share a
    hash with probability ~n^2 / 2^65 (3e-6 for 10M ids).
    """

    def __init__(self, flush_at: int = 65536):
        self.flush_at = flush_at
        self._runs: list[np.ndarray] = []
        self._recent: set[int] = set()

    def __len__(self) -> int:
        return len(self._recent) + sum(len(r) for r in self._runs)

    def add_batch(self, keys: list[str]) -> list[bool]:
        """Add keys in order; True where a key is new (False: seen before, or earlier in this batch)."""
        hashes = np.fromiter((hash64(k) for k in keys), dtype=np.uint64, count=len(keys))
        seen = np.zeros(len(keys), dtype=bool)
        for run in self._runs:
            i = np.minimum(np.searchsorted(run, hashes), len(run) - 1)
            seen |= run[i] == hashes
        fresh = []
        for h, old in zip(hashes.tolist(), seen.tolist()):
            new = not old and h not in self._recent
            if new:
                self._recent.add(h)
            fresh.append(new)
        if len(self._recent) >= self.flush_at:
            self._flush()
        return fresh

    def _flush(self) -> None:
        run = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
        run.sort()
        self._recent.clear()
        self._runs.append(run)
        while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
            b, a = self._runs.pop(), self._runs.pop()
            self._runs.append(np.sort(np.concatenate([a, b]), kind="mergesort"))
