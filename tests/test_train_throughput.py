"""Peak FLOP/s by GPU name, and throughput windows that leave out the warm-up step."""

import pytest
import torch

from mptlike.train import throughput
from mptlike.train.flops import peak_flops_for_name
from mptlike.train.throughput import ThroughputMeter


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_bf16_flops_follow_the_device_name(name, peak):
    assert peak_flops_for_name(name) == peak


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(throughput.time, "perf_counter", fake)
    return fake


def _meter():
    return ThroughputMeter(flops_per_token=6, peak_flops=None, tokens_per_step=100, samples_per_step=4,
                           world_size=1, device=torch.device("cpu"))


def test_first_window_leaves_out_the_warm_up_step(clock):
    meter = _meter()
    clock.now += 60.0  # step 1: compilation and autotuning
    meter.step()
    for _ in range(3):  # steps 2-4: one second each
        clock.now += 1.0
        meter.step()
    report = meter.report()
    assert report["train/tokens_per_sec"] == pytest.approx(100.0)
    assert report["train/samples_per_sec"] == pytest.approx(4.0)


def test_a_window_of_only_the_warm_up_step_reports_it():
    meter = _meter()
    meter.step()
    assert meter.report()["train/tokens_per_sec"] > 0


def test_later_windows_count_every_step(clock):
    meter = _meter()
    clock.now += 60.0
    meter.step()
    meter.report()
    for _ in range(2):
        clock.now += 2.0
        meter.step()
    assert meter.report()["train/tokens_per_sec"] == pytest.approx(50.0)
