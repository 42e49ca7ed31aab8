"""Lumina-mGPT prompts: text + image size -> token ids, as the original builds them.

Template (LUM generate_examples/generate.py, data/convertsation.py, xllmx item_processor): BOS, then
the text `Generate an image of {W}x{H} according to the following prompt:\\n{prompt}` followed by the
end-of-turn token `<reserved08706>`, tokenized as one string without the tokenizer's own special
tokens (xllmx Tokenizer.encode(add_special_tokens=False) with BOS prepended). There is no role text.

The model's answer starts with begin-of-image and the two size tokens (height, width in 32 px
units); lineray forces these from the requested size, so they belong to the prefix the model is
prefilled with (`image_prefix`): the conditional row is prompt + image prefix, the unconditional
CFG row is the image prefix alone (Lumina's separate sequence from begin-of-image, positions from 0).
"""
from __future__ import annotations

import os
from pathlib import Path

from lineray.models.lumina.sizes import SAMPLE, ImageSize, PromptError, size_problem
from lineray.models.lumina.vocab import PATCH_PX, LuminaVocab
from lineray.models.tokenizer_file import TOKENIZER_FILE, read_tokenizer

TEMPLATE = "Generate an image of {w}x{h} according to the following prompt:\n{prompt}"


def _show(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


class LuminaPromptEncoder:
    """tokenizer.json (the `tokenizers` library, no network) + the vocabulary's special ids."""

    def __init__(self, tokenizer, vocab: LuminaVocab, max_tokens: int | None = None, size: ImageSize | None = None,
                 target_size: int = 0):
        self.tokenizer, self.vocab, self.max_tokens = tokenizer, vocab, max_tokens
        self.size = size  # the image size of `encode` without sizes (a model config's grid: for_config)
        self.target_size = target_size  # sizes are checked against it (lumina.sizes.size_problem); 0: not checked

    @property
    def bos_id(self) -> int:
        return self.vocab.bos

    @property
    def boi_id(self) -> int:
        return self.vocab.begin_of_image

    cfg_pad_id = None  # Lumina's unconditional row is the image prefix alone, not a padded prompt

    def for_config(self, cfg) -> "LuminaPromptEncoder":
        """This encoder with the image size of a model config's grid as the default size."""
        size = ImageSize(cfg.grid_width * PATCH_PX // 2, cfg.grid_h * PATCH_PX // 2)
        return LuminaPromptEncoder(self.tokenizer, self.vocab, self.max_tokens, size, cfg.target_size)

    def check_size(self, value) -> str:
        """A size a prompt may ask for, normalised ("768x512" or "sample"); PromptError says why not (the
        format, a multiple of 32 px, larger than the model makes, no size token in the vocabulary)."""
        if isinstance(value, str) and value.strip().lower() == SAMPLE:
            return SAMPLE
        size = ImageSize.parse(value)
        problem = size_problem(size, self.target_size) if self.target_size else None
        if problem is not None:
            raise PromptError(problem)
        for px in (size.height, size.width):
            if px // PATCH_PX not in self.vocab.size_ids:
                raise PromptError(f"image size {size}: the vocabulary has no size token for {px} px")
        return str(size)

    @staticmethod
    def grid(size: str) -> tuple[int, int]:
        """(rows, codes per row) of a checked size."""
        return ImageSize.parse(size).grid

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, max_tokens: int | None = None) -> "LuminaPromptEncoder":
        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {path} (Lumina-mGPT folders carry tokenizer.json; "
                                    "only the 7B-768 repository ships it)")
        tok = read_tokenizer(path)  # one parsed copy per process (the vocabulary reads the same file)
        vocab = LuminaVocab.from_names(tok.get_vocab(with_added_tokens=True), source=str(path))
        return cls(tok, vocab, max_tokens)

    def image_prefix(self, size: ImageSize) -> list[int]:
        """begin-of-image, height and width size tokens: the start of the model's answer."""
        return [self.vocab.begin_of_image, self.vocab.size_id(size.height // PATCH_PX),
                self.vocab.size_id(size.width // PATCH_PX)]

    def encode_one(self, prompt: str, size) -> list[int]:
        """The conditional prefix: BOS + template + end-of-turn + image prefix. With size "sample" the prefix
        ends at begin-of-image (the model draws the size tokens) and the template names the default size."""
        sample = size == SAMPLE
        size = self._default_size() if sample else ImageSize.parse(size)
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(f"empty prompt: {_show(prompt) if isinstance(prompt, str) else type(prompt).__name__}")
        text = TEMPLATE.format(w=size.width, h=size.height, prompt=prompt) + self._end_of_turn_text
        ids = [self.vocab.bos] + self.tokenizer.encode(text, add_special_tokens=False).ids
        if ids[-1] != self.vocab.end_of_turn:
            raise PromptError(f"tokenizer.json does not keep {self._end_of_turn_text} as one token "
                              f"(prompt {_show(prompt)}): is it an added special token?")
        ids += self.image_prefix(size)[:1] if sample else self.image_prefix(size)
        if self.max_tokens is not None and len(ids) + 2 * sample > self.max_tokens:
            raise PromptError(f"prompt {_show(prompt)} is {len(ids) + 2 * sample} tokens with the template; "
                              f"this model takes at most {self.max_tokens}")
        return ids

    def _default_size(self) -> ImageSize:
        if self.size is None:
            raise PromptError("no image size given for the Lumina-mGPT prompt template")
        return self.size

    def encode(self, prompts: list[str], sizes=None) -> list[list[int]]:
        """One prefix per prompt; `sizes`: one size for all (768, "768x512", (768, 512), ImageSize, "sample") or a
        list with one per prompt; default self.size."""
        if sizes is None:
            sizes = self._default_size()
        if not isinstance(sizes, list):
            sizes = [sizes] * len(prompts)
        if len(sizes) != len(prompts):
            raise PromptError(f"{len(prompts)} prompts but {len(sizes)} sizes")
        return [self.encode_one(p, s) for p, s in zip(prompts, sizes)]

    @property
    def _end_of_turn_text(self) -> str:
        return self.tokenizer.id_to_token(self.vocab.end_of_turn)

