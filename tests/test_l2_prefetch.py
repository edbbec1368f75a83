"""The weight-streaming kernels' L2 prefetch: where it applies, what the launches pass, and that
the kernels with it compile for Hopper as intended (with the tensor-core paths: the QKV kernel's
two orientations, and the gate/up and linear kernels' few-token paths). Its GPU check, bit for bit against launches without it, is test_eager_launch.py's
CUDA-graph chain."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

common = importlib.import_module("hf_fused.ops._common")
qkv = importlib.import_module("hf_fused.ops.rmsnorm_qkv")
gate_up = importlib.import_module("hf_fused.ops.rmsnorm_gate_up")
linear = importlib.import_module("hf_fused.ops.streaming_linear")
ROOT = Path(__file__).resolve().parent.parent


def test_the_prefetch_is_off_unless_asked_for_and_possible(monkeypatch):
    monkeypatch.delenv("HF_FUSED_L2_PREFETCH", raising=False)
    weight = torch.empty(96, 64, dtype=torch.bfloat16)
    assert common.l2_prefetch_default(torch.device("cpu")) == 0
    assert common.l2_prefetch_bytes(weight) == 0, "off by default"
    monkeypatch.setenv("HF_FUSED_L2_PREFETCH", "1")
    assert common.l2_prefetch_bytes(weight) == 0, "no bulk prefetch off a Hopper GPU"


@pytest.mark.parametrize("weight, want", [
    (torch.empty(96, 64, dtype=torch.bfloat16), 4096),
    (torch.empty(64, 96, dtype=torch.bfloat16).t(), 0),  # rows not contiguous
    (torch.empty(96 * 64 + 1, dtype=torch.bfloat16)[1:].view(96, 64), 0),  # rows start 2 bytes off 16
    (torch.empty(96, 12, dtype=torch.bfloat16), 0),  # a 24-byte row: the next row starts off 16
    (torch.empty(96, 12, dtype=torch.float32), 4096),
    (torch.empty(96, 64, dtype=torch.bfloat16)[:, :32], 0),  # a slice: rows with gaps
])
def test_the_prefetch_needs_contiguous_rows_with_aligned_starts(weight, want):
    assert common.l2_prefetch_bytes(weight, 4096 + 8) == want


def test_the_prefetch_is_rounded_to_what_one_bulk_prefetch_takes():
    weight = torch.empty(96, 64, dtype=torch.bfloat16)
    assert common.l2_prefetch_bytes(weight, 1 << 30) == common.MAX_BULK_PREFETCH
    assert common.MAX_BULK_PREFETCH % 16 == 0


def test_launches_pass_the_prefetch_to_every_weight_streaming_kernel():
    K, N, I, dtype = 64, 96, 80, torch.bfloat16
    x, norm = torch.randn(1, K, dtype=dtype), torch.ones(K, dtype=dtype)
    meta = qkv.decode_launch(x, norm, torch.empty(N, K, dtype=dtype), None, torch.empty(1, N, dtype=dtype), 1e-5,
                             False, l2_prefetch=4096)[2]
    assert meta["L2_PREFETCH_BYTES"] == 4096
    # Several tokens stream through tl.dot, many rows a program, and prefetch no more of them.
    x4 = torch.randn(4, K, dtype=dtype)
    meta = qkv.decode_launch(x4, norm, torch.empty(N, K, dtype=dtype), None, torch.empty(4, N, dtype=dtype), 1e-5,
                             False, l2_prefetch=4096)[2]
    assert meta["L2_PREFETCH_BYTES"] == 4096
    # Gate/up splits it between Wg's rows and Wu's, each half a multiple of 16 bytes.
    meta = gate_up.decode_launch(x, norm, torch.empty(2 * I, K, dtype=dtype), torch.empty(1, I, dtype=dtype), 1e-5,
                                 False, "silu", l2_prefetch=4096 + 16)[2]
    assert meta["L2_PREFETCH_BYTES"] == 4096
    meta = linear.stream_launch(x.view(-1), torch.empty(N, K, dtype=dtype), None, torch.empty(N, dtype=dtype),
                                l2_prefetch=4096)[2]
    assert meta["L2_PREFETCH_BYTES"] == 4096
    meta = linear.stream_launch(x.view(-1), torch.empty(N, K, dtype=dtype), None, torch.empty(N, dtype=dtype))[2]
    assert meta["L2_PREFETCH_BYTES"] == 0, "off by default"


def test_the_kernels_with_the_prefetch_compile_for_hopper():
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "hopper_compile.py")], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    # One bulk prefetch per weight slab: Wg's and Wu's in the gate/up kernel.
    slabs = {"rmsnorm_qkv": 1, "rmsnorm_gate_up": 2, "streaming_linear": 1}
    for op in slabs:
        for prefetch in (0, 48 * 1024):
            kernel = report[f"{op}/{prefetch}"]
            assert kernel["cubin_bytes"] > 0
            assert kernel["prefetch_bytes"] == prefetch
            assert kernel["prefetches"] == (slabs[op] if prefetch else 0), (op, prefetch)
    # 16 tokens: both orientations stream the weight through pipelined copies and prefetch the
    # program's first bytes. Transposed, the tokens are wgmma's shared-memory operand and each
    # K step waits for its dot; as rows they stay in registers, through an Ampere-style mma.
    transposed, as_rows = report["rmsnorm_qkv_m16/False"], report["rmsnorm_qkv_m16/True"]
    assert transposed["async_copies"] > 0 and as_rows["async_copies"] > 0
    assert transposed["prefetches"] == as_rows["prefetches"] == 1
    assert transposed["mma_versions"] == ["3"] and transposed["wgmma_waits"] == [0]
    assert as_rows["mma_versions"] == ["2"] and as_rows["wgmma_waits"] == []
    # NORM_STAGES = 3 pipelines the norm's loads of x too: two more blocks in flight, and their wait.
    assert report["rmsnorm_qkv_m16_norm_stages/True"]["async_copies"] > as_rows["async_copies"]
    # The gate/up and linear kernels take a few tokens as rows only: one prefetch per weight slab.
    for op, slabs in [("rmsnorm_gate_up_m16", 2), ("streaming_linear_m16", 1)]:
        kernel = report[f"{op}/True"]
        assert kernel["async_copies"] > 0 and kernel["mma_versions"] == ["2"] and kernel["wgmma_waits"] == [], op
        assert kernel["prefetches"] == slabs, op
