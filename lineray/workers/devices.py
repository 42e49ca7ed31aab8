"""Which device this process computes on, and how it is set up.

A Ray actor started with num_gpus=1 sees only the GPU Ray assigned to it: Ray sets
CUDA_VISIBLE_DEVICES to that GPU's id, so inside the actor it is cuda:0, whatever its
physical number. `ray.get_gpu_ids()` gives the id as the node names it (an index or a
UUID); its position in CUDA_VISIBLE_DEVICES is the index torch uses. A bare
`torch.device("cuda")` has no index, and `torch.cuda.set_device` refuses it.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch


def cuda_index(assigned_ids: Sequence[int | str], visible_devices: str | None) -> int:
    """The CUDA index, as this process numbers its GPUs, of the first GPU Ray assigned to it.

    assigned_ids: `ray.get_gpu_ids()`. visible_devices: this process's CUDA_VISIBLE_DEVICES
    (None when unset: every GPU is visible and an id is its index, as with
    RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1).
    """
    if not assigned_ids:
        raise RuntimeError("Ray assigned no GPU to this worker: a CUDA worker needs num_gpus=1")
    first = str(assigned_ids[0]).strip()
    if visible_devices is None:
        if not first.isdigit():
            raise RuntimeError(f"Ray assigned GPU {first!r} but CUDA_VISIBLE_DEVICES is unset: "
                               "cannot tell which CUDA index it is")
        return int(first)
    visible = [v.strip() for v in visible_devices.split(",") if v.strip()]
    if first not in visible:
        raise RuntimeError(f"Ray assigned GPU {first!r}, which is not in CUDA_VISIBLE_DEVICES={visible_devices!r}")
    return visible.index(first)


def local_device(device: str | torch.device) -> torch.device:
    """The device this process should compute on for a configured `device` ("cpu", "cuda", "cuda:1").

    In a Ray worker that was given GPUs: the first of them, whatever index the config
    named (every rank of a replica gets the same config). Elsewhere (a script, the CLI,
    an actor without GPUs): the configured index, else the current CUDA device.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ValueError(f"device {str(device)!r} asked for, but this process sees no CUDA GPU "
                         f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={visible!r})")
    assigned = _ray_gpu_ids()
    if assigned:
        return torch.device("cuda", cuda_index(assigned, os.environ.get("CUDA_VISIBLE_DEVICES")))
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


def _ray_gpu_ids() -> list:
    try:
        import ray
    except ImportError:
        return []
    return ray.get_gpu_ids() if ray.is_initialized() else []


def setup_device(device: str | torch.device) -> torch.device:
    """Resolve `device` (local_device), make it current, and on CUDA allow TF32 for fp32 matmuls and convolutions.

    TF32 keeps fp32 models (dtype float32 on a GPU) on the tensor cores, ~8x faster than
    full fp32 at ~1e-3 relative error; bf16 models are unaffected.
    """
    device = local_device(device)
    make_current(device)
    if device.type == "cuda":
        enable_tf32()
    return device


def make_current(device: torch.device) -> None:
    """Make a CUDA device this thread's current one (per host thread: call it where work starts on
    a thread, e.g. in a threaded actor's method). Nothing to do on CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def enable_tf32() -> None:
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    except AttributeError:  # torch < 2.9 (before the fp32_precision settings)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
