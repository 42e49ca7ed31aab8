"""Device choice and the device-progress watchdog of a worker: the GPU logic, run on CPU with fake inputs."""
import pytest
import torch

from lineray.workers.devices import cuda_index, enable_tf32, local_device, setup_device
from lineray.workers.parallel_state import join_tp_group
from lineray.workers.worker import StepProgress


@pytest.mark.parametrize("assigned, visible, index", [
    (["3"], "3", 0),  # Ray's usual case: the actor sees only its GPU, which is cuda:0 in the actor
    ([3], "3", 0),  # ids as ints
    (["5", "6"], "5,6", 0),  # more than one GPU: the first
    (["5"], "4, 5,6", 1),  # Ray told not to narrow CUDA_VISIBLE_DEVICES: the id's position
    (["GPU-1f2e"], "GPU-0a9b,GPU-1f2e", 1),  # UUIDs
    (["2"], None, 2),  # CUDA_VISIBLE_DEVICES unset: every GPU visible, id == index
])
def test_cuda_index_is_the_assigned_gpus_place_in_this_process(assigned, visible, index):
    assert cuda_index(assigned, visible) == index


@pytest.mark.parametrize("assigned, visible, error", [
    ([], "0", "assigned no GPU"),
    (["2"], "0,1", r"GPU '2', which is not in CUDA_VISIBLE_DEVICES='0,1'"),
    (["GPU-1f2e"], None, "cannot tell which CUDA index"),
])
def test_cuda_index_refuses_what_it_cannot_resolve(assigned, visible, error):
    with pytest.raises(RuntimeError, match=error):
        cuda_index(assigned, visible)


def test_cpu_devices_pass_through():
    assert local_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match=r"device 'cuda' asked for, but this process sees no CUDA GPU"):
        setup_device("cuda")


def test_a_nccl_rank_needs_an_indexed_device():
    # The bug this guards: torch.cuda.set_device(torch.device("cuda")) raises; a rank must know its index.
    with pytest.raises(ValueError, match=r"needs a device with an index \(cuda:N\), got cuda"):
        join_tp_group(0, 2, "127.0.0.1", 1, device=torch.device("cuda"))


def test_enable_tf32_sets_fp32_matmuls_and_convolutions_to_tf32():
    matmul, conv = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
        enable_tf32()
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = matmul, conv


class FakeEvent:
    """A CUDA event stand-in: complete once the fake device has run past it."""
    device_done = 0  # events recorded so far that the "device" has finished
    recorded = 0

    def record(self):
        FakeEvent.recorded += 1
        self.seq = FakeEvent.recorded

    def query(self):
        return self.seq <= FakeEvent.device_done


def test_progress_counts_steps_the_device_finished_not_steps_the_host_issued():
    FakeEvent.device_done = FakeEvent.recorded = 0
    progress = StepProgress(torch.device("cuda"), new_event=FakeEvent)
    progress.start("b1")
    for i in range(5):  # the host queues 5 steps ahead of the device
        progress.step(i)
    assert progress.poll() == ("b1", 0)
    FakeEvent.device_done = 2
    assert progress.poll() == ("b1", 2)
    assert progress.poll() == ("b1", 2)  # a device stuck in a collective: no progress, however long
    FakeEvent.device_done = 5
    assert progress.poll() == ("b1", 5)
    progress.start("b2")  # a new batch starts from zero
    assert progress.poll() == ("b2", 0)


def test_progress_on_cpu_counts_host_steps():
    progress = StepProgress(torch.device("cpu"))
    progress.start("b")
    progress.step(0)
    progress.step(1)
    assert progress.poll() == ("b", 2)
