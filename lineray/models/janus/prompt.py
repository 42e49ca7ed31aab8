"""Janus-Pro prompts: text -> token ids, as the original builds them (MODELS.md A3).

`<|User|>: {prompt}\\n\\n<|Assistant|>:` (the `deepseek` chat template with an empty system
prompt; the prompt stripped of surrounding whitespace, as `apply_sft_template_for_multi_turn_prompts`
does), then `<begin_of_image>`, tokenized as one string and with BOS first
(deepseek-ai/Janus generation_inference.py, processing_vlm.py, README). The tokenizer is the checkpoint folder's
`tokenizer.json`, read with the `tokenizers` library: no network, no trust_remote_code.

Special ids are looked up by name in that tokenizer, never written here: BOS (the name from
tokenizer_config.json / special_tokens_map.json, else deepseek's `<｜begin▁of▁sentence｜>`),
`<begin_of_image>`, and the CFG pad `<｜▁pad▁｜>` (full-width bars, processing_vlm.py), which is
not the tokenizer's own pad token `<|▁pad▁|>`.
"""
from __future__ import annotations

import json
from pathlib import Path

from lineray.models.tokenizer_file import TOKENIZER_FILE, TokenizerFileError, read_tokenizer

TEMPLATE = "<|User|>: {prompt}\n\n<|Assistant|>:"
BOI_TOKEN = "<begin_of_image>"
CFG_PAD_TOKEN = "<｜▁pad▁｜>"
DEFAULT_BOS_TOKEN = "<｜begin▁of▁sentence｜>"


class PromptError(ValueError):
    """A prompt that cannot be generated from (empty, too long); the message quotes its start."""


def quote(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "…")


class PromptEncoder:
    """Prompt texts -> Janus-Pro prefix token ids (BOS first, `<begin_of_image>` last)."""

    def __init__(self, tokenizer, bos_token: str = DEFAULT_BOS_TOKEN, max_tokens: int | None = None,
                 source: str = TOKENIZER_FILE):
        self.tokenizer, self.max_tokens, self.source = tokenizer, max_tokens, source
        self.bos_id = self._id(bos_token, "BOS")
        self.boi_id = self._id(BOI_TOKEN, "begin-of-image")
        self.cfg_pad_id = self._id(CFG_PAD_TOKEN, "CFG pad")

    @classmethod
    def from_folder(cls, folder: str | Path, max_tokens: int | None = None) -> "PromptEncoder":
        """The tokenizer of a Janus-Pro checkpoint folder (its tokenizer.json)."""
        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            raise PromptError(f"{folder}: no {TOKENIZER_FILE} (Janus-Pro prompts are tokenized with the "
                              f"checkpoint's own tokenizer; copy it into the folder)")
        try:
            tokenizer = read_tokenizer(path)
        except TokenizerFileError as e:
            raise PromptError(str(e)) from None
        return cls(tokenizer, bos_token_name(Path(folder)), max_tokens, source=str(path))

    def _id(self, token: str, what: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise PromptError(f"{self.source} has no {what} token {token!r}; is it a Janus-Pro tokenizer?")
        return i

    def encode_one(self, text: str) -> list[int]:
        """One prompt's ids; PromptError if it is empty or longer than max_tokens."""
        if not isinstance(text, str) or not text.strip():
            raise PromptError(f"empty prompt {quote(text) if isinstance(text, str) else type(text).__name__}")
        return self._checked(text, self._ids(self.tokenizer.encode(self._templated(text), add_special_tokens=False)))

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Many prompts at once (the tokenizer's parallel batch path); the first bad one raises."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise PromptError(f"prompt {i} is empty: {quote(t) if isinstance(t, str) else type(t).__name__}")
        encoded = self.tokenizer.encode_batch([self._templated(t) for t in texts], add_special_tokens=False)
        return [self._checked(t, self._ids(e)) for t, e in zip(texts, encoded)]

    def _templated(self, text: str) -> str:
        return TEMPLATE.format(prompt=text.strip()) + BOI_TOKEN

    def _ids(self, encoding) -> list[int]:
        ids = [self.bos_id, *encoding.ids]
        if ids[-1] != self.boi_id:  # the tokenizer split the begin-of-image token: not a Janus tokenizer
            raise PromptError(f"{self.source} does not keep {BOI_TOKEN!r} as one token")
        return ids

    def _checked(self, text: str, ids: list[int]) -> list[int]:
        if self.max_tokens is not None and len(ids) > self.max_tokens:
            raise PromptError(f"prompt {quote(text)} is too long: {len(ids)} tokens with the template, "
                              f"this model takes at most {self.max_tokens} (max_prefix_len)")
        return ids


def bos_token_name(folder: Path) -> str:
    """BOS as the folder's tokenizer_config.json or special_tokens_map.json names it (deepseek's by default)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            try:
                bos = json.loads(path.read_text()).get("bos_token")
            except (ValueError, AttributeError):
                continue
            if isinstance(bos, dict):
                bos = bos.get("content")
            if isinstance(bos, str) and bos:
                return bos
    return DEFAULT_BOS_TOKEN
