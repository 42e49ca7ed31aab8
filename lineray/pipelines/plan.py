"""The job's resource plan: every stage's Ray resources, checked against the cluster before the job starts.

A Ray Data pipeline whose stages cannot all hold a slot at once does not fail: it
waits forever (a 2-CPU Ray with two 0.5-CPU replicas, a 0.25-CPU decoder, reader and
PNG task has no CPU left for Ray Data's repartition task, which asks a whole one).
So the job counts every stage, including Ray Data's own tasks, places them on the
cluster's nodes (placement groups packed on one node, fractional GPUs on one GPU),
adapts what it may and refuses the rest with the numbers:

1. GPUs: tp=1 replicas that take a whole GPU each leave nothing for the VQ decoders
   (issue 16: 8 one-GPU replicas + `decode_gpus > 0` = decoders never scheduled); the
   replicas then ask `1 - decode share` so a decoder fits beside them on a GPU.
   tp>1 ranks hold whole GPUs in their placement group: with no GPU left the decoders
   run on CPU (said in the plan).
2. CPUs: fractional asks below 1 (stage actors and tasks are mostly waiting, the
   numbers are scheduling tokens) are scaled down together, to no less than
   MIN_SCALE of what the job asked.
3. Replicas: fewer, down to 1.
Anything still unplaceable is a PlanError naming what the job needs and what the
cluster has. Resources that exist but are taken by others now are not refused: the
job waits for them, and the monitor (pipelines.monitor) names the stage if nothing
moves for `stall_timeout_s`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

REPARTITION_CPUS = 1.0  # Ray Data's streaming repartition is a task asking 1 CPU (not configurable in Ray 2.60)
DECODE_GPU_SHARE = 0.25  # a VQ decoder's share of a GPU when the job does not say
TEXT_GPU_SHARE = 0.25  # the T5 text encoder's
MIN_SCALE = 0.2  # fractional CPU asks shrink to no less than this share of what the job asked


class PlanError(ValueError):
    """The job cannot run on this cluster; the message gives the numbers."""


@dataclass(frozen=True)
class NodeShape:
    cpus: float
    gpus: int = 0


@dataclass(frozen=True)
class ClusterShape:
    nodes: tuple[NodeShape, ...]
    where: str = "the cluster"

    @classmethod
    def single(cls, cpus: float, gpus: int = 0, where: str = "the private Ray") -> "ClusterShape":
        return cls((NodeShape(cpus, gpus),), where)

    @classmethod
    def from_ray(cls, where: str = "the cluster") -> "ClusterShape":
        import ray
        nodes = tuple(NodeShape(n["Resources"].get("CPU", 0.0), int(n["Resources"].get("GPU", 0)))
                      for n in ray.nodes() if n.get("Alive"))
        return cls(nodes, where)

    @property
    def cpus(self) -> float:
        return sum(n.cpus for n in self.nodes)

    @property
    def gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)

    def describe(self) -> str:
        gpus = f", {self.gpus} GPU" if self.gpus else ""
        return f"{self.where} ({len(self.nodes)} node{'s' * (len(self.nodes) > 1)}: {self.cpus:g} CPU{gpus})"


@dataclass(frozen=True)
class Stage:
    """`count` instances, each asking `cpus`/`gpus`; a placement group (ranks > 0) packs ranks x rank_* on one node."""
    name: str
    count: int
    cpus: float
    gpus: float = 0.0
    ranks: int = 0
    rank_cpus: float = 0.0
    rank_gpus: float = 0.0
    scalable: bool = True  # its CPU ask may shrink (Ray Data's own tasks and placement-group ranks may not)

    def describe(self) -> str:
        ask = f"{self.cpus:g} CPU" + (f" + {self.gpus:g} GPU" if self.gpus else "")
        group = f" + {self.ranks} ranks x {self.rank_cpus:g} CPU" + (
            f" + {self.rank_gpus:g} GPU" if self.rank_gpus else "") if self.ranks else ""
        return f"{self.name} {self.count} x ({ask}{group})"


@dataclass(frozen=True)
class ResourcePlan:
    replicas: int
    stages: tuple[Stage, ...]
    cluster: ClusterShape
    generate_cpus: float  # a tp=1 replica's actor, or a tp>1 replica's coordinator
    generate_gpus: float
    decode_cpus: float
    decode_gpus: float
    text_cpus: float
    text_gpus: float
    read_cpus: float
    png_cpus: float
    adapted: tuple[str, ...] = field(default=())

    @property
    def decode_device(self) -> str:
        return "cuda" if self.decode_gpus > 0 else "cpu"

    @property
    def text_device(self) -> str:
        return "cuda" if self.text_gpus > 0 else "cpu"

    @property
    def cpus_needed(self) -> float:
        return _cpus(self.stages)

    @property
    def gpus_needed(self) -> float:
        return _gpus(self.stages)

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def line(self) -> str:
        gpus = f" + {self.gpus_needed:g} GPU" if self.gpus_needed else ""
        adapted = f"; adapted: {'; '.join(self.adapted)}" if self.adapted else ""
        return (f"resources: {self.cpus_needed:.2f} CPU{gpus} of {self.cluster.describe()}: "
                f"{', '.join(s.describe() for s in self.stages)}{adapted}")


def plan_job(job, cluster: ClusterShape, text_stage: bool = False, rank_cpus: float | None = None) -> ResourcePlan:
    """The job's stages on `cluster`, adapted to fit (module docstring), or PlanError."""
    from lineray.workers.tp_replica import TPOptions

    res = job.resources
    rank_cpus = TPOptions().cpus_per_rank if rank_cpus is None else rank_cpus
    on_gpu = job.device.startswith("cuda")
    if on_gpu and cluster.gpus == 0:
        raise PlanError(f"device is {job.device} but {cluster.describe()} has no GPU")
    adapted: list[str] = []
    gen_gpus = res.generate_gpus if res.generate_gpus is not None else (1.0 if on_gpu and job.tp == 1 else 0.0)
    if job.tp > 1:
        gen_gpus = 0.0  # the coordinator; its ranks hold the GPUs
    decode_gpus = res.decode_gpus if res.decode_gpus is not None else (DECODE_GPU_SHARE if on_gpu else 0.0)
    text_gpus = res.text_gpus if res.text_gpus is not None else (TEXT_GPU_SHARE if on_gpu else 0.0)
    text_gpus = text_gpus if text_stage else 0.0
    asks = {"generate": res.generate_cpus if job.tp == 1 else res.coordinator_cpus, "decode": res.decode_cpus,
            "text": res.text_cpus if res.text_cpus is not None else res.decode_cpus, "read": res.read_cpus,
            "png": res.png_cpus}
    replicas, scale = job.replicas, 1.0

    def build() -> tuple[Stage, ...]:
        c = {k: _scaled(v, scale) for k, v in asks.items()}
        stages = [Stage("read", 1, c["read"]), Stage("repartition", 1, REPARTITION_CPUS, scalable=False)]
        if text_stage:
            stages.append(Stage("text", 1, c["text"], text_gpus))
        if job.tp == 1:
            stages.append(Stage("generate", replicas, c["generate"], gen_gpus))
        else:
            stages.append(Stage("generate", replicas, c["generate"], 0.0, ranks=job.tp, rank_cpus=rank_cpus,
                                rank_gpus=1.0 if on_gpu else 0.0))
        stages += [Stage("decode", res.decoders, c["decode"], decode_gpus), Stage("png", 1, c["png"])]
        return tuple(stages)

    while True:
        stages = build()
        if _fits(stages, cluster):
            break
        # 1. GPUs: replicas that take whole GPUs make room for the decoders (and the text encoder).
        share = max(decode_gpus, text_gpus)
        if on_gpu and job.tp == 1 and res.generate_gpus is None and gen_gpus == 1.0 and 0 < share < 1:
            gen_gpus = 1.0 - share
            adapted.append(f"each replica asks {gen_gpus:g} GPU so the decoders' {share:g} GPU fits beside it")
            continue
        if on_gpu and res.decode_gpus is None and decode_gpus > 0 and (job.tp > 1 or res.generate_gpus is not None):
            decode_gpus = 0.0
            text_gpus = text_gpus if res.text_gpus is not None else 0.0
            adapted.append("decoders on CPU: the replicas hold every GPU")
            continue
        # 2. CPUs: shrink the fractional asks together.
        need = _scaled_need(stages, cluster)
        if need is not None and need < scale and need >= MIN_SCALE:
            scale = need
            continue
        # 3. Fewer replicas (with the fractional asks as the job gave them).
        if replicas > 1:
            replicas, scale = replicas - 1, 1.0
            continue
        if scale > MIN_SCALE and any(0 < a < 1 for a in asks.values()):
            scale = MIN_SCALE
            if _fits(build(), cluster):
                continue
        raise PlanError(f"the job cannot run on {cluster.describe()}: it needs {_cpus(stages):.2f} CPU"
                        f"{f' + {_gpus(stages):g} GPU' if _gpus(stages) else ''} at once "
                        f"({', '.join(s.describe() for s in stages)}); give Ray more CPUs/GPUs (num_cpus, "
                        f"a bigger cluster) or ask less (resources:, replicas, tp)")
    if replicas != job.replicas:
        adapted.append(f"replicas {job.replicas} -> {replicas}")
    if scale < 1.0:
        adapted.append(f"fractional CPU asks x{scale:.2f} to fit {cluster.cpus:g} CPU")
    c = {k: _scaled(v, scale) for k, v in asks.items()}
    return ResourcePlan(replicas=replicas, stages=stages, cluster=cluster, generate_cpus=c["generate"],
                        generate_gpus=gen_gpus, decode_cpus=c["decode"], decode_gpus=decode_gpus,
                        text_cpus=c["text"], text_gpus=text_gpus, read_cpus=c["read"], png_cpus=c["png"],
                        adapted=tuple(adapted))


