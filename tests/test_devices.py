import pytest
import torch

from hf_gradext.devices import HostCopy, check_device
from hf_gradext.errors import UserFacingError


def test_cpu_and_auto_pass():
    check_device("cpu")
    check_device("auto", allow_auto=True)


@pytest.mark.parametrize("bad", ["auto", "gpu", "cuda:x"])
def test_not_a_device_names_the_flag(bad):
    with pytest.raises(UserFacingError, match="--device='.*' is not a device"):
        check_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(UserFacingError, match="--dev=cuda:1 but this machine has no usable CUDA device"):
        check_device("cuda:1", flag="--dev")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_index_beyond_the_visible_devices_is_refused():
    check_device("cuda:0")
    with pytest.raises(UserFacingError, match="CUDA device"):
        check_device(f"cuda:{torch.cuda.device_count()}")


def test_host_copy_of_cpu_tensors_and_passthrough_values():
    x = torch.arange(6.0).reshape(2, 3)
    copy = HostCopy(x, None, torch.tensor([4, 5]))
    rows, nothing, ids = copy.wait()
    assert torch.equal(rows, x) and rows is not x  # a copy: later in-place changes do not reach it
    assert nothing is None and ids.tolist() == [4, 5]
    x.add_(1)
    assert rows[0, 0] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the asynchronous copy path needs CUDA")
def test_host_copy_of_gpu_tensors_is_pinned_and_exact_after_wait():
    x = torch.randn(8, 4096, device="cuda").to(torch.bfloat16)
    ids = torch.arange(8, device="cuda")
    copy = HostCopy(x, ids)
    x_host, ids_host = copy.wait()
    assert x_host.is_pinned() and torch.equal(x_host, x.cpu()) and ids_host.tolist() == list(range(8))
