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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from lineray.cache import CacheSpec
from lineray.validation import from_data
from lineray.yamlfile import load_mapping
from lineray.kernels.sampling import SamplingConfig
from lineray.models.spec import ModelSpec


class JobConfigError(ValueError):
    """A job setting that cannot work; the message names the setting."""


@dataclass(frozen=True)
class StageResources:
    """Ray resources of each stage. Fractions let all stages share a small node.

    A tp=1 replica is the stage actor itself and asks `generate_cpus` (+ `generate_gpus`).
    A tp>1 replica's stage actor only coordinates (it asks `coordinator_cpus`); its ranks
    live in a placement group that the TPReplica reserves.
    """
    generate_cpus: float = 1.0
    generate_gpus: float | None = None  # None: 1 per tp=1 replica when device is cuda (less if decoders share it)
    coordinator_cpus: float = 0.1
    decoders: int = 1  # VQ decode actors
    decode_cpus: float = 0.5
    decode_gpus: float | None = None  # None: a GPU share (pipelines.plan.DECODE_GPU_SHARE) when device is cuda
    png_cpus: float = 0.25
    read_cpus: float = 0.25  # the one prompt reader task
    text_cpus: float | None = None  # T5 text encoder actor (t2i with text rows); None = decode_cpus
    text_gpus: float | None = None  # None: a GPU share when device is cuda, else 0

    def logical_cpus(self, replicas: int, tp: int) -> float:
        """CPUs the stages ask for at full width (a private local Ray is started with at least this)."""
        generate = replicas * (self.generate_cpus if tp == 1 else self.coordinator_cpus + tp * 0.5)
        return generate + self.decoders * self.decode_cpus + 2 * self.png_cpus + self.read_cpus


# Settings that decide what the output holds. Resuming into an output written with other values
# would mix two datasets (or cut shards differently), so the job refuses.
FINGERPRINT = ("source", "format", "columns", "shard_rows", "seed", "max_count", "model", "cache", "sampling",
               "text_encoder")
# Prompt fields a `columns` mapping may rename (see prompts.parse_prompt).
PROMPT_FIELDS = ("id", "class", "text", "embedding", "seed", "cfg", "count")


