"""Kernel configurations follow what the device is: its peak DRAM bandwidth per SM picks the
weight-streaming kernels' configurations tuned on an H100 or on an H200."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

common = importlib.import_module("hf_fused.ops._common")
qkv = importlib.import_module("hf_fused.ops.rmsnorm_qkv")
linear = importlib.import_module("hf_fused.ops.streaming_linear")

CUDA = torch.cuda.is_available()
GPU = torch.device("cuda", 0)
# name, memory clock (kHz), bus width (bits), SMs: what cudaGetDeviceProperties reports.
H100_SXM = ("NVIDIA H100 80GB HBM3", 2619000, 5120, 132)  # 3.35 TB/s
H200 = ("NVIDIA H200", 3125000, 6144, 132)  # 4.8 TB/s
A100_80GB = ("NVIDIA A100-SXM4-80GB", 1593000, 5120, 108)  # 2.0 TB/s


@pytest.fixture
def fake_gpu(monkeypatch):
    """Make torch report the given GPU for every CUDA device, with the caches cleared around it."""
    caches = (common.peak_bandwidth_per_sm, common.device_name)

    def install(name: str, clock_khz: int | None, bus_bits: int | None, sms: int) -> None:
        props = SimpleNamespace(name=name, multi_processor_count=sms)
        if clock_khz is not None:
            props.memory_clock_rate, props.memory_bus_width = clock_khz, bus_bits
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        for cache in caches:
            cache.cache_clear()

    yield install
    for cache in caches:
        cache.cache_clear()


@pytest.mark.parametrize("gpu, fast", [(H100_SXM, False), (H200, True), (A100_80GB, False)],
                         ids=["H100 SXM", "H200", "A100 80GB"])
def test_the_class_is_the_peak_bandwidth_per_sm(fake_gpu, gpu, fast):
    fake_gpu(*gpu)
    name, clock_khz, bus_bits, sms = gpu
    assert common.peak_bandwidth_per_sm(GPU) == pytest.approx(2 * clock_khz * 1e3 * bus_bits / 8 / sms)
    assert common.streams_fast_per_sm(GPU) == fast


@pytest.mark.parametrize("name, fast", [("NVIDIA H200", True), ("NVIDIA H100 80GB HBM3", False)])
def test_without_a_reported_memory_clock_the_name_decides(fake_gpu, name, fast):
    fake_gpu(name, None, None, 132)
    assert common.peak_bandwidth_per_sm(GPU) is None
    assert common.streams_fast_per_sm(GPU) == fast


def test_no_device_and_the_cpu_take_the_h100_configurations():
    assert not common.streams_fast_per_sm(None)
    assert not common.streams_fast_per_sm(torch.device("cpu"))


def test_each_class_takes_its_measured_configurations(fake_gpu):
    # docs/h200/README.md: the H200 tune streams 8B's QKV weight in 1024-wide tiles, 8 rows a
    # program, and a 70B down_proj in 1024-wide tiles on 8 warps; an H100 keeps 512-wide tiles.
    fake_gpu(*H200)
    assert qkv.decode_config(1, 6144, 4096, GPU).BLOCK_K == 1024
    assert linear.stream_config(8192, 28672, GPU).num_warps == 8
    assert qkv.decode_config(16, 10240, 8192, GPU).rows_per_program is None
    fake_gpu(*H100_SXM)
    assert qkv.decode_config(1, 6144, 4096, GPU).BLOCK_K == 512
    assert linear.stream_config(8192, 28672, GPU).num_warps == 4
    assert qkv.decode_config(16, 10240, 8192, GPU).rows_per_program == 64


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_this_gpu_reports_what_its_class_needs():
    """On the GPUs the configurations were measured on, the reported memory clock puts each in
    its own class (the name decides only where torch reports no clock)."""
    device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device)
    if name not in (H100_SXM[0], H200[0]):
        pytest.skip(f"no configurations were measured on a {name}")
    per_sm = common.peak_bandwidth_per_sm(device)
    print(f"{name}: {(per_sm or 0) / 1e9:.1f} GB/s of peak bandwidth per SM")
    assert common.streams_fast_per_sm(device) == (name == H200[0])