def cpus_for_private_ray(job, text_stage: bool = False) -> int:
    """Logical CPUs a private Ray needs so that the job's plan fits unadapted."""
    big = ClusterShape.single(cpus=1e6, gpus=1_000)
    return math.ceil(plan_job(job.replace(device="cpu"), big, text_stage).cpus_needed)


def _scaled(cpus: float, scale: float) -> float:
    return round(cpus * scale, 3) if 0 < cpus < 1 else cpus


def _cpus(stages) -> float:
    return sum(s.count * (s.cpus + s.ranks * s.rank_cpus) for s in stages)


def _gpus(stages) -> float:
    return sum(s.count * (s.gpus + s.ranks * s.rank_gpus) for s in stages)


def _scaled_need(stages, cluster: ClusterShape) -> float | None:
    """The scale of the scalable fractional asks that makes the CPU total fit (None: nothing to scale)."""
    fixed = sum(s.count * (s.cpus if not (s.scalable and 0 < s.cpus < 1) else 0) + s.count * s.ranks * s.rank_cpus
                for s in stages)
    scalable = sum(s.count * s.cpus for s in stages if s.scalable and 0 < s.cpus < 1)
    if not scalable or cluster.cpus <= fixed:
        return None
    # Rounded down to a percent, and a hair under, so that the rounded asks still sum below the capacity.
    return math.floor(100 * min(1.0, (cluster.cpus - fixed) / scalable)) / 100 * 0.999


