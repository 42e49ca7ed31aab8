"""Text -> caption embeddings for text-conditional (t2i) models.

LlamaGen's t2i models read FLAN-T5-XL encoder features: up to 120 tokens of 2048
numbers. A `TextEncoder` turns each text into [valid tokens, dim]; the generation
stage places them at the end of the 120 condition slots with a padding mask, as
LlamaGen's sample_t2i.py does. Rows that bring a precomputed `embedding` skip this
stage. Nothing is downloaded: the encoder loads from a local folder.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


class TextEncoder(Protocol):
    dim: int

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """One float32 array [tokens, dim] per text (padding removed)."""


class T5TextEncoder:
    """A FLAN-T5 encoder (transformers' T5EncoderModel + its tokenizer) from a local folder."""

    def __init__(self, path: str, max_tokens: int = 120, device: str = "cpu", dtype: torch.dtype = torch.float32):
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError as e:
            raise ImportError("text rows need `transformers` for the T5 text encoder: pip install transformers") from e
        self.max_tokens, self.device = max_tokens, device
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(path, local_files_only=True, dtype=dtype).to(device).eval()
        self.dim = self.model.config.d_model

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> list[np.ndarray]:
        tok = self.tokenizer(list(texts), max_length=self.max_tokens, padding="max_length", truncation=True,
                             return_tensors="pt")
        hidden = self.model(input_ids=tok.input_ids.to(self.device),
                            attention_mask=tok.attention_mask.to(self.device)).last_hidden_state.float().cpu()
        lengths = tok.attention_mask.sum(1).tolist()  # right padding: the valid tokens come first
        return [hidden[i, :max(1, n)].numpy() for i, n in enumerate(lengths)]


def object_array(items: list) -> np.ndarray:
    """A 1-D object array of arrays (numpy would otherwise try to stack equal-length items)."""
    out = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        out[i] = x
    return out


class TextEncodeStage:
    """Ray Data stage: fill `embedding` for rows that have only `text`."""

    def __init__(self, path: str, max_tokens: int, caption_dim: int, device: str = "cpu", monitor=None):
        from lineray.pipelines.monitor import stage_report

        # On a GPU (the plan gives the stage a share when the cluster has GPUs) in bf16: T5-XL's encoder on CPU
        # would feed a GPU generator a few captions a second.
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.encoder = T5TextEncoder(path, max_tokens=max_tokens, device=device, dtype=dtype)
        self.monitor = monitor
        stage_report(monitor, "text")
        if self.encoder.dim != caption_dim:
            raise ValueError(f"text encoder {path} gives {self.encoder.dim}-dim features; the model needs {caption_dim}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["embedding_tokens"])
        if self.monitor is not None:
            self.monitor.batch_started.remote("text", n)
        out = self._encode(batch)
        if self.monitor is not None:
            self.monitor.batch_done.remote("text", n)
        return out

    def _encode(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = np.array(batch["embedding_tokens"], dtype=np.int32)
        todo = np.flatnonzero(tokens == 0)
        if len(todo) == 0:
            return batch
        embeddings = list(batch["embedding"])
        for i, feats in zip(todo, self.encoder.encode([str(batch["text"][i]) for i in todo])):
            embeddings[i], tokens[i] = feats.reshape(-1), len(feats)
        return dict(batch, embedding=object_array(embeddings), embedding_tokens=tokens)
