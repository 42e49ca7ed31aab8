"""The job's monitor: the read-ahead gate, what each stage is doing, and why a job that stopped moving is stuck.

One small async Ray actor shared by the reader, the stages and the driver:
- Read-ahead: Ray Data's backpressure counts bytes and prompt rows are tiny, so the
  reader would run millions of rows ahead of the generators. The reader `acquire`s
  a shard's images before handing it out and waits (without polling) while
  `read_ahead` images are out; the driver reports finished images (`arrived`).
- Stages report when an actor has started and when a batch goes in and out, so a job
  in which nothing finishes for `stall_timeout_s` can say which stage holds it up and
  what it waits for (`stuck_stage`), instead of sitting silent.
- The reader records the end of the files, or why it stopped early (too many bad rows).
"""
from __future__ import annotations

import asyncio
import os
import time
from collections import defaultdict

STAGES = ("read", "repartition", "text", "generate", "decode", "png")


class JobStalled(RuntimeError):
    """Nothing moved for stall_timeout_s; the message names the stuck stage and what it waits for."""


class JobMonitor:
    def __init__(self, read_ahead: int):
        self.limit, self.sent, self.done = read_ahead, 0, 0
        self.finished, self.failure = False, None
        self.started: dict[str, list[int]] = defaultdict(list)  # stage -> pids of its started actors
        self.busy: dict[str, int] = defaultdict(int)  # stage -> batches in progress
        self.images_in: dict[str, int] = defaultdict(int)
        self.images_out: dict[str, int] = defaultdict(int)
        self.last_change = time.time()
        self.groups: set[str] = set()  # placement groups of the job's tp>1 replicas (hex ids)
        self._room = None

    # -- read-ahead ------------------------------------------------------------------------
    async def acquire(self, n: int) -> None:
        """Wait until `n` more images may be handed out (a shard bigger than the limit goes when nothing is out)."""
        if self._room is None:
            self._room = asyncio.Condition()
        async with self._room:
            await self._room.wait_for(lambda: self.sent == self.done or self.sent - self.done + n <= self.limit)
            self.sent += n
            self._changed()

    async def arrived(self, n: int) -> None:
        self.done += n
        self._changed()
        if self._room is not None:
            async with self._room:
                self._room.notify_all()

    def finish(self) -> None:
        self.finished = True

    def fail(self, reason: str) -> None:
        """The reader stopped early (e.g. too many bad rows): the driver raises this after the stream ends."""
        self.failure = reason

    # -- stages ----------------------------------------------------------------------------
    def stage_started(self, stage: str, pid: int) -> None:
        self.started[stage].append(pid)
        self._changed()

    def batch_started(self, stage: str, images: int) -> None:
        self.busy[stage] += 1
        self.images_in[stage] += images
        self._changed()

    def batch_done(self, stage: str, images: int) -> None:
        self.busy[stage] -= 1
        self.images_out[stage] += images
        self._changed()

    def replica_group(self, group_id: str) -> None:
        self.groups.add(group_id)

    def _changed(self) -> None:
        self.last_change = time.time()

    def state(self) -> dict:
        return {"sent": self.sent, "done": self.done, "finished": self.finished, "failure": self.failure,
                "started": {k: len(v) for k, v in self.started.items()}, "pids": dict(self.started),
                "busy": dict(self.busy), "in": dict(self.images_in), "out": dict(self.images_out),
                "idle_s": time.time() - self.last_change, "groups": sorted(self.groups)}


def stage_report(monitor, stage: str):
    """Tell the monitor that this process is a started actor of `stage` (no-op without a monitor)."""
    if monitor is not None:
        monitor.stage_started.remote(stage, os.getpid())


def release_groups(group_ids: list[str], grace_s: float = 5.0) -> list[str]:
    """Remove the job's replica placement groups that are still there after the job (their owner was killed,
    or its node died, so its own teardown never ran); returns the ids removed here."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    def alive() -> list[str]:
        table = ray.util.placement_group_table()
        return [g for g in group_ids if table.get(g, {}).get("state", "REMOVED") != "REMOVED"]

    deadline = time.time() + grace_s  # a stage actor that exits gracefully removes its own group: let it
    while alive() and time.time() < deadline:
        time.sleep(0.2)
    left = alive()
    for g in left:
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(g))))
    return left


def stuck_stage(state: dict, plan, available: dict, idle_s: float) -> str:
    """Why nothing moved for idle_s seconds: the first stage, in stream order, that holds the images up."""
    started, inn, out = state["started"], state["in"], state["out"]
    have = f"{available.get('CPU', 0):g} of {plan.cluster.cpus:g} CPU"
    if plan.cluster.gpus:
        have += f", {available.get('GPU', 0):g} of {plan.cluster.gpus} GPU"
    head = f"no progress for {idle_s:.0f} s"
    ask = {s.name: s.describe() for s in plan.stages}
    if not started.get("read"):
        return f"{head}: stage read: the prompt reader has not started ({ask['read']}); {have} available now"
    if state["sent"] == 0:
        return f"{head}: stage read: no shard handed out yet (reading the prompt files); {have} available now"
    want = [name for name in ("text", "generate", "decode") if plan.stage(name) is not None]
    for name in want:
        count = plan.stage(name).count
        if started.get(name, 0) < count and not inn.get(name):
            return (f"{head}: stage {name}: {started.get(name, 0)} of {count} actors started, waiting for "
                    f"resources ({ask[name]}); {have} available now")
    first = want[0]
    if not inn.get(first):
        return (f"{head}: stage repartition: {state['sent']} images handed out, none reached {first} "
                f"(Ray Data's repartition task asks {ask['repartition'].split('(')[-1].rstrip(')')}); "
                f"{have} available now")
    for prev, name in zip(want, want[1:]):
        if out.get(prev, 0) > inn.get(name, 0) and not state["busy"].get(name):
            return (f"{head}: stage {name}: {out.get(prev, 0)} images out of {prev}, {inn.get(name, 0)} into "
                    f"{name}; {have} available now")
    return (f"{head}: stage png: {out.get('decode', 0)} images decoded, {state['done']} reached the driver "
            f"(the PNG task asks {ask['png'].split('(')[-1].rstrip(')')}); {have} available now")
