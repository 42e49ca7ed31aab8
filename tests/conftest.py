import os

# Ray connects implicitly when a Ray API is called with no Ray running. After a test module shuts its Ray
# down, a Ray Data thread still draining a finished (or failed) job would start a fresh default Ray that
# way, and the next module's ensure_ray would then fail with "ray.init twice". Tests start Ray explicitly.
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"  # read when ray is first imported: before anything imports it

import shutil
import tempfile
import time

import pytest
import torch

from lineray.models.config import preset
from lineray.models.transformer import Transformer

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(1)  # 2 cores shared with Ray workers and subprocesses: oversubscription is far slower

_ray_tmp_root: str | None = None


def pytest_configure(config):
    """Every Ray this test run starts keeps its files under one private root, removed at the end. Without
    it, ray.cluster_utils.Cluster writes /tmp/ray/ray_current_cluster and fails on a clean machine where
    /tmp/ray does not exist yet (it never creates the folder), and it would share that file with other Rays
    here. A hook, not import-time code: Ray workers import this module too (through test helpers) and must
    not make roots of their own. Short path: Ray's socket paths must stay under the 107-byte AF_UNIX limit."""
    global _ray_tmp_root
    _ray_tmp_root = tempfile.mkdtemp(prefix="lrt-", dir="/tmp")
    os.makedirs(os.path.join(_ray_tmp_root, "ray"))
    os.environ["RAY_TMPDIR"] = _ray_tmp_root  # read by Ray whenever it picks a temp dir


def pytest_unconfigure(config):
    if _ray_tmp_root is not None:
        shutil.rmtree(_ray_tmp_root, ignore_errors=True)


def tiny_model(grid: int = 8, model_type: str = "c2i", seed: int = 0, **overrides) -> Transformer:
    """A GPT-tiny with random weights (including a non-zero output head), fp32, eval mode."""
    kw = dict(grid_size=grid, model_type=model_type, **overrides)
    if model_type == "t2i":
        kw.setdefault("caption_dim", 32)
        kw.setdefault("cls_token_num", 12)
    model = Transformer(preset("GPT-tiny", **kw)).init_weights(generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.output.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
    return model.eval()


@pytest.fixture
def make_tiny():
    return tiny_model


def wait_until(check, timeout: float = 30.0, what: str = "condition", interval: float = 0.1):
    """Poll `check` until it is true; fail after `timeout` s. Ray hands resources, placement groups and
    actors back asynchronously (DESIGN.md section 8): assert on them with this, never once.
    Returns check()'s first truthy value."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return value
