"""Submit a batch job to a remote Ray cluster through Ray's JobSubmissionClient.

    job_id = submit("configs/jobs/s3_example.yaml", "http://head:8265")
    status(job_id, "http://head:8265")   # PENDING / RUNNING / SUCCEEDED / FAILED / STOPPED
    print(logs(job_id, "http://head:8265"))
    stop(job_id, "http://head:8265")

The job's config travels as job.yaml in the runtime_env's working_dir; the lineray
package travels as a py_module (unless the cluster image already has it:
package=False). The entrypoint runs `lineray generate job.yaml` on the head node,
where it connects to its own cluster ($RAY_ADDRESS), never a private Ray.
"""
from __future__ import annotations

import shlex
import tempfile
import time
from pathlib import Path

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _client(address: str):
    from ray.job_submission import JobSubmissionClient
    return JobSubmissionClient(address)


def _job_config(config):
    from lineray.pipelines.config import JobConfig

    if isinstance(config, JobConfig):
        return config
    if isinstance(config, dict):
        return JobConfig.from_dict(config)
    return JobConfig.from_yaml(config)


def submit(config, address: str, *, package: bool = True, pip: list[str] | None = None,
           env: dict[str, str] | None = None, submission_id: str | None = None, python: str = "python",
           overwrite: bool = False, entrypoint_num_cpus: float = 0.1) -> str:
    """Submit a job (a JobConfig, a dict, or a YAML path); returns the submission id.

    address: the cluster's dashboard, e.g. http://head:8265. pip: extra packages for the
    job's workers. python: the interpreter on the cluster that runs the driver.
    """
    import lineray

    job = _job_config(config).replace(ray_address=None)  # the driver runs inside the cluster
    entrypoint = f"{shlex.quote(python)} -m lineray.pipelines.cli generate job.yaml"
    if overwrite:
        entrypoint += " --overwrite"
    with tempfile.TemporaryDirectory(prefix="lineray-submit-") as workdir:  # uploaded by submit_job
        (Path(workdir) / "job.yaml").write_text(job.to_yaml())
        runtime_env: dict = {"working_dir": workdir, "env_vars": dict(env or {})}
        if package:
            runtime_env["py_modules"] = [str(Path(lineray.__file__).resolve().parent)]
        if pip:
            runtime_env["pip"] = list(pip)
        return _client(address).submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                           submission_id=submission_id, entrypoint_num_cpus=entrypoint_num_cpus,
                                           metadata={"lineray.output": job.output})


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
