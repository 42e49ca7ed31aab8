"""What a model replica runs: model, cache policy, sampling, tensor-parallel size and device."""
from __future__ import annotations

from dataclasses import dataclass, field

from lineray.cache import CacheSpec
from lineray.kernels.sampling import SamplingConfig
from lineray.models.spec import ModelSpec


@dataclass(frozen=True)
class ReplicaConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    cache: CacheSpec = field(default_factory=CacheSpec)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tp: int = 1
    device: str = "cpu"  # "cuda": the GPU Ray assigned to each rank (devices.local_device)
    compile: bool = False  # torch.compile the dense parts of the step (Transformer.compile_dense)
