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
import bench_rope_cache as rope  # noqa: E402
import bench_streaming_linear as linear  # noqa: E402
import guard_overhead  # noqa: E402
import profile_hf_static  # noqa: E402
import report  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

import hf_fused  # noqa: E402
from hf_fused.models import shape_config  # noqa: E402
from hf_fused.ops import rmsnorm_gate_up_ref, rmsnorm_qkv_ref  # noqa: E402


COMMITTED = [  # (op, the run's JSON, the doc that shows its table)
    (qkv.OP, "bench_rmsnorm_qkv_h100.json", "bench_rmsnorm_qkv.md"),
    (qkv.OP, "bench_rmsnorm_qkv_h100_8b_prefetch.json", "bench_rmsnorm_qkv.md"),
    (gate_up.OP, "bench_rmsnorm_gate_up_h100.json", "bench_rmsnorm_gate_up.md"),
    (gate_up.OP, "bench_rmsnorm_gate_up_h100_8b_split.json", "bench_rmsnorm_gate_up.md"),
    (linear.OP, "bench_streaming_linear_h100.json", "bench_streaming_linear.md"),
]


@pytest.mark.parametrize("op, run, doc", COMMITTED, ids=[run for _, run, _ in COMMITTED])
def test_doc_tables_are_the_committed_runs(op, run, doc, capsys):
    """--table on each committed H100 run prints the table its doc shows, line for line."""
    result = json.loads((ROOT / "docs" / run).read_text())
    report.print_table(result, op)
    printed = capsys.readouterr().out
    provenance, table = printed.split("\n", 1)
    assert table.count("\n") == 2 + len(result["rows"])  # header, rule, rows
    # The doc leaves a blank line between the provenance line and the table.
    assert f"{provenance}\n\n{table}" in (ROOT / "docs" / doc).read_text()


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


