import os
import time

import pytest
import torch

from lineray.models.config import preset
from lineray.models.transformer import Transformer

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(1)  # 2 cores shared with Ray workers and subprocesses: oversubscription is far slower


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
