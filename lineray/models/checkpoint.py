"""Checkpoint reading: files, folders and shard indexes, strict and sliceable.

A reader exposes key -> shape and reads any row or column slice of one tensor, so
a tensor-parallel rank materialises only its own share: safetensors slices are read
from the file, pickles (`.pt`, `.bin`; weights_only) are memory-mapped
(torch.load(mmap=True)) and sliced.

`CheckpointReader` opens one file, a folder (`model.safetensors`, `pytorch_model.bin`,
or their shards with `model.safetensors.index.json` / `pytorch_model.bin.index.json`)
or an index file. `KeyMappedReader` presents another layout's tensors under lineray's
names (Janus-Pro's deepseek and transformers layouts): one source key, or several
concatenated along dim 0, skipping by prefix what the model does not use.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn as nn

from lineray.models.layers import checkpoint_tensors

log = logging.getLogger(__name__)

# Entries of LlamaGen-era checkpoints that are not weights of the inference model.
IGNORED_SUFFIXES = ("freqs_cis", "causal_mask", "kv_cache.k_cache", "kv_cache.v_cache")
WRAPPER_KEYS = ("model", "module", "state_dict")
KEY_PREFIXES = ("module.", "_orig_mod.")
# What a checkpoint folder may hold, in the order looked for (transformers' names).
FOLDER_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model; the message names the file and keys."""


class Reader(Protocol):
    """What load_checkpoint needs: key names, full shapes, and slices of one tensor."""
    path: Path

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def read(self, key: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor: ...


def _slice(t, rows: slice | None, cols: slice | None):
    if rows is not None and cols is not None:
        return t[rows, cols]
    if rows is not None:
        return t[rows]
    if cols is not None:
        return t[:, cols]
    return t[:]


class _TensorFile:
    """One safetensors file or one weights_only pickle; tensors by (unprefixed) key."""

    def __init__(self, path: Path, ema: bool = False):
        self.path = path
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        if path.suffix == ".safetensors":
            self._open_safetensors(ema)
        else:
            self._open_torch(ema)

    def _open_safetensors(self, ema: bool) -> None:
        from safetensors import safe_open
        try:
            self._st = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as e:  # noqa: BLE001 - report any parse failure as one line
            raise CheckpointError(f"cannot read checkpoint {self.path}: not a valid safetensors file ({e})") from None
        prefix = "ema." if ema else ""
        keys = [k for k in self._st.keys() if k.startswith(prefix)] if ema else list(self._st.keys())
        if ema and not keys:
            raise CheckpointError(f"{self.path}: --ema given but the file has no 'ema.' weights")
        self.names = {k[len(prefix):]: k for k in keys}
        self._tensors = None

    def _open_torch(self, ema: bool) -> None:
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            try:  # legacy (non-zip) files cannot be memory-mapped
                obj = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"cannot read checkpoint {self.path}: {first_line(e)}") from None
        except Exception as e:  # noqa: BLE001 - unpickling refused, truncated file, ...
            raise CheckpointError(f"cannot read checkpoint {self.path}: {first_line(e)}") from None
        if not isinstance(obj, dict):
            raise CheckpointError(f"{self.path}: expected a dict of tensors, found {type(obj).__name__}")
        if ema:
            if not isinstance(obj.get("ema"), dict):
                raise CheckpointError(f"{self.path}: --ema given but the file has no 'ema' state dict")
            obj = obj["ema"]
        else:
            for key in WRAPPER_KEYS:
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
        tensors = {}
        for k, v in obj.items():
            if not isinstance(v, torch.Tensor):
                continue
            for p in KEY_PREFIXES:
                k = k.removeprefix(p)
            tensors[k] = v
        self._tensors, self._st = tensors, None
        self.names = {k: k for k in tensors}

    def shape(self, key: str) -> tuple[int, ...]:
        if self._st is not None:
            return tuple(self._st.get_slice(self.names[key]).get_shape())
        return tuple(self._tensors[key].shape)

    def read(self, key: str, rows: slice | None, cols: slice | None) -> torch.Tensor:
        t = self._st.get_slice(self.names[key]) if self._st is not None else self._tensors[key]
        return torch.as_tensor(_slice(t, rows, cols)).clone()