def _fits(stages, cluster: ClusterShape) -> bool:
    """Place every instance first-fit decreasing: CPUs per node, whole GPUs, fractional GPUs inside one GPU."""
    nodes = [{"cpu": n.cpus, "gpu": [1.0] * n.gpus} for n in cluster.nodes]
    items = []  # (cpus, [gpu asks]) that must land on one node together
    for s in stages:
        for _ in range(s.count):
            items.append((s.cpus, [s.gpus] if s.gpus else []))
            if s.ranks:
                items.append((s.ranks * s.rank_cpus, [s.rank_gpus] * s.ranks if s.rank_gpus else []))
    items.sort(key=lambda it: (sum(it[1]), it[0]), reverse=True)
    eps = 1e-9
    for cpus, gpus in items:
        for node in nodes:
            if node["cpu"] + eps < cpus:
                continue
            trial = list(node["gpu"])
            if all(_take_gpu(trial, g) for g in sorted(gpus, reverse=True)):
                node["cpu"] -= cpus
                node["gpu"] = trial
                break
        else:
            return False
    return True


def _take_gpu(free: list[float], ask: float) -> bool:
    eps = 1e-9
    if ask >= 1:
        whole = [i for i, f in enumerate(free) if f >= 1 - eps][:int(math.ceil(ask))]
        if len(whole) < math.ceil(ask):
            return False
        for i in whole:
            free[i] = 0.0
        return True
    for i in sorted(range(len(free)), key=lambda i: free[i]):  # best fit: the fullest GPU that still has room
        if free[i] + eps >= ask:
            free[i] -= ask
            return True
    return False


def with_plan(job, plan: ResourcePlan):
    """The job with the plan's replicas and stage resources (what batch sizing and the stages read)."""
    res = replace(job.resources, generate_gpus=plan.generate_gpus if job.tp == 1 else job.resources.generate_gpus,
                  decode_gpus=plan.decode_gpus, text_gpus=plan.text_gpus, decode_cpus=plan.decode_cpus,
                  text_cpus=plan.text_cpus, read_cpus=plan.read_cpus, png_cpus=plan.png_cpus,
                  **({"generate_cpus": plan.generate_cpus} if job.tp == 1 else
                     {"coordinator_cpus": plan.generate_cpus}))
    return job.replace(replicas=plan.replicas, resources=res)
