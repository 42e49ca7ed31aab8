"""Checkpoint reading: `.pt`/`.pth` (weights_only) and `.safetensors`, strict, sliceable.

A reader exposes key -> shape and reads any row or column slice of one tensor, so
a tensor-parallel rank materialises only its own share: safetensors slices are read
from the file, `.pt` files are memory-mapped (torch.load(mmap=True)) and sliced.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from lineray.models.layers import checkpoint_tensors

# Entries of LlamaGen-era checkpoints that are not weights of the inference model.
IGNORED_SUFFIXES = ("freqs_cis", "causal_mask", "kv_cache.k_cache", "kv_cache.v_cache")
WRAPPER_KEYS = ("model", "module", "state_dict")
KEY_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model; the message names the file and keys."""


class CheckpointReader:
    def __init__(self, path: str | os.PathLike, ema: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"checkpoint not found: {self.path}")
        if self.path.suffix == ".safetensors":
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
        self._names = {k[len(prefix):]: k for k in keys}
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
        self._names = {k: k for k in tensors}

    def keys(self) -> list[str]:
        return list(self._names)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._st is not None:
            return tuple(self._st.get_slice(self._names[key]).get_shape())
        return tuple(self._tensors[key].shape)

    def read(self, key: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        if self._st is not None:
            t = self._st.get_slice(self._names[key])
        else:
            t = self._tensors[key]
        if rows is not None and cols is not None:
            out = t[rows, cols]
        elif rows is not None:
            out = t[rows]
        elif cols is not None:
            out = t[:, cols]
        else:
            out = t[:]
        return torch.as_tensor(out).clone()


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, ema: bool = False,
                    ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Load `path` into `model` strictly: every weight present, nothing unknown, every shape right.

    Sharded layers (with `load_shard`) read only their slice. `ignore_prefixes`
    names checkpoint parts the model does not use (e.g. a VQ model's encoder).
    """
    reader = CheckpointReader(path, ema=ema)
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
