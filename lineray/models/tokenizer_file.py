"""A checkpoint folder's tokenizer.json, read once per process with the `tokenizers` library (no network, no
remote code). Lumina-mGPT's is 5.6 MB and several readers want it (the prompt encoder, the vocabulary, the
config's special ids): they share one parsed copy, keyed by the file's path, size and modification time."""
from __future__ import annotations

import functools
import os
from pathlib import Path

TOKENIZER_FILE = "tokenizer.json"


class TokenizerFileError(ValueError):
    """A tokenizer.json that is missing or does not parse; the message is one line naming the file."""


def read_tokenizer(path: str | os.PathLike):
    """The `tokenizers.Tokenizer` of a tokenizer.json (or of the folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    try:
        stat = path.stat()
    except OSError:
        raise TokenizerFileError(f"tokenizer not found: {path}") from None
    return _parsed(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _parsed(path: str, size: int, mtime_ns: int):
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - the library's parse errors (a Rust panic text), in one line
        raise TokenizerFileError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
