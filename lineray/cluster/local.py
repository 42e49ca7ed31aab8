"""Start a private local Ray, or connect to an existing cluster.

A private Ray never touches other Ray instances on the machine (we never run
`ray stop`): it gets its own temp dir, binds to loopback, has no dashboard, and
is shut down by whoever started it.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None,
               object_store_mb: int = 256, temp_dir: str | None = None,
               runtime_env: dict | None = None) -> bool:
    """Make sure this process is connected to Ray. Returns True if it started a private local Ray.

    address None: start a private local Ray (loopback only). Otherwise connect
    ("auto", "ray://head:10001", or a GCS address).
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # silence the token-auth notice for local runs
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return False
    bind_ray_to_loopback()
    # A short temp dir: Ray's socket paths must stay under the 107-byte AF_UNIX limit.
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="lineray-ray-", dir="/tmp")
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             object_store_memory=object_store_mb * 2**20, _temp_dir=temp_dir,
             _node_ip_address="127.0.0.1", runtime_env=runtime_env, log_to_driver=True)
    return True


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
    import ray

    started = ensure_ray(address, **kw)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
