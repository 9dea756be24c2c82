import torch

from hf_gradext.collection.memory import MIB, PeakMemoryMeter


def test_cpu_meter_accounts_the_bytes_held_and_keeps_the_peak():
    meter = PeakMemoryMeter("cpu")
    assert meter.source == "accounted" and meter.peak_bytes == 0
    meter.start()
    meter.observe(torch.zeros(256, 1024))  # 1 MiB of float32
    meter.observe(torch.zeros(128, 1024), torch.zeros(64, 1024, dtype=torch.bfloat16))  # 0.5 + 0.125 MiB
    assert meter.peak_bytes == MIB and meter.peak_mb == 1.0  # the largest moment, not the sum
    meter.observe(torch.zeros(3, 1024, 1024, dtype=torch.float16))  # 6 MiB
    assert meter.peak_mb == 6.0
    meter.reset()
    assert meter.peak_bytes == 0