@dataclass(frozen=True)
class JobConfig:
    source: str  # prompt file(s): URL, folder, glob, or "bundled"
    output: str  # output dataset URL
    format: str | None = None  # jsonl / csv / parquet; None = from each file's extension
    columns: dict = field(default_factory=dict, hash=False)  # prompt field -> column in the files: {class: class_label}
    max_error_fraction: float = 0.5  # rejected rows / rows read above which the job stops (exit 3) ...
    error_check_rows: int = 1000  # ... once this many rows are read (a job whose every row is rejected always stops)
    model: ModelSpec = field(default_factory=ModelSpec)
    cache: CacheSpec = field(default_factory=CacheSpec)
    sampling: SamplingConfig | None = None  # None = the model's defaults (lineray.api.default_sampling)
    replicas: int = 1
    tp: int = 1
    device: str = "cpu"
    batch_size: int | str = "auto"  # images per generation batch; auto: the largest that fits (pipelines.batching)
    memory_budget_gib: float | None = None  # one replica rank's memory for weights + K/V + activations; None = derive
    max_batch_size: int | None = None  # cap for auto; None: 64 on a CPU (bigger batches stop paying), memory alone on GPU
    decode_batch_size: int | None = None  # None = batch_size
    compile: bool = False  # torch.compile the dense parts of the decode step (pays on GPUs, not on small CPUs)
    seed: int = 0  # job seed: image seeds derive from (seed, id, image index)
    shard_rows: int = 256  # prompt rows per output file: the unit of commit and resume
    max_count: int = 1000  # largest `count` a prompt row may ask for
    read_ahead: int | None = None  # images handed out but unfinished; None = 2 x shard_rows + 8 x replicas x batch
    text_encoder: str | None = None  # local FLAN-T5 folder for `text` rows of a t2i model
    text_max_tokens: int | None = None  # None = the model's caption tokens (120 for LlamaGen t2i)
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a private local Ray
    storage_options: dict = field(default_factory=dict, hash=False)  # fsspec options (endpoint_url, key, ...)
    resources: StageResources = field(default_factory=StageResources)
    progress_interval_s: float = 10.0  # seconds between progress lines when stderr is not a terminal
    overwrite: bool = False  # clear the output first, even one this job did not write (otherwise it is refused)
    verify: bool = False  # on resume, checksum every committed file too (the size is always checked)
    stall_timeout_s: float = 600.0  # no image finished and no generator busy this long: fail naming the stuck stage
    num_cpus: int | None = None  # logical CPUs of a private local Ray; None: the machine's, or what the plan needs
    object_store_gib: float | None = None  # a private Ray's object store; None: sized from the machine's memory

    def __post_init__(self):
        for name in ("replicas", "tp", "shard_rows", "max_count", "error_check_rows"):
            if not _whole(getattr(self, name)):
                raise JobConfigError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        for name in ("max_batch_size", "num_cpus"):
            if getattr(self, name) is not None and not _whole(getattr(self, name)):
                raise JobConfigError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.max_error_fraction, (int, float)) or isinstance(self.max_error_fraction, bool) \
                or not 0 <= self.max_error_fraction <= 1:
            raise JobConfigError(f"max_error_fraction must be a number in 0..1, got {self.max_error_fraction!r}")
        if not isinstance(self.columns, dict) or not all(isinstance(v, str) and v for v in self.columns.values()):
            raise JobConfigError(f"columns maps prompt fields to column names, e.g. {{class: class_label}}; "
                                 f"got {self.columns!r}")
        bad = sorted(set(self.columns) - set(PROMPT_FIELDS))
        if bad:
            raise JobConfigError(f"columns: unknown prompt field(s) {', '.join(map(str, bad))}; "
                                 f"known: {', '.join(PROMPT_FIELDS)}")
        for name in ("stall_timeout_s", "object_store_gib"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise JobConfigError(f"{name} must be a number > 0, got {v!r}")
        if self.batch_size != "auto" and not _whole(self.batch_size):
            raise JobConfigError(f"batch_size must be a whole number >= 1 or auto, got {self.batch_size!r}")
        budget = self.memory_budget_gib
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not 0 < budget < float("inf")):
            raise JobConfigError(f"memory_budget_gib must be a number of GiB > 0, got {budget!r}")
        if self.decode_batch_size is not None and self.decode_batch_size < 1:
            raise JobConfigError(f"decode_batch_size must be >= 1, got {self.decode_batch_size!r}")
        if not self.source:
            raise JobConfigError("source is required: the URL of the prompt file(s)")
        if not self.output:
            raise JobConfigError("output is required: the URL of the output dataset")
        if self.format not in (None, "jsonl", "csv", "parquet"):
            raise JobConfigError(f"format must be jsonl, csv or parquet, got {self.format!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise JobConfigError(f"seed must be a whole number >= 0, got {self.seed!r}")

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "JobConfig":
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise JobConfigError(f"unknown job setting(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        try:
            model = d["model"] if isinstance(d.get("model"), ModelSpec) else from_data(ModelSpec, d.get("model"), JobConfigError, "model")
            d["model"] = model
            if not isinstance(d.get("cache"), CacheSpec):
                d["cache"] = CacheSpec.from_dict(d.get("cache"))
            if not isinstance(d.get("sampling"), SamplingConfig):
                d["sampling"] = resolve_sampling(model, d.get("sampling"))
            if not isinstance(d.get("resources"), StageResources):
                res = dict(d.get("resources") or {})
                bad = set(res) - {f.name for f in fields(StageResources)}
                if bad:
                    raise JobConfigError(f"unknown resources setting(s): {', '.join(sorted(bad))}")
                d["resources"] = StageResources(**res)
            d["storage_options"] = dict(d.get("storage_options") or {})
            d["columns"] = dict(d.get("columns") or {})
            return cls(**d)
        except JobConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise JobConfigError(str(e)) from None

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


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def resolve_sampling(model: ModelSpec, given: dict | None) -> SamplingConfig:
    """The model's default sampling settings, overridden field by field."""
    base = asdict(model.default_sampling())
    given = dict(given or {})
    bad = set(given) - set(base)
    if bad:
        raise JobConfigError(f"unknown sampling setting(s): {', '.join(sorted(bad))}")
    return SamplingConfig(**(base | given))


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
