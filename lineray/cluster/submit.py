"""Submit a batch job to a remote Ray cluster through Ray's JobSubmissionClient.

    job_id = submit(JobConfig.from_yaml("configs/jobs/s3_example.yaml"), "http://head:8265")
    status(job_id, "http://head:8265")   # PENDING / RUNNING / SUCCEEDED / FAILED / STOPPED
    follow(job_id, "http://head:8265")   # print the logs as they come; the final status
    stop(job_id, "http://head:8265")

The job (a validated lineray.pipelines.JobConfig, or anything with its `to_yaml()`,
`output` and `replace()`) travels as job.yaml in the runtime_env's working_dir; the
lineray package travels as a py_module (unless the cluster image already has it:
package=False). The entrypoint runs `lineray generate job.yaml` on the head node,
where it connects to its own cluster ($RAY_ADDRESS), never a private Ray.
"""
from __future__ import annotations

import asyncio
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Protocol

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class Job(Protocol):
    """What submit needs of a job (lineray.pipelines.JobConfig has it; this floor does not import it)."""
    output: str

    def to_yaml(self) -> str: ...

    def replace(self, **kw) -> "Job": ...


def _client(address: str):
    from ray.job_submission import JobSubmissionClient
    return JobSubmissionClient(address)


def submit(job: Job, address: str, *, package: bool = True, pip: list[str] | None = None,
           env: dict[str, str] | None = None, submission_id: str | None = None, python: str = "python",
           entrypoint_num_cpus: float = 0.1, agent_wait_s: float = 60.0) -> str:
    """Submit a job (a JobConfig: validated here, before anything is uploaded); returns the submission id.

    address: the cluster's dashboard, e.g. http://head:8265. pip: extra packages for the
    job's workers. python: the interpreter on the cluster that runs the driver. agent_wait_s:
    how long a just-started cluster may take to accept jobs.
    """
    import lineray

    job = job.replace(ray_address=None)  # the driver runs inside the cluster
    entrypoint = f"{shlex.quote(python)} -m lineray.cli generate job.yaml"
    with tempfile.TemporaryDirectory(prefix="lineray-submit-") as workdir:  # uploaded by submit_job
        (Path(workdir) / "job.yaml").write_text(job.to_yaml())
        runtime_env: dict = {"working_dir": workdir, "env_vars": dict(env or {})}
        if package:
            runtime_env["py_modules"] = [str(Path(lineray.__file__).resolve().parent)]
        if pip:
            runtime_env["pip"] = list(pip)
        client = _client(address)
        deadline = time.monotonic() + agent_wait_s
        while True:
            try:
                return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                                         entrypoint_num_cpus=entrypoint_num_cpus,
                                         metadata={"lineray.output": job.output})
            except RuntimeError as e:
                # A cluster that has just started answers "No available agent to submit job, please try
                # again later" until its job agent is up.
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)


def status(job_id: str, address: str) -> str:
    return str(_client(address).get_job_status(job_id).value)


def logs(job_id: str, address: str) -> str:
    return _client(address).get_job_logs(job_id)


def stop(job_id: str, address: str) -> bool:
    """Ask the cluster to stop the job; True if it was running."""
    return bool(_client(address).stop_job(job_id))


def wait(job_id: str, address: str, timeout: float = 3600.0, poll: float = 2.0) -> str:
    """Block until the job ends (or `timeout` s pass); returns its last status."""
    client = _client(address)
    deadline = time.time() + timeout
    while True:
        state = str(client.get_job_status(job_id).value)
        if state in TERMINAL or time.time() >= deadline:
            return state
        time.sleep(poll)


def follow(job_id: str, address: str, write: Callable[[str], object] = sys.stdout.write) -> str:
    """Stream the job's logs as they come (Ray's tail_job_logs) until it ends; returns its final status."""
    client = _client(address)

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())
    return wait(job_id, address, timeout=60.0, poll=0.5)  # the log stream closes as the job ends
