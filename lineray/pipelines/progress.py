"""Progress of a running job (images done / total, images/s, ETA) and the summary of a finished one."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Images done / total, images/s, ETA: a bar on a terminal, else a line every `interval` s.

    The total is an estimate until the reader has seen every row (rows counted up
    front; bad rows and `count` > 1 are learned on the way), hence the "~".
    """

    def __init__(self, total_rows: int, interval: float = 10.0, enabled: bool = True, stream=None,
                 replicas: int = 1):
        self.stream = stream or sys.stderr
        self.total_rows, self.interval, self.enabled = total_rows, interval, enabled
        self.images = self.rows = self.errors = self.shards = self.extra = 0
        self.generate_s = 0.0  # summed over replicas
        self.replicas = replicas
        self.start = time.time()
        self.last_line = 0.0
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=max(1, total_rows), unit="img", desc="images", file=self.stream,
                            dynamic_ncols=True)

    @property
    def total(self) -> int:
        return max(self.images, self.total_rows + self.extra - self.errors)

    @property
    def rate(self) -> float:
        return self.images / max(time.time() - self.start, 1e-9)

    def add_images(self, rows: list[dict]) -> None:
        self.images += len(rows)
        self.extra += sum(r["count"] - 1 for r in rows if r["image_index"] == 0)
        self.generate_s += sum(r.get("generate_s", 0.0) for r in rows)
        self._show(len(rows))

    def add_shard(self, entry: dict) -> None:
        self.shards += 1
        self.rows += entry["rows"]
        self.errors += entry["errors"]
        self._show(0)

    def line(self) -> str:
        eta = (self.total - self.images) / self.rate if self.rate else float("inf")
        pct = 100 * self.images / self.total if self.total else 100.0
        busy = self.generate_s / max((time.time() - self.start) * self.replicas, 1e-9)
        return (f"images {self.images}/~{self.total} ({pct:.0f}%) | {self.rate:.2f} img/s | "
                f"ETA {_duration(eta)} | prompts {self.rows}/~{self.total_rows} committed in {self.shards} shards"
                f" | errors {self.errors} | generators busy {100 * busy:.0f}%")

    def _show(self, n: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.total = max(self.total, 1)
            self.bar.set_postfix_str(f"prompts {self.rows}, errors {self.errors}", refresh=False)
            self.bar.update(n)
        elif time.time() - self.last_line >= self.interval:
            self.last_line = time.time()
            print(f"[lineray] {self.line()}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class JobSummary:
    output: str
    images: int  # written by this run
    prompts: int  # prompt rows in shards this run committed
    errors: int  # bad rows this run found
    shards: int  # shards this run committed
    skipped_shards: int  # shards already done before this run
    wall_s: float
    total_images: int  # in the whole dataset
    total_errors: int
    total_shards: int
    batch_size: int  # images per generation batch in this run (batch_size auto resolved)
    repaired_shards: list[str] = field(default_factory=list)  # committed shards found damaged and done again

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"images_per_s": round(self.images_per_s, 4)}

    def line(self) -> str:
        skipped = f", {self.skipped_shards} shards already done" if self.skipped_shards else ""
        skipped += f", {len(self.repaired_shards)} damaged shards done again" if self.repaired_shards else ""
        errors = f"; {self.errors} bad rows in {self.output}/errors" if self.errors else ""
        return (f"{self.images} images from {self.prompts} prompts in {_duration(self.wall_s)} "
                f"({self.images_per_s:.2f} img/s){errors}{skipped} -> {self.output}/data "
                f"(dataset: {self.total_images} images, {self.total_shards} shards)")


