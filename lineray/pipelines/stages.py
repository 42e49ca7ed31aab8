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

from lineray.images import png_bytes, to_uint8
from lineray.models.generate import Condition
from lineray.models.spec import ModelSpec
from lineray.pipelines.monitor import stage_report
from lineray.workers.replica import ReplicaConfig, make_replica


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
        tokens = np.empty((n, self.model_cfg.image_tokens), dtype=np.int32)
        scales = np.asarray(batch["cfg_scale"], dtype=np.float64)
        for scale in np.unique(scales):  # one call per guidance scale in the batch (usually one)
            idx = np.flatnonzero(scales == scale)
            sampling = replace(self.sampling, cfg_scale=float(scale))
            seeds = [int(s) for s in np.asarray(batch["seed"])[idx]]
            tokens[idx] = self.replica.generate(self.condition(batch, idx), seeds, sampling=sampling).numpy()
        out = {k: v for k, v in batch.items() if k not in ("embedding", "embedding_tokens", "prompt_ids")}
        out["tokens"] = tokens
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
    """Image tokens -> uint8 pixels [B, H, W, 3] with the model's VQ decoder, on the GPU when the plan gave it one."""
    stage = "decode"

    def __init__(self, model: ModelSpec, device: str = "cpu", monitor=None):
        self.decoder = model.build_decoder(device=device)
        cfg = model.config()
        # By line as generated: a family with end-of-line tokens (Lumina) has them last; its decoder drops them.
        self.grid = (cfg.grid_h, cfg.line_tokens)
        self.device = device
        self.monitor = monitor
        stage_report(monitor, self.stage)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._begin(len(batch["tokens"]))
        codes = torch.from_numpy(np.asarray(batch["tokens"], dtype=np.int64)).view(-1, *self.grid)
        with torch.inference_mode():
            pixels = to_uint8(self.decoder.decode_codes(codes.to(self.device)))
        out = {k: v for k, v in batch.items() if k != "tokens"}
        out["pixels"] = pixels
        self._end(len(pixels))
        return out


def encode_png(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """uint8 pixels -> PNG bytes, width and height (a stateless Ray task)."""
    pixels = np.asarray(batch["pixels"])
    out = {k: v for k, v in batch.items() if k != "pixels"}
    png = np.empty(len(pixels), dtype=object)
    for i, image in enumerate(pixels):
        png[i] = png_bytes(image)
    out["png"] = png
    out["height"] = np.full(len(pixels), pixels.shape[1], dtype=np.int32)
    out["width"] = np.full(len(pixels), pixels.shape[2], dtype=np.int32)
    return out
