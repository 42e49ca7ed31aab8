"""The job's Ray Data stages: generate tokens -> decode pixels -> encode PNG.

Each is its own stage so the generators never wait on decoding or compression:
Ray Data streams batches between them with backpressure. Batches are dicts of
numpy arrays, one entry per image (see sources.iter_shards for the columns).
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from lineray.images import png_bytes
from lineray.models.decoding import decode_images
from lineray.models.generate import Condition
from lineray.models.spec import ModelSpec
from lineray.pipelines.monitor import stage_report
from lineray.pipelines.prompts import SAMPLED_GRID
from lineray.workers.replica import ReplicaConfig, make_replica, sample_sizes_then_generate


class _Reported:
    """Tells the job's monitor (pipelines.monitor) when a batch goes in and out of this stage."""
    stage = ""
    monitor = None

    def _begin(self, n: int) -> None:
        if self.monitor is not None:
            self.monitor.batch_started.remote(self.stage, n)

    def _end(self, n: int) -> None:
        if self.monitor is not None:
            self.monitor.batch_done.remote(self.stage, n)


class GenerateStage(_Reported):
    """One model replica. tp=1: the model lives in this actor. tp>1: this actor only
    coordinates; the TPReplica reserves a placement group for its ranks here, in the
    constructor, so the group lives and dies with this actor (Ray Data's
    ray_remote_args_fn would create and leak groups)."""

    stage = "generate"

    def __init__(self, cfg: ReplicaConfig, monitor=None):
        self.replica = make_replica(cfg)
        self.sampling = cfg.sampling
        self.model_cfg = cfg.model.config()
        self.own_grid = (self.model_cfg.grid_h, self.model_cfg.grid_width)
        self.monitor = monitor
        self.group = None
        stage_report(monitor, self.stage)
        self._report_group()

    def _report_group(self) -> None:
        """A tp>1 replica's placement group (new after a rebuild): the driver removes what is left after the job."""
        group = getattr(self.replica, "placement_group_id", None)
        if group and group != self.group and self.monitor is not None:
            self.monitor.replica_group.remote(group)
        self.group = group

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        n = len(batch["seed"])
        self._begin(n)
        scales = np.asarray(batch["cfg_scale"], dtype=np.float64)
        grids = batch_grids(batch, self.own_grid)
        images: list = [None] * n
        # One call per image grid and guidance scale in the batch (usually one of each): a call runs one grid.
        for key in np.unique(np.column_stack([grids, scales]), axis=0):
            idx = np.flatnonzero((grids == key[:2]).all(1) & (scales == key[2]))
            grid = (int(key[0]), int(key[1]))
            sampling = replace(self.sampling, cfg_scale=float(key[2]))
            seeds = [int(s) for s in np.asarray(batch["seed"])[idx]]
            if grid == SAMPLED_GRID:  # the model draws each image's size, then makes each size's images together
                prompts = [np.asarray(batch["prompt_ids"][i]).tolist() for i in idx]
                tokens, drawn = sample_sizes_then_generate(self.replica, prompts, seeds, sampling)
                grids[idx] = drawn
            else:
                tokens = self.replica.generate(self.condition(batch, idx), seeds, sampling=sampling,
                                               grid=None if grid == self.own_grid else grid)
            for j, i in enumerate(idx):
                images[i] = tokens[j].numpy()
        out = {k: v for k, v in batch.items() if k not in ("embedding", "embedding_tokens", "prompt_ids")}
        out["tokens"] = padded(images)
        out["grid_h"], out["grid_w"] = grids[:, 0].astype(np.int32), grids[:, 1].astype(np.int32)
        out["generate_s"] = np.full(n, (time.perf_counter() - start) / n)  # for progress: generator busy time
        self._end(n)
        self._report_group()
        return out

    def condition(self, batch: dict[str, np.ndarray], idx: np.ndarray) -> Condition:
        cfg = self.model_cfg
        if cfg.model_type == "c2i":
            return Condition.classes(torch.as_tensor(np.asarray(batch["label"])[idx], dtype=torch.long))
        if cfg.model_type == "text":  # token ids from the reader (prompts.RowRules.prompt_ids)
            return Condition.prompts([np.asarray(batch["prompt_ids"][i]).tolist() for i in idx])
        # Valid caption tokens go at the end of the condition slots, padding first (LlamaGen's layout).
        T, D = cfg.cls_token_num, cfg.caption_dim
        captions = torch.zeros(len(idx), T, D)
        mask = torch.zeros(len(idx), T, dtype=torch.bool)
        for j, i in enumerate(idx):
            t = int(batch["embedding_tokens"][i])
            captions[j, T - t:] = torch.from_numpy(np.asarray(batch["embedding"][i], dtype=np.float32).reshape(t, D))
            mask[j, T - t:] = True
        return Condition(captions=captions, caption_mask=mask)

    def __del__(self):
        replica = getattr(self, "replica", None)
        if replica is not None:
            replica.shutdown()


