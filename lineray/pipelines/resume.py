"""Opening the output: new, or this same job's (resume), never someone else's.

- A new output gets `_job.json` (the settings that decide its content, see
  config.FINGERPRINT); a rerun must match them.
- An output without `_job.json` that holds anything is not a lineray output of this
  job: refused, naming what is there (`overwrite` clears it).
- Resume: committed shards whose files are missing or damaged (size, the store's
  ETag; the SHA-256 with `verify`) are undone and done again, and the log says so;
  files of shards a crashed run began are removed (the in-flight records prove they
  are the job's); anything else is left alone and listed.
"""
from __future__ import annotations

import time

from lineray.pipelines.config import JobConfig, JobConfigError
from lineray.pipelines.sink import TEMP_NAME, Output

SHOW = 5  # file names a message lists before "and N more"


class ForeignOutput(JobConfigError):
    """The output holds files this job did not write."""


def prepare_output(job: JobConfig, out: Output, log=print) -> tuple[dict[str, dict], list[str]]:
    """Check that the output is new or holds this same job; returns (committed shards, shards found damaged)."""
    check_reachable(out)
    inventory = out.inventory()
    if job.overwrite and inventory:
        with out.errors():
            out.fs.rm(out.root, recursive=True)
        log(f"overwrite: deleted {len(inventory)} files under {job.output}")
        inventory = {}
    recorded = out.read_json(out.path("_job.json"))
    if recorded is None:
        theirs = sorted(n for n in inventory if not (n.startswith("_tmp/") and TEMP_NAME.match(n[5:])))
        if theirs:
            raise ForeignOutput(f"{job.output} is not empty and is not a lineray output (no _job.json): it holds "
                                f"{_names(theirs)}; use a new output URL, or --overwrite to delete them")
        out.write_json(out.path("_job.json"), {"fingerprint": job.fingerprint(), "config": job.to_dict(),
                                               "created_at": time.time()})
    else:
        mine, theirs = job.fingerprint(), recorded.get("fingerprint", {})
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k, _default(k)))
        if diff:
            raise JobConfigError(f"{job.output} holds a job with different {', '.join(diff)}; resume needs the same "
                                 "settings: use another output URL, or --overwrite to start it again")
    committed = out.committed()
    damaged = out.check_committed(committed, verify=job.verify, inventory=inventory)
    for key, why in sorted(damaged.items()):
        log(f"shard {key} is damaged ({why}): doing it again")
        out.forget_shard(key)
        del committed[key]
    if damaged:
        inventory = out.inventory()
    foreign = out.clean(committed, inventory)
    colliding = [n for n in foreign if n.rsplit("/", 1)[-1].startswith("part-")]
    if colliding:
        raise ForeignOutput(f"{job.output} holds {_names(colliding)}, named like this job's shard files but in no "
                            f"manifest entry or in-flight record of it; move them away, or --overwrite")
    if foreign:
        log(f"{job.output}: {_names(foreign)} are not this job's: left untouched (readers of data/ see them too)")
    return committed, sorted(damaged)


def check_reachable(out: Output) -> None:
    """One cheap call that fails with a clear message when the output's bucket or credentials are wrong."""
    with out.errors():
        if not out.is_local:
            bucket = out.root.split("/", 1)[0]
            if not out.fs.exists(bucket):
                raise FileNotFoundError("The specified bucket does not exist")


def _default(key: str):
    """A fingerprint key an older output did not record, at its old implicit value."""
    return {"columns": {}}.get(key)


def _names(names: list[str]) -> str:
    more = f" and {len(names) - SHOW} more" if len(names) > SHOW else ""
    return ", ".join(names[:SHOW]) + more
