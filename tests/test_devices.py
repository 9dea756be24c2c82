import pytest
import torch

from hf_gradext.devices import check_device
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