def test_rope_cache_peers_compute_the_op():
    """The op and the stock path it is timed against give the same queries and the same cache."""
    gen = torch.Generator().manual_seed(0)
    qkv_out = torch.randn(2, 1, (rope.HQ + 2 * rope.HKV) * rope.D, generator=gen)
    angles = torch.rand(2, 1, rope.D // 2, generator=gen) * 100
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    caches = [tuple(torch.randn(2, rope.HKV, 12, rope.D, generator=torch.Generator().manual_seed(1)) for _ in range(2))
              for _ in range(2)]
    lengths = [torch.tensor(5), torch.tensor(5)]
    queries = [step(qkv_out, cos, sin, *cache, length)
               for step, cache, length in zip((rope.fused_step, rope.stock_step), caches, lengths)]
    torch.testing.assert_close(queries[0], queries[1])
    for fused, stock in zip(*caches):
        torch.testing.assert_close(fused, stock)
    assert int(lengths[0]) == int(lengths[1]) == 6


def test_profile_splits_layers_and_names_their_kernels():
    import profile_decode

    layer = ["_rmsnorm_qkv_decode_kernel", "triton_poi_fused_index_copy", "triton_poi_fused__scaled_dot_product_cudnn_attention_0",
             "cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16", "nvjet_sm90_tst_64x8_splitK_TNT",
             "void cublasLt::splitKreduce_kernel<32>", "triton_poi_fused_add", "_rmsnorm_gate_up_decode_kernel",
             "nvjet_sm90_tst_64x8_splitK_TNT", "void cublasLt::splitKreduce_kernel<32>", "triton_poi_fused_add"]
    # The first layer launches one kernel more (the compiler fused across its boundary): it is
    # left out, as is the last, whose span runs on into the step's tail.
    first = [*layer[:2], "triton_poi_fused_first_layer_only", *layer[2:]]
    names = ["embedding", *first, *layer, *layer, *layer, "norm", "lm_head_gemm", "argmax"]
    starts, period = profile_decode.split_layers(names, 4)
    assert (starts, period) == ([13, 24], len(layer))
    assert profile_decode.label_layer(layer, ("qkv", "mlp")) == [
        "norm+qkv (hf_fused)", "other", "attention inputs (inductor)", "attention", "o_proj",
        "o_proj (split-K reduce)", "other", "norm+gate/up (hf_fused)", "down_proj", "down_proj (split-K reduce)", "other",
    ]
    # Unfused: seven projections in layer order; a count that doesn't match names none of them.
    stock = ["gemv"] * 7
    assert profile_decode.label_layer(stock, ()) == list(profile_decode.PROJECTIONS)
    assert profile_decode.label_layer(stock[:6], ()) == ["other"] * 6
    # fuse=gemv: the streaming kernels are o_proj and down_proj, in layer order; from two tokens
    # on the op runs cuBLAS, and the cuBLAS kernels take those names instead.
    streamed = ["_rmsnorm_qkv_decode_kernel", "cudnn_flash", "_streaming_linear_kernel", "triton_poi_fused_add",
                "_rmsnorm_gate_up_decode_kernel", "_streaming_linear_kernel"]
    assert profile_decode.label_layer(streamed, ("qkv", "mlp", "gemv")) == [
        "norm+qkv (hf_fused)", "attention", "o_proj", "other", "norm+gate/up (hf_fused)", "down_proj"]
    batched = ["_rmsnorm_qkv_decode_kernel", "cudnn_flash", "nvjet_splitK", "void cublasLt::splitKreduce_kernel<32>",
               "triton_red_fused_norm", "nvjet_gate", "nvjet_up", "triton_poi_fused_silu_mul", "nvjet_down"]
    assert profile_decode.label_layer(batched, ("qkv", "gemv")) == [
        "norm+qkv (hf_fused)", "attention", "o_proj", "o_proj (split-K reduce)", "other", "gate_proj", "up_proj",
        "other", "down_proj"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp32 dots on a GPU round through tf32; the interpreter's are exact")
@pytest.mark.parametrize("variant", ["plain", "scale", "sum_sq", "both", "both_lanes"])
def test_tma_ablation_variants_compute_what_they_name(variant):
    """Each variant of benchmarks/ablate_tma_prefill.py, over partial tiles and more tiles than
    programs, against its formula in fp64."""
    import ablate_tma_prefill as ablate
    from hf_fused.ops.rmsnorm_qkv import GemmConfig

    x, norm_weight, weight = inputs(torch.float32, M=40, K=96, N=80)
    y = torch.empty(40, 80)
    scale, sum_sq, lane_sums = ablate.VARIANTS[variant]
    ablate.launch_variant(x, norm_weight, weight, y, GemmConfig(16, 32, 32, num_warps=4, num_stages=2),
                          scale, sum_sq, lane_sums)
    a = x.double() * norm_weight.double() if scale else x.double()
    expected = a @ weight.double().T
    if sum_sq:
        expected = expected * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_guard_overhead_times_one_graph_per_variant():
    """guard_overhead times calls of one compiled step: unpatched and patched, each step compiles
    once and no call recompiles (a recompile would time Dynamo's tracing, not its guards)."""
    model = LlamaForCausalLM(shape_config("tiny-llama")).eval()
    counters = torch._dynamo.utils.counters
    with torch.no_grad():
        for patch in (False, True):
            if patch:
                hf_fused.patch_model(model)
            counters.clear()
            us = guard_overhead.entry_us(model, calls=5)
            assert 0 < us < float("inf")
            assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.parametrize("intervals, busy", [
    ([], 0.0),
    ([(0.0, 10.0)], 10.0),
    ([(5.0, 12.0), (0.0, 10.0)], 12.0),  # overlapping, out of order: a PDL kernel starting early
    ([(0.0, 10.0), (2.0, 4.0)], 10.0),  # one inside another
    ([(0.0, 1.0), (3.0, 4.0), (3.5, 6.0)], 4.0),  # a gap is not busy
])
def test_static_profile_counts_overlapping_kernels_once(intervals, busy):
    """GPU busy time is the union of the kernels' intervals, not the sum of their durations."""
    assert profile_hf_static.busy_us(intervals) == busy


def test_static_profile_takes_the_prefill_run_off_per_step(monkeypatch):
    """Per decode step: the whole run's counts, host events and kernels less the prefill-only
    run's, over new_tokens - 1 steps; an event of the whole run alone counts in full."""
    runs = {5: ({"gpu_us": 90.0, "graph_records": 1}, {"a": 12.0, "b": 4.0}, {"k": 40.0}),
            1: ({"gpu_us": 10.0, "graph_records": 0}, {"a": 4.0}, {"k": 8.0})}
    monkeypatch.setattr(profile_hf_static, "profiled_run", lambda generate, ids, new_tokens: runs[new_tokens])
    counts, host_us, kernel_us, records = profile_hf_static.per_decode_step(None, None, 5)
    assert counts == {"gpu_us": 20.0, "graph_records": 0.25}
    assert host_us == {"a": 2.0, "b": 1.0} and kernel_us == {"k": 8.0} and records == 1
