"""Lumina-mGPT's shared text+image vocabulary: image codes and the special tokens, read by name.

Chameleon's BPE vocabulary holds one token per VQGAN code, named `IMGIMG<digits>Z` with the
code's decimal digits written as letters A-J (LUM model/chameleon_vae_ori/vocab.py). The map
BPE id <-> code is built from these names, never from an offset: Lumina's own decode goes
through the name-based `bpe2img` table too (data/item_processor.py). The special tokens
(item_processor.py, data/convertsation.py) are looked up by name as well.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

IMAGE_TOKEN = re.compile(r"^IMGIMG([A-J]+)Z$")
BOS = "<s>"
BEGIN_OF_IMAGE = "<racm3:break>"
END_OF_IMAGE = "<eoss>"
END_OF_LINE = "<reserved08799>"
END_OF_TURN = "<reserved08706>"
PATCH_PX = 32  # one size-token unit: a 32 px crop patch = 2 x 2 image codes
MAX_GRIDS = 192  # size tokens looked for: up to 6144 px a side


class VocabularyError(ValueError):
    """A vocabulary that lacks what Lumina-mGPT generation needs; the message names the token."""


def size_token(grids: int) -> str:
    """The token for a height or width of `grids` x 32 px (item_processor.get_n_grids_token)."""
    return f"<reserved{8800 + grids:05d}>"


def image_code(name: str) -> int | None:
    m = IMAGE_TOKEN.match(name)
    return None if m is None else int("".join(str(ord(c) - ord("A")) for c in m.group(1)))


@dataclass(frozen=True, eq=False)
class LuminaVocab:
    """Ids the generation needs, from a name -> id map (config.json's vocabulary_map or tokenizer.json).

    Image tokens must be one contiguous id range (`image_start`, `image_count` ids) so the
    output head can be restricted to those rows; `bpe_to_code` / `code_to_bpe` map between
    BPE ids and VQGAN codes in whatever order the names give.
    """
    vocab_size: int
    bos: int
    begin_of_image: int
    end_of_image: int
    end_of_line: int
    end_of_turn: int
    image_start: int
    image_count: int
    code_of_bpe: tuple[int, ...]  # code of BPE id image_start + i
    size_ids: dict[int, int]  # grids g -> id of size_token(g), for every such token the vocabulary has

    @classmethod
    def from_names(cls, names: dict[str, int], vocab_size: int | None = None, source: str = "vocabulary") -> "LuminaVocab":
        def need(name: str) -> int:
            if name not in names:
                raise VocabularyError(f"{source}: no token {name!r} (Lumina-mGPT needs it)")
            return int(names[name])

        codes = {int(i): c for name, i in names.items() if (c := image_code(name)) is not None}
        if not codes:
            raise VocabularyError(f"{source}: no image tokens (names IMGIMG<A-J digits>Z)")
        ids = sorted(codes)
        start, count = ids[0], len(ids)
        if ids[-1] - start + 1 != count:
            gap = next(a + 1 for a, b in zip(ids, ids[1:]) if b != a + 1)
            raise VocabularyError(f"{source}: image tokens are not one contiguous id range "
                                  f"({count} tokens from {start}, first gap at id {gap})")
        if sorted(codes.values()) != list(range(count)):
            raise VocabularyError(f"{source}: the {count} image tokens do not name codes 0..{count - 1} once each")
        sizes = {g: int(names[size_token(g)]) for g in range(1, MAX_GRIDS + 1) if size_token(g) in names}
        size = int(vocab_size) if vocab_size is not None else max(int(i) for i in names.values()) + 1
        return cls(vocab_size=size, bos=need(BOS), begin_of_image=need(BEGIN_OF_IMAGE), end_of_image=need(END_OF_IMAGE),
                   end_of_line=need(END_OF_LINE), end_of_turn=need(END_OF_TURN), image_start=start, image_count=count,
                   code_of_bpe=tuple(codes[i] for i in ids), size_ids=sizes)

    @property
    def image_stop(self) -> int:
        return self.image_start + self.image_count

    def size_id(self, grids: int) -> int:
        """Id of the size token for `grids` x 32 px."""
        if grids not in self.size_ids:
            have = f"{min(self.size_ids) * PATCH_PX}..{max(self.size_ids) * PATCH_PX} px" if self.size_ids else "none"
            raise VocabularyError(f"no size token for {grids * PATCH_PX} px ({size_token(grids)}); "
                                  f"this vocabulary has sizes {have}")
        return self.size_ids[grids]

    def grids_of(self, size_token_id: int) -> int | None:
        """The inverse of size_id (None: not a size token)."""
        return next((g for g, i in self.size_ids.items() if i == int(size_token_id)), None)

    def bpe_to_code(self, bpe: torch.Tensor) -> torch.Tensor:
        """BPE ids (all image tokens) -> VQGAN codes."""
        idx = bpe - self.image_start
        if len(idx) and (idx.min() < 0 or idx.max() >= self.image_count):
            raise VocabularyError("a token to decode is not an image token")
        return torch.tensor(self.code_of_bpe, dtype=torch.long, device=bpe.device)[idx]

    def code_to_bpe(self, codes: torch.Tensor) -> torch.Tensor:
        table = torch.empty(self.image_count, dtype=torch.long)
        table[torch.tensor(self.code_of_bpe)] = torch.arange(self.image_start, self.image_stop)
        return table.to(codes.device)[codes]
