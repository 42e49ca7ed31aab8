"""The digits tokenizer is the shared k-means patch tokenizer with 2x2 patches (16x16 tokens for 32 px)."""
from lineray.models.patch_tokenizer import PatchTokenizer

__all__ = ["PatchTokenizer"]
