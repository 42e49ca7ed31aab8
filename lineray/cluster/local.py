"""Start a private local Ray, or connect to an existing cluster.

A private Ray never touches other Ray instances on the machine (we never run
`ray stop`): it gets its own temp dir, binds to loopback, has no dashboard, and
is shut down by whoever started it (`shutdown_ray`), which also removes its temp
dir. Its object store is sized from the machine (a share of the available memory
and of /dev/shm), not a fixed 256 MB: images in flight live there.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager

MiB = 2**20
STORE_SHARE = 0.2  # of the available memory for a private Ray's object store (Ray's own default is 0.3)
SHM_SHARE = 0.5  # and at most this share of /dev/shm, which other processes use too
MIN_STORE_MB = 256
FALLBACK_BYTES = 4 * 2**30  # available memory where the OS does not tell
_started_temp_dirs: list[str] = []  # temp dirs of private Rays this process started (removed at shutdown)


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None,
               object_store_mb: int | None = None, temp_dir: str | None = None,
               runtime_env: dict | None = None, num_gpus: int | None = None) -> bool:
    """Make sure this process is connected to Ray. Returns True if it started a private local Ray.

    address None: start a private local Ray (loopback only). Otherwise connect
    ("auto", "ray://head:10001", or a GCS address). object_store_mb None: sized from
    the machine (object_store_mb_for_machine). A temp dir made here is removed by
    shutdown_ray; one given by the caller is the caller's.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # silence the token-auth notice for local runs
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return False
    bind_ray_to_loopback()
    if temp_dir is None:
        # A short temp dir: Ray's socket paths must stay under the 107-byte AF_UNIX limit.
        base = tempfile.gettempdir()
        temp_dir = tempfile.mkdtemp(prefix="lineray-ray-", dir=base if len(base) <= 40 else "/tmp")
        _started_temp_dirs.append(temp_dir)
    ray.init(num_cpus=num_cpus or os.cpu_count(), num_gpus=num_gpus, include_dashboard=False,
             object_store_memory=(object_store_mb or object_store_mb_for_machine()) * MiB, _temp_dir=temp_dir,
             _node_ip_address="127.0.0.1", runtime_env=runtime_env, log_to_driver=True)
    return True


def shutdown_ray() -> None:
    """Shut down this process's Ray; remove the temp dirs of the private Rays it started."""
    import ray

    ray.shutdown()
    while _started_temp_dirs:
        path = _started_temp_dirs.pop()
        deadline = time.time() + 10  # Ray's processes may still write their last log lines
        while os.path.exists(path) and time.time() < deadline:
            shutil.rmtree(path, ignore_errors=True)
            if os.path.exists(path):
                time.sleep(0.2)


def object_store_mb_for_machine() -> int:
    """A private Ray's object store: STORE_SHARE of the available memory, at most SHM_SHARE of /dev/shm."""
    size = STORE_SHARE * available_memory()
    try:
        shm = shutil.disk_usage("/dev/shm")
        size = min(size, SHM_SHARE * shm.free)
    except OSError:
        pass
    return max(MIN_STORE_MB, int(size // MiB))


def available_memory() -> int:
    """Bytes this node (or this container, if its cgroup is tighter) can still allocate."""
    try:
        with open("/proc/meminfo") as f:  # MemAvailable counts reclaimable page cache; sysconf's free pages do not
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return FALLBACK_BYTES
    # A pod's memory limit (cgroup v2, then v1) is invisible in /proc/meminfo but is what OOM-kills it.
    for limit, usage in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes",
                                                            "memory/memory.usage_in_bytes")):
        try:
            with open(f"/sys/fs/cgroup/{limit}") as a, open(f"/sys/fs/cgroup/{usage}") as b:
                free = min(free, int(a.read()) - int(b.read()))
            break
        except (OSError, ValueError):  # no such file, or "max" (no limit)
            continue
    return max(0, free)


def bind_ray_to_loopback() -> None:
    """Make a private local Ray listen on 127.0.0.1 only.

    On Linux, Ray 2.60 maps 127.0.0.1 back to the machine's external address and its
    gRPC servers listen on every interface, unless multi-node "clusters" are off; a
    private Ray is one node by definition. Ray reads the variable at import, so the
    already-imported constant is switched off too.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False


@contextmanager
def ray_session(address: str | None = None, **kw):
    """`with ray_session(): ...` connects or starts Ray, and shuts down only a Ray it started."""
    started = ensure_ray(address, **kw)
    try:
        yield
    finally:
        if started:
            shutdown_ray()
