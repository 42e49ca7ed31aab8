"""The batch job's settings: one dataclass, loaded from YAML, overridden from the command line.

    source: s3://bucket/prompts/*.jsonl     # or a folder, a file, "bundled" (the sample prompts)
    output: s3://bucket/datasets/run1       # a Parquet dataset; rerun with the same output to resume
    model: {preset: GPT-XL, checkpoint: /ckpt/c2i_XL_384.pt, decoder: /ckpt/vq_ds16_c2i.pt, grid_size: 24}
    cache: {policy: linear, rho: 1/6}
    sampling: {cfg_scale: 4.0, top_k: 2000}
    replicas: 4
    tp: 2
    batch_size: auto                        # or a number; auto = the largest batch that fits memory
    memory_budget_gib: 20                   # one rank's memory for weights + K/V + activations
    seed: 0
    columns: {class: class_label}           # prompt field -> the files' column name
    max_error_fraction: 0.5                 # stop (exit 3) when more rows than this are rejected
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, field, replace
from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

from lineray.cache import CacheSpec
from lineray.kernels.sampling import SamplingConfig
from lineray.models.spec import ModelSpec
from lineray.validation import STRICT, from_data
from lineray.yamlfile import load_mapping


class JobConfigError(ValueError):
    """A job setting that cannot work; the message names the setting."""


# Value types of the schema (pydantic checks them; lineray.validation names the field in errors).
Whole = Annotated[int, Field(ge=1)]  # a whole number >= 1 (strict: not 2.0, "2" or true)
Positive = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]  # float limits: see validation._must_be
Share = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]  # Ray resources: fractions of a CPU or GPU
DEVICE = re.compile(r"cpu|cuda(:\d+)?")


@dataclass(frozen=True, config=STRICT)
class StageResources:
    """Ray resources of each stage. Fractions let all stages share a small node.

    A tp=1 replica is the stage actor itself and asks `generate_cpus` (+ `generate_gpus`).
    A tp>1 replica's stage actor only coordinates (it asks `coordinator_cpus`); its ranks
    live in a placement group that the TPReplica reserves.
    """
    generate_cpus: Share = 1.0
    generate_gpus: Share | None = None  # None: 1 per tp=1 replica when device is cuda (less if decoders share it)
    coordinator_cpus: Share = 0.1
    decoders: Whole = 1  # VQ decode actors
    decode_cpus: Share = 0.5
    decode_gpus: Share | None = None  # None: a GPU share (pipelines.plan.DECODE_GPU_SHARE) when device is cuda
    png_cpus: Share = 0.25
    read_cpus: Share = 0.25  # the one prompt reader task
    text_cpus: Share | None = None  # T5 text encoder actor (t2i with text rows); None = decode_cpus
    text_gpus: Share | None = None  # None: a GPU share when device is cuda, else 0

    def logical_cpus(self, replicas: int, tp: int) -> float:
        """CPUs the stages ask for at full width (a private local Ray is started with at least this)."""
        generate = replicas * (self.generate_cpus if tp == 1 else self.coordinator_cpus + tp * 0.5)
        return generate + self.decoders * self.decode_cpus + 2 * self.png_cpus + self.read_cpus


# Settings that decide what the output holds. Resuming into an output written with other values
# would mix two datasets (or cut shards differently), so the job refuses.
FINGERPRINT = ("source", "format", "columns", "shard_rows", "seed", "max_count", "model", "cache", "sampling",
               "text_encoder")
# Prompt fields a `columns` mapping may rename (see prompts.parse_prompt).
PromptField = Literal["id", "class", "text", "embedding", "prompt", "seed", "cfg", "count"]
PROMPT_FIELDS = get_args(PromptField)


@dataclass(frozen=True, config=STRICT)
class JobConfig:
    """One job, validated as a whole when it is built (from YAML, flags or Python) and before Ray starts."""
    source: Annotated[str, Field(min_length=1)]  # prompt file(s): URL, folder, glob, or "bundled"
    output: Annotated[str, Field(min_length=1)]  # output dataset URL
    format: Literal["jsonl", "csv", "parquet"] | None = None  # None = from each file's extension
    # prompt field -> column in the files: {class: class_label}
    columns: dict[PromptField, Annotated[str, Field(min_length=1)]] = field(default_factory=dict, hash=False)
    max_error_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5  # rejected rows / rows read above which the job stops (exit 3) ...
    error_check_rows: Whole = 1000  # ... once this many rows are read (a job whose every row is rejected always stops)
    model: ModelSpec = field(default_factory=ModelSpec)
    cache: CacheSpec = field(default_factory=CacheSpec)
    sampling: SamplingConfig | None = None  # None = the model's defaults (ModelSpec.default_sampling), filled in
    replicas: Whole = 1
    tp: Whole = 1
    device: str = "cpu"  # cpu, cuda or cuda:N
    batch_size: Whole | Literal["auto"] = "auto"  # images per generation batch; auto: the largest that fits (pipelines.batching)
    memory_budget_gib: Positive | None = None  # one replica rank's memory for weights + K/V + activations; None = derive
    max_batch_size: Whole | None = None  # cap for auto; None: 64 on a CPU (bigger batches stop paying), memory alone on GPU
    decode_batch_size: Whole | None = None  # None = batch_size
    compile: bool = False  # torch.compile the dense parts of the decode step (pays on GPUs, not on small CPUs)
    seed: Annotated[int, Field(ge=0)] = 0  # job seed: image seeds derive from (seed, id, image index)
    shard_rows: Whole = 256  # prompt rows per output file: the unit of commit and resume
    max_count: Whole = 1000  # largest `count` a prompt row may ask for
    read_ahead: Whole | None = None  # images handed out but unfinished; None = 2 x shard_rows + 8 x replicas x batch
    text_encoder: str | None = None  # local FLAN-T5 folder for `text` rows of a t2i model
    text_max_tokens: Whole | None = None  # None = the model's caption tokens (120 for LlamaGen t2i)
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a private local Ray
    storage_options: dict = field(default_factory=dict, hash=False)  # fsspec options (endpoint_url, key, ...)
    resources: StageResources = field(default_factory=StageResources)
    progress_interval_s: Positive = 10.0  # seconds between progress lines when stderr is not a terminal
    overwrite: bool = False  # clear the output first, even one this job did not write (otherwise it is refused)
    verify: bool = False  # on resume, checksum every committed file too (the size is always checked)
    stall_timeout_s: Positive = 600.0  # no image finished and no generator busy this long: fail naming the stuck stage
    num_cpus: Whole | None = None  # logical CPUs of a private local Ray; None: the machine's, or what the plan needs
    object_store_gib: Positive | None = None  # a private Ray's object store; None: sized from the machine's memory

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE.fullmatch(value):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {value!r}")
        return value

    @model_validator(mode="after")
    def _fits_the_model(self) -> "JobConfig":
        """What only the whole job can check: the model's defaults, its grid and heads (no Ray, no weights)."""
        if self.sampling is None:
            object.__setattr__(self, "sampling", self.model.default_sampling())  # frozen: set once, here
        # a compressing policy without a budget: the family's own (Lumina-mGPT 1/8); others must name one
        object.__setattr__(self, "cache", self.model.cache_with_budget(self.cache, fallback=None))
        cfg = self.model.config()
        try:
            cfg.check_tp(self.tp, self.model.preset)
        except ValueError as e:
            raise ValueError(f"tp: {e}") from None
        try:
            cfg.cache_plan(self.cache)
        except ValueError as e:
            raise ValueError(f"cache: {e}") from None
        return self

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "JobConfig":
        """From YAML-style data; `sampling` may name only the fields that differ from the model's defaults."""
        return from_data(cls, with_default_sampling(d), JobConfigError, what="job")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> "JobConfig":
        """Load a job file; `overrides` maps dotted keys to values ({"cache.rho": "1/6", "replicas": 2})."""
        return cls.from_dict(apply_overrides(load_yaml(path), overrides or {}))

    def replace(self, **kw) -> "JobConfig":
        return replace(self, **kw)

    # -- saving ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self) -> dict:
        """The settings that decide the output's content (see FINGERPRINT), JSON-normalised."""
        d = self.to_dict()
        return json.loads(json.dumps({k: d[k] for k in FINGERPRINT}, sort_keys=True))

    @property
    def batch_cap(self) -> int:
        """The largest batch `auto` picks: max_batch_size, else 64 on a CPU and memory alone on a GPU."""
        if self.max_batch_size is not None:
            return self.max_batch_size
        return 4096 if self.device.startswith("cuda") else 64

    @property
    def read_ahead_images(self) -> int:
        if self.batch_size == "auto":
            raise ValueError("batch_size auto is not resolved yet (pipelines.batching.resolve_batch_size)")
        return self.read_ahead or 2 * self.shard_rows + 8 * self.replicas * self.batch_size

    @property
    def replica_config(self):
        from lineray.workers.replica import ReplicaConfig
        return ReplicaConfig(model=self.model, cache=self.cache, sampling=self.sampling, tp=self.tp,
                             device=self.device, compile=self.compile)


