"""The op benchmarks' CPU-checkable parts: the table they print, and that each peer they time
computes what the op computes. The timing itself needs a GPU and is not run here."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# The scripts import their siblings (report, timing) as top-level modules, as when run as scripts.
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_rmsnorm_gate_up as gate_up  # noqa: E402
import bench_rmsnorm_qkv as qkv  # noqa: E402
import report  # noqa: E402

from hf_fused.ops import rmsnorm_gate_up_ref, rmsnorm_qkv_ref  # noqa: E402


def test_qkv_table_is_the_committed_one(capsys):
    """--table on the committed H100 run prints the table in docs/bench_rmsnorm_qkv.md, line for line."""
    result = json.loads((ROOT / "docs" / "bench_rmsnorm_qkv_h100.json").read_text())
    report.print_table(result, qkv.OP)
    printed = capsys.readouterr().out
    provenance, table = printed.split("\n", 1)
    assert table.count("\n") == 2 + len(result["rows"])  # header, rule, rows
    # The doc leaves a blank line between the provenance line and the table.
    assert f"{provenance}\n\n{table}" in (ROOT / "docs" / "bench_rmsnorm_qkv.md").read_text()


def inputs(dtype, M=5, K=64, N=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).to(dtype)
    norm_weight = (torch.rand(K, generator=gen) + 0.5).to(dtype)
    weight = (torch.randn(N, K, generator=gen) / K**0.5).to(dtype)
    return x, norm_weight, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_up_peers_compute_the_op(dtype):
    x, norm_weight, weight = inputs(dtype)
    expected = rmsnorm_gate_up_ref(x, norm_weight, weight, eps=gate_up.EPS)
    module = gate_up.UnfusedMLP(norm_weight, weight)
    assert not any(p.requires_grad for p in module.parameters())
    with torch.no_grad():
        peers = {
            "eager": module(x),
            "compiled2": gate_up.norm_then_two_linears(x, norm_weight, module.gate.weight, module.up.weight),
            "compiled1": gate_up.norm_then_linear(x, norm_weight, weight),
        }
    for name, y in peers.items():
        torch.testing.assert_close(y, expected, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_peers_compute_the_op(dtype):
    x, norm_weight, weight = inputs(dtype)
    expected = rmsnorm_qkv_ref(x, norm_weight, weight, eps=qkv.EPS)
    module = qkv.UnfusedQKV(norm_weight, weight, 64, 16)
    with torch.no_grad():
        peers = {
            "eager3": torch.cat(module(x), dim=-1),
            "compiled3": torch.cat(qkv.norm_then_three_linears(x, norm_weight, *weight.split([64, 16, 16])), dim=-1),
            "compiled1": qkv.norm_then_linear(x, norm_weight, weight),
        }
    for name, y in peers.items():
        torch.testing.assert_close(y, expected, msg=lambda m, name=name: f"{name}: {m}")
