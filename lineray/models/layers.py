"""Linear layers that may be split across a tensor-parallel group (Megatron style).

A model built from these reads like the unsplit model; with `TPGroup()` (size 1)
they are plain linears. Each layer knows the full checkpoint shape of its weight
and reads only its own slice of it (`load_shard`), so a rank never holds the
whole tensor set; `checkpoint_tensors(model)` lists every checkpoint tensor with
where this rank's share of it goes. The group's collectives are plain
torch.distributed calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# torch 2.13 renamed all_gather_into_tensor (gloo takes its concatenated form too).
_all_gather_single = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor

# read(rows=slice|None, cols=slice|None) -> tensor: a slice of one checkpoint tensor.
SliceReader = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class CheckpointTensor:
    """One checkpoint tensor as this rank holds it."""
    key: str
    full_shape: tuple[int, ...]  # in the checkpoint (unsplit)
    target: torch.Tensor  # where this rank's share goes: a parameter, or rows of a fused one
    load_shard: Callable[[SliceReader], torch.Tensor] | None = None  # reads this rank's share; None: whole

    @property
    def split(self) -> bool:
        return self.load_shard is not None


def checkpoint_tensors(model: nn.Module) -> list[CheckpointTensor]:
    """Every checkpoint tensor of a model (or of this rank's shard of it), in parameter order."""
    out = []
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if hasattr(mod, "checkpoint_tensors"):  # the split layers below
            out += mod.checkpoint_tensors(prefix)
        else:
            out += [CheckpointTensor(prefix + pname, tuple(p.shape), p)
                    for pname, p in mod.named_parameters(recurse=False)]
    return out


@dataclass(frozen=True)
class TPGroup:
    """This process's place in its tensor-parallel group."""
    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup when size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Concatenate every rank's part (`part(n)`) of x along the last dim, in rank order."""
        if self.size == 1:
            return x
        width = -(-n // self.size)  # collectives want equal sizes: pad the shorter parts
        padded = F.pad(x, (0, width - x.size(-1))).contiguous()
        # One output tensor (no list of parts): the ranks' parts one after another along dim 0.
        out = padded.new_empty((self.size * padded.size(0), *padded.shape[1:]))
        _all_gather_single(out, padded, group=self.group)
        parts = out.view(self.size, *padded.shape)
        if width * self.size == n:
            return parts.movedim(0, -2).reshape(*padded.shape[:-1], n)
        sizes = [self.part(n, r).stop - self.part(n, r).start for r in range(self.size)]
        return torch.cat([parts[r, ..., :k] for r, k in enumerate(sizes)], dim=-1)

    def split(self, n: int, what: str) -> int:
        """Exact split (attention heads must not be cut)."""
        if n % self.size:
            raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size {self.size}")
        return n // self.size

    def part(self, n: int, rank: int | None = None) -> slice:
        """This rank's contiguous share of n items; near-equal when n is not divisible."""
        rank = self.rank if rank is None else rank
        base, extra = divmod(n, self.size)
        start = rank * base + min(rank, extra)
        return slice(start, start + base + (rank < extra))

    def my_slice(self, n: int) -> slice:
        """Exact share of n items (n divisible by size): used for heads."""
        per = self.split(n, "dimension")
        return slice(self.rank * per, (self.rank + 1) * per)


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b) with W's output rows (and b) split across ranks; gather_output concatenates the pieces."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup = TPGroup(), gather_output: bool = False,
                 bias: bool = False):
        super().__init__()
        self.tp, self.gather_output = tp, gather_output
        self.full_shape = (out_features, in_features)
        rows = tp.part(out_features)
        self.weight = nn.Parameter(torch.empty(rows.stop - rows.start, in_features))
        self.bias = nn.Parameter(torch.empty(rows.stop - rows.start)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return self.tp.all_gather_last(y, self.full_shape[0]) if self.gather_output else y

    def load_shard(self, read: SliceReader) -> torch.Tensor:
        return read(rows=self.tp.part(self.full_shape[0]))

    def checkpoint_tensors(self, prefix: str) -> list[CheckpointTensor]:
        out = [CheckpointTensor(prefix + "weight", self.full_shape, self.weight, self.load_shard)]
        if self.bias is not None:  # split with its rows
            out.append(CheckpointTensor(prefix + "bias", self.full_shape[:1], self.bias, self.load_shard))
        return out


class QKVParallelLinear(ColumnParallelLinear):
    """The fused wqkv projection; each rank gets whole heads of q, k and v."""

    def __init__(self, dim: int, n_head: int, n_kv_head: int, head_dim: int, tp: TPGroup = TPGroup()):
        nn.Module.__init__(self)
        self.tp, self.gather_output = tp, False
        self.sections = (n_head * head_dim, n_kv_head * head_dim, n_kv_head * head_dim)
        self.local_sections = (tp.split(n_head, "attention heads") * head_dim,
                               tp.split(n_kv_head, "key/value heads") * head_dim,
                               n_kv_head // tp.size * head_dim)
        self.full_shape = (sum(self.sections), dim)
        self.weight = nn.Parameter(torch.empty(sum(self.local_sections), dim))
        self.bias = None

    def load_shard(self, read: SliceReader) -> torch.Tensor:
        parts, start = [], 0
        for size in self.sections:  # rows are [q; k; v], each split by heads
            mine = self.tp.my_slice(size)
            parts.append(read(rows=slice(start + mine.start, start + mine.stop)))
            start += size
        return torch.cat(parts)


class MergedColumnParallelLinear(nn.Module):
    """Several column-parallel projections of one input in one matmul (SwiGLU's gate and up).

    Checkpoints keep the parts apart as siblings of this module (`w1.weight`,
    `w3.weight`); each rank holds its own slice of every part, stacked in part order.
    `state_dict()` writes the parts under their checkpoint keys; `merge_parts` is the
    matching load_state_dict pre-hook (it must sit on the root module, which sees
    the sibling keys first).
    """

    def __init__(self, in_features: int, parts: dict[str, int], tp: TPGroup = TPGroup()):
        super().__init__()
        self.tp = tp
        self.full_shapes = {name: (n, in_features) for name, n in parts.items()}
        self.local_sizes = [len(range(n)[tp.part(n)]) for n in parts.values()]
        self.weight = nn.Parameter(torch.empty(sum(self.local_sizes), in_features))
        self.register_state_dict_post_hook(_split_parts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.weight).split(self.local_sizes, dim=-1)

    def checkpoint_tensors(self, prefix: str) -> list[CheckpointTensor]:
        """One entry per part, keyed beside this module; targets are row views of the fused weight."""
        pieces = self.weight.split(self.local_sizes)
        return [CheckpointTensor(f"{sibling_prefix(prefix)}{name}.weight", shape, piece,
                                 lambda read, n=shape[0]: read(rows=self.tp.part(n)))
                for (name, shape), piece in zip(self.full_shapes.items(), pieces)]


def sibling_prefix(prefix: str) -> str:
    """'layers.0.feed_forward.w13.' -> 'layers.0.feed_forward.'"""
    return prefix[:prefix.rstrip(".").rfind(".") + 1]


def _split_parts(module: MergedColumnParallelLinear, state_dict: dict, prefix: str, _meta) -> None:
    weight = state_dict.pop(prefix + "weight")
    for name, rows in zip(module.full_shapes, weight.split(module.local_sizes)):
        state_dict[sibling_prefix(prefix) + name + ".weight"] = rows


def merge_parts(root: nn.Module, state_dict: dict, prefix: str, *_args) -> None:
    """load_state_dict pre-hook for a model holding MergedColumnParallelLinear layers: parts -> fused key."""
    for mod_name, mod in root.named_modules(prefix=prefix.rstrip(".")):
        if isinstance(mod, MergedColumnParallelLinear):
            keys = [sibling_prefix(mod_name + ".") + name + ".weight" for name in mod.full_shapes]
            if all(k in state_dict for k in keys):
                state_dict[mod_name + ".weight"] = torch.cat([state_dict.pop(k) for k in keys])


class RowParallelLinear(nn.Module):
    """y = x W^T (+ b) with W's input columns split across ranks, summed over the group; b (whole on
    every rank) is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup = TPGroup(), bias: bool = False):
        super().__init__()
        self.tp = tp
        self.full_shape = (out_features, in_features)
        cols = tp.part(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, cols.stop - cols.start))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias

    def load_shard(self, read: SliceReader) -> torch.Tensor:
        return read(cols=self.tp.part(self.full_shape[1]))

    def checkpoint_tensors(self, prefix: str) -> list[CheckpointTensor]:
        out = [CheckpointTensor(prefix + "weight", self.full_shape, self.weight, self.load_shard)]
        if self.bias is not None:  # replicated
            out.append(CheckpointTensor(prefix + "bias", self.full_shape[:1], self.bias))
        return out


class HeadLayerNorm(nn.Module):
    """LayerNorm over head_dim with a weight and bias per head ([heads, head_dim]: Chameleon's q/k norm).
    Each rank holds the rows of its own heads."""

    def __init__(self, n_head: int, head_dim: int, eps: float, tp: TPGroup = TPGroup()):
        super().__init__()
        self.tp, self.eps = tp, eps
        self.full_shape = (n_head, head_dim)
        local = tp.split(n_head, "attention heads")
        self.weight = nn.Parameter(torch.ones(local, head_dim))
        self.bias = nn.Parameter(torch.zeros(local, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, local heads, head_dim]."""
        y = F.layer_norm(x.float(), x.shape[-1:], eps=self.eps)
        return (y * self.weight.float() + self.bias.float()).type_as(x)

    def load_shard(self, read: SliceReader) -> torch.Tensor:
        return read(rows=self.tp.my_slice(self.full_shape[0]))

    def checkpoint_tensors(self, prefix: str) -> list[CheckpointTensor]:
        return [CheckpointTensor(prefix + name, self.full_shape, getattr(self, name), self.load_shard)
                for name in ("weight", "bias")]