class CheckpointReader:
    """A file, a checkpoint folder or a shard index, read as one set of tensors.

    Shards open on first use (memory-mapped or sliced in place), so a rank whose
    tensors all sit in one shard never touches the others.
    """

    def __init__(self, path: str | os.PathLike, ema: bool = False):
        self.path = Path(path)
        file = self._locate(self.path)
        self.folder = file.parent
        if file.name.endswith(".index.json"):
            if ema:
                raise CheckpointError(f"{self.path}: --ema applies to a single checkpoint file, not a sharded one")
            self._shards, self._where = {}, self._read_index(file)
        else:
            single = _TensorFile(file, ema)
            self._shards = {file.name: single}
            self._where = {k: file.name for k in single.names}

    @staticmethod
    def _locate(path: Path) -> Path:
        """The file to open: the path itself, or in a folder its index or single file."""
        if not path.is_dir():
            return path
        for name in FOLDER_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"no checkpoint in {path}: expected one of {', '.join(FOLDER_FILES)}")

    def _read_index(self, index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint index not found: {index}") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot read checkpoint index {index}: "
                                  f"expected JSON with a 'weight_map' ({first_line(e)})") from None
        missing = sorted({f for f in weight_map.values() if not (index.parent / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} names shard files that are not in {index.parent}: {', '.join(missing)}")
        return dict(weight_map)

    def _file(self, key: str) -> _TensorFile:
        if key not in self._where:
            raise CheckpointError(f"{self.path}: no tensor {key!r}")
        name = self._where[key]
        if name not in self._shards:
            shard = _TensorFile(self.folder / name)
            absent = sorted(k for k, f in self._where.items() if f == name and k not in shard.names)
            if absent:
                raise CheckpointError(f"{shard.path} lacks tensors its index places there: {', '.join(absent[:5])}")
            self._shards[name] = shard
        return self._shards[name]

    def keys(self) -> list[str]:
        return list(self._where)

    def file_of(self, key: str) -> Path:
        """The file holding `key` (the path itself for a single file)."""
        return self.folder / self._where[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file(key).shape(key)

    def read(self, key: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        return self._file(key).read(key, rows, cols)


@dataclass(frozen=True)
class Source:
    """Where one lineray tensor comes from: source keys stacked along dim 0, then an optional transform.

    A transform (e.g. repeat a [1, hd] norm over heads) must work on meta tensors too:
    the reader learns the lineray shape by applying it to an empty meta tensor.
    """
    keys: tuple[str, ...]
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


KeyMap = dict[str, "str | list[str] | Source"]


class KeyMappedReader:
    """Another layout's tensors under lineray's key names.

    key_map: lineray key -> source key | [source keys concatenated along dim 0] | Source.
    skip: source-key prefixes the model does not use; they are never read, only counted
    (one log line). Any other source key that no lineray key uses, and any mapped source
    key the checkpoint lacks, is a CheckpointError naming the key and the file.
    """

    def __init__(self, reader: Reader, key_map: KeyMap, skip: tuple[str, ...] = (),
                 purpose: str = "image generation"):
        self.reader, self.path = reader, reader.path
        self.sources = {k: _as_source(v) for k, v in key_map.items()}
        present = set(reader.keys())
        used = {s for src in self.sources.values() for s in src.keys}
        missing = [(k, s) for k, src in self.sources.items() for s in src.keys if s not in present]
        if missing:
            named = "; ".join(f"{k} (from {s})" for k, s in missing[:8])
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            raise CheckpointError(f"checkpoint {self.path} lacks tensors the model needs: {named}{more}")
        unused = present - used
        counts = Counter(next(p for p in skip if k.startswith(p)) for k in unused if k.startswith(skip))
        self.skipped = {p.rstrip("."): counts[p] for p in skip if counts[p]}  # in the order of `skip`
        unexpected = sorted(k for k in unused if not k.startswith(skip))
        if unexpected:
            where = ", ".join(f"{k} (in {_file_of(reader, k)})" for k in unexpected[:8])
            more = f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""
            raise CheckpointError(f"checkpoint {self.path} has tensors this model does not know: {where}{more}")
        if self.skipped:
            log.info("%s", self.skipped_line(purpose))

    def skipped_line(self, purpose: str = "image generation") -> str:
        """'skipped 412 tensors not used for image generation: vision_model (398), aligner (4), ...'"""
        parts = ", ".join(f"{p} ({n})" for p, n in self.skipped.items())
        return f"skipped {sum(self.skipped.values())} tensors not used for {purpose}: {parts}"

    def keys(self) -> list[str]:
        return list(self.sources)

    def shape(self, key: str) -> tuple[int, ...]:
        src = self.sources[key]
        shapes = [self.reader.shape(s) for s in src.keys]
        if len({s[1:] for s in shapes}) > 1:
            raise CheckpointError(f"{self.path}: {key} concatenates {', '.join(src.keys)} whose shapes "
                                  f"{', '.join(str(list(s)) for s in shapes)} do not stack along dim 0")
        full = (sum(s[0] for s in shapes), *shapes[0][1:])
        if src.transform is None:
            return full
        return tuple(src.transform(torch.empty(full, device="meta")).shape)

    def read(self, key: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        src = self.sources[key]
        if src.transform is not None:  # the few transformed tensors are small: read whole, then slice
            return _slice(src.transform(self._stacked(src, None, None)), rows, cols).clone()
        return self._stacked(src, rows, cols)

    def _stacked(self, src: Source, rows: slice | None, cols: slice | None) -> torch.Tensor:
        if len(src.keys) == 1:
            return self.reader.read(src.keys[0], rows, cols)
        sizes = [self.reader.shape(s)[0] for s in src.keys]
        start, stop, step = (rows or slice(None)).indices(sum(sizes))
        if step != 1:
            raise ValueError("row slices of a concatenated tensor must be contiguous")
        parts, offset = [], 0
        for s, n in zip(src.keys, sizes):  # read from each part only the rows that fall in it
            lo, hi = max(start, offset), min(stop, offset + n)
            if lo < hi:
                parts.append(self.reader.read(s, slice(lo - offset, hi - offset), cols))
            offset += n
        return torch.cat(parts)


def _as_source(v) -> Source:
    if isinstance(v, Source):
        return v
    return Source((v,)) if isinstance(v, str) else Source(tuple(v))


def _file_of(reader, key: str):
    file_of = getattr(reader, "file_of", None)
    return file_of(key) if file_of is not None else reader.path


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_checkpoint(model: nn.Module, path_or_reader: str | os.PathLike | Reader, *, ema: bool = False,
                    ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Load a checkpoint into `model` strictly: every weight present, nothing unknown, every shape right.

    `path_or_reader`: a file, folder or shard index, or a reader (e.g. a KeyMappedReader).
    Sharded layers (with `load_shard`) read only their slice. `ignore_prefixes`
    names checkpoint parts the model does not use (e.g. a VQ model's encoder).
    """
    if isinstance(path_or_reader, (str, os.PathLike)):
        reader = CheckpointReader(path_or_reader, ema=ema)
    else:
        reader = path_or_reader
    path = reader.path
    fit = getattr(model, "fit_checkpoint", None)  # parts whose size only the checkpoint tells
    if fit is not None:
        fit({k: reader.shape(k) for k in reader.keys()})
    expected = {t.key: t for t in checkpoint_tensors(model)}
    present = set(reader.keys())
    missing = sorted(k for k in expected if k not in present)
    unexpected = sorted(k for k in present if k not in expected
                        and not k.endswith(IGNORED_SUFFIXES) and not k.startswith(ignore_prefixes))
    mismatched = sorted(f"{k} (checkpoint {list(reader.shape(k))}, model {list(expected[k].full_shape)})"
                        for k in expected if k in present and reader.shape(k) != expected[k].full_shape)
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {', '.join(mismatched)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for key, t in expected.items():
            read = (lambda rows=None, cols=None, key=key: reader.read(key, rows, cols))
            value = t.load_shard(read) if t.split else reader.read(key)
            t.target.copy_(value.to(t.target.dtype))
