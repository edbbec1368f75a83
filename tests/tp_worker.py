"""One rank of test_tensor_parallel.py, run under torchrun: a checkpoint loaded with
tp_plan="auto", patched, checked against itself unpatched, then a refused patch."""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from transformers import AutoModelForCausalLM

import hf_fused
from hf_fused.patches.fused import tensor_parallel_problem


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def main(folder: str) -> None:
    on_cuda = torch.cuda.is_available()
    if on_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if on_cuda else "gloo")
    world = dist.get_world_size()
    model = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto", dtype=torch.float32).eval()
    attn = model.model.layers[0].self_attn
    q_weight = attn.q_proj.weight
    assert isinstance(q_weight, DTensor) and tuple(q_weight.placements) == (Shard(0),), type(q_weight)
    device = q_weight.to_local().device
    ids = torch.arange(1, 17, device=device).view(1, 16)
    stock = model(ids).logits
    stock_state = {k: full(v).clone() for k, v in model.state_dict().items()}

    hf_fused.patch_model(model)
    # The default fuse also streams o_proj and down_proj, except row-sharded ones like these.
    assert type(attn.o_proj) is nn.Linear and isinstance(attn.o_proj.weight, DTensor)
    fused = attn.qkv_fused.weight
    config = model.config
    heads = config.num_attention_heads + 2 * config.num_key_value_heads
    # Each rank fused its own shards: a plain tensor with this rank's heads only.
    assert not isinstance(fused, DTensor) and fused.shape == (heads * config.head_dim // world, config.hidden_size)
    gate_up = model.model.layers[0].mlp.gate_up_fused.weight
    assert gate_up.shape == (2 * config.intermediate_size // world, config.hidden_size)
    torch.testing.assert_close(model(ids).logits, stock, rtol=1e-4, atol=1e-4)
    report = hf_fused.verify_patch(model, ids)
    assert report.ok, report
    # The state_dict holds the original keys as the original DTensors, so a TP save gathers them.
    state = model.state_dict()
    assert list(state) == list(stock_state)
    assert isinstance(state["model.layers.0.self_attn.k_proj.weight"], DTensor)
    for key, value in stock_state.items():
        assert torch.equal(full(state[key]), value), key

    hf_fused.unpatch_model(model)
    for name in ("q_proj", "k_proj", "v_proj"):
        weight = getattr(attn, name).weight
        assert isinstance(weight, DTensor) and tuple(weight.placements) == (Shard(0),), name
    assert torch.equal(model(ids).logits, stock)

    # A projection that is not row-sharded like its siblings: refused, and nothing touched.
    k_proj = model.model.layers[1].self_attn.k_proj
    k_proj.weight = nn.Parameter(distribute_tensor(full(k_proj.weight), k_proj.weight.device_mesh, [Replicate()]),
                                 requires_grad=False)
    params = {name: p for name, p in model.named_parameters()}
    try:
        hf_fused.patch_model(model)
    except hf_fused.UnsupportedModelError as error:
        assert "layers.1" in str(error) and "colwise" in str(error), error
    else:
        raise AssertionError("a replicated k_proj among sharded q/v was patched")
    assert not hf_fused.is_patched(model)
    assert all(p is params[name] for name, p in model.named_parameters())
    # Shards that split heads: 12 query rows of 4-wide heads leave each of two ranks 6 rows.
    def sharded(rows: int) -> nn.Linear:
        linear = nn.Linear(8, rows, bias=False, device=device)
        linear.weight = nn.Parameter(distribute_tensor(linear.weight.detach(), k_proj.weight.device_mesh, [Shard(0)]),
                                     requires_grad=False)
        return linear

    projs = {"q_proj": sharded(12), "k_proj": sharded(4), "v_proj": sharded(4)}
    problem = tensor_parallel_problem(torch.ones(8, device=device), projs, heads=(4, 3))
    assert problem is not None and "not whole heads" in problem, problem
    dist.barrier()
    print(f"rank {dist.get_rank()} of {world}: ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