def with_default_sampling(data: dict) -> dict:
    """`data` with its sampling section completed from its model's defaults (ModelSpec.default_sampling).

    Only a valid model section has defaults; with a bad one the data is returned as is, and
    validating it names the problem with its path."""
    sampling = data.get("sampling")
    if not isinstance(sampling, dict):
        return data
    try:
        model = from_data(ModelSpec, data.get("model"), JobConfigError, "model")
    except JobConfigError:
        return data
    return data | {"sampling": asdict(model.default_sampling()) | sampling}


def load_yaml(path: str | Path) -> dict:
    return load_mapping(path, JobConfigError, "job config")


def apply_overrides(config: dict, overrides: dict) -> dict:
    """Set dotted keys in a nested dict: {"cache.rho": "1/6"} -> config["cache"]["rho"] = "1/6"."""
    config = json.loads(json.dumps(config))  # a deep copy of plain YAML data
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise JobConfigError(f"cannot set {key}: {p} is not a section")
            node = node[p]
        node[leaf] = value
    return config


def parse_columns(items: list[str]) -> dict:
    """["class=class_label", "text=caption"] -> {"class": "class_label", "text": "caption"}."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise JobConfigError(f"--column wants FIELD=COLUMN (e.g. class=class_label), got {item!r}")
        out[key.strip()] = value.strip()
    return out


def parse_set(items: list[str]) -> dict:
    """["cache.rho=1/6", "replicas=2"] -> {"cache.rho": "1/6", "replicas": 2} (values read as YAML)."""
    out = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise JobConfigError(f"--set wants KEY=VALUE (e.g. cache.rho=1/6), got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = text
    return out
