"""Images per generation batch: a number from the job, or `auto`, the largest batch that fits memory.

Memory per replica rank is weights + K/V + activations (lineray.models.sizing), so a
compressed cache buys a proportionally larger batch. The budget is `memory_budget_gib`,
else derived from what the driver can see: the node's available memory on a CPU job,
the GPU's total memory on a CUDA job.
"""
from __future__ import annotations

from dataclasses import dataclass

from lineray.cluster.local import available_memory  # noqa: F401 - batching.available_memory is patched in tests
from lineray.pipelines.config import JobConfig, JobConfigError

GiB = 2**30
CPU_SHARE = 0.5  # of the node's available memory: decoders, PNG workers and Ray's object store need the rest
GPU_SHARE = 0.9  # of a GPU's memory: the CUDA context and allocator fragmentation need the rest


@dataclass(frozen=True)
class BatchChoice:
    size: int
    reason: str

    def line(self) -> str:
        return f"batch size {self.size} per replica ({self.reason})"


def resolve_batch_size(job: JobConfig) -> BatchChoice:
    """The job's batch size as a number, with the reason (see the module docstring for the rules)."""
    from lineray.pipelines.checks import cache_policy_name

    if job.batch_size != "auto" and job.memory_budget_gib is None:
        return BatchChoice(job.batch_size, "set in the job")
    plan = job_memory_plan(job)
    budget, where = budget_bytes(job)
    fit = plan.max_batch(budget)
    cache = cache_policy_name(job)
    if job.batch_size != "auto":
        if job.batch_size > fit:
            raise JobConfigError(f"batch_size {job.batch_size} does not fit {where} with cache {cache}: "
                                 f"the largest batch that fits is {fit}")
        return BatchChoice(job.batch_size, f"set in the job; up to {fit} fit {where}")
    if fit < 1:
        raise JobConfigError(f"batch_size auto: not even 1 image fits {where}: the weights alone take "
                             f"{_gib(plan.weights_bytes)} GiB per rank, and each image "
                             f"{plan.bytes_per_image / 2**20:.1f} MiB; set a larger memory_budget_gib, or a larger tp")
    capped = "; capped by max_batch_size" if fit > job.batch_cap else ""
    return BatchChoice(min(fit, job.batch_cap), f"auto: {fit} fit {where} with {cache}{capped}")


def job_memory_plan(job: JobConfig):
    from lineray.models.sizing import largest_memory_plan
    from lineray.models.spec import parse_dtype

    # The dtype the replicas will use; for `auto` on a GPU the driver cannot see, fp32 (the larger one).
    dtype = parse_dtype(job.model.dtype, job.device)
    # CFG doubles the rows. (Not counted: rows asking their own cfg > 1 in a job without CFG.) Rows may ask
    # their own image size (Lumina-mGPT): sized for the grid that costs the most per image.
    return largest_memory_plan(job.model.config(), job.cache, dtype, cfg_rows=job.sampling.uses_cfg, tp=job.tp)


def budget_bytes(job: JobConfig) -> tuple[int, str]:
    """Bytes one replica rank may use, and where that number comes from (for the job's log line)."""
    if job.memory_budget_gib is not None:
        return int(job.memory_budget_gib * GiB), f"memory_budget_gib {job.memory_budget_gib:g}"
    ranks = job.replicas * job.tp
    if job.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise JobConfigError("batch_size auto on cuda needs memory_budget_gib (memory one GPU rank may use for "
                                 "weights + K/V + activations): the driver cannot see a GPU")
        props = torch.cuda.get_device_properties(torch.device(job.device).index or 0)
        # A tp=1 replica asking a fraction of a GPU (resources.generate_gpus) shares it: that fraction is its own.
        gpus = job.resources.generate_gpus if job.tp == 1 and job.resources.generate_gpus else 1.0
        share = GPU_SHARE * min(gpus, 1.0)
        budget = int(share * props.total_memory)
        return budget, f"{_gib(budget)} GiB ({share:g} of the {props.name}'s {_gib(props.total_memory)} GiB)"
    # CPU: every rank of the job may land on this node (a private Ray does that), so they share it.
    free = available_memory()
    budget = int(CPU_SHARE * free / ranks)
    shared = f" / {ranks} ranks" if ranks > 1 else ""
    return budget, f"{_gib(budget)} GiB ({CPU_SHARE:g} of the node's {_gib(free)} GiB available{shared})"


def _gib(n: int | float) -> str:
    return f"{n / GiB:.1f}"