class DecodeStage(_Reported):
    """Image tokens -> uint8 pixels [B, H, W, 3] with the model's VQ decoder, on the GPU when the plan gave it one.
    Images of several sizes (Lumina-mGPT) are decoded one grid at a time and padded to the batch's largest, with
    each one's `height` and `width`."""
    stage = "decode"

    def __init__(self, model: ModelSpec, device: str = "cpu", monitor=None):
        self.decoder = model.build_decoder(device=device)
        self.model_cfg = model.config()
        self.own_grid = (self.model_cfg.grid_h, self.model_cfg.grid_width)
        self.device = device
        self.monitor = monitor
        stage_report(monitor, self.stage)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = np.asarray(batch["tokens"], dtype=np.int64)
        self._begin(len(tokens))
        grids = [(int(r), int(c)) for r, c in batch_grids(batch, self.own_grid)]
        images = decode_images(self.decoder, self.model_cfg, tokens, grids, self.device)
        out = {k: v for k, v in batch.items() if k != "tokens"}
        out["height"] = np.array([im.shape[0] for im in images], dtype=np.int32)
        out["width"] = np.array([im.shape[1] for im in images], dtype=np.int32)
        out["pixels"] = padded(images, fill=0)
        self._end(len(images))
        return out


def batch_grids(batch: dict[str, np.ndarray], own: tuple[int, int]) -> np.ndarray:
    """[n, 2] (rows, cols) of each image: the reader's grid columns, or the model's own grid for a batch without."""
    if "grid_h" not in batch:
        return np.tile(np.asarray(own, dtype=np.int64), (len(batch["seed"]), 1))
    return np.stack([np.asarray(batch["grid_h"]), np.asarray(batch["grid_w"])], axis=1).astype(np.int64)


def padded(arrays: list[np.ndarray], fill: int = -1) -> np.ndarray:
    """Arrays of one rank stacked, each padded at the end of every axis to the largest (`fill`): a batch
    column of tokens or pixels whose images have different sizes (their true sizes travel beside them)."""
    shape = tuple(max(a.shape[d] for a in arrays) for d in range(arrays[0].ndim))
    if all(a.shape == shape for a in arrays):
        return np.stack(arrays)
    out = np.full((len(arrays), *shape), fill, dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[(i, *(slice(0, n) for n in a.shape))] = a
    return out


def encode_png(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """uint8 pixels (padded to the batch's largest; each image's `height` x `width`) -> PNG bytes (a stateless
    Ray task)."""
    pixels = np.asarray(batch["pixels"])
    heights, widths = np.asarray(batch["height"]), np.asarray(batch["width"])
    out = {k: v for k, v in batch.items() if k != "pixels"}
    png = np.empty(len(pixels), dtype=object)
    for i, image in enumerate(pixels):
        png[i] = png_bytes(image[:heights[i], :widths[i]])
    out["png"] = png
    return out
