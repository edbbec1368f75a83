"""Training through a patched model, and the dtypes that the kernels lack.

Each op's backward is the gradient of its PyTorch reference, recomputed from the saved inputs
(hf_fused/ops/_autograd.py), so a patched model trains with the stock model's gradients. float64
and other floating dtypes that the kernels lack run the reference in the forward too.

On CPU: the kernels run in Triton's interpreter where conftest.py turns it on, the reference elsewhere.
"""

import copy
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hf_fused
from hf_fused.models import build_random_model
from hf_fused.ops import rmsnorm_gate_up, rmsnorm_gate_up_ref, rmsnorm_qkv, rmsnorm_qkv_ref, streaming_linear
from hf_fused.patches import DEFAULT_FUSE
from hf_fused.patches.fused import FusedNorm

EPS = 1e-5
K = 64


def build(dtype: torch.dtype) -> nn.Module:
    return build_random_model("tiny-llama", dtype, "cpu").requires_grad_(True)


def token_ids() -> Tensor:
    return torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))


def grads_by_stock_name(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter's gradient under its stock (state_dict) name.

    A patched model's q/k/v and gate/up weights are rows of the fused module's weight, and their
    original Parameters hold no storage: their gradients are those rows of the fused weight's
    gradient. Unpatching would not bring gradients back to the originals (it points their data,
    not their .grad, at the fused rows), so the rows are read here, by the fused module's bounds.
    """
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name, module in model.named_modules():
        if isinstance(module, FusedNorm) and not module.packed:
            parent = name.rpartition(".")[0]
            for kind in ("weight", "bias"):
                stacked = grads.pop(f"{name}.{kind}", None)
                for proj, (start, stop) in module.bounds.items():
                    if stacked is not None:
                        grads[f"{parent}.{proj}.{kind}"] = stacked[start:stop]
    return grads


def train_step(model: nn.Module, ids: Tensor, *, compiled: bool = False) -> dict[str, Tensor]:
    """One forward and backward: the loss and every parameter's gradient, by stock name."""
    # aot_eager traces forward and backward as inductor does, without its slow CPU codegen.
    run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
    loss = run.train()(input_ids=ids, labels=ids).loss
    loss.backward()
    return {"loss": loss.detach(), **grads_by_stock_name(model)}


def assert_all_close(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    """fp32, tight: the backward is the stock computation; only the forward's fused kernels sum
    in another order (a few ulps of the activations), which the gradients inherit: measured up
    to 5e-7 of each tensor's largest magnitude."""
    assert got.keys() == want.keys()
    for name, expected in want.items():
        atol = 1e-5 * expected.abs().max().item()
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("fuse", [("qkv", "mlp", "gemv"), DEFAULT_FUSE], ids="+".join)
def test_fp32_training_step_gives_the_stock_loss_and_gradients(fuse):
    stock = build(torch.float32)
    patched = hf_fused.patch_model(copy.deepcopy(stock), fuse=fuse)
    ids = token_ids()
    got, want = train_step(patched, ids), train_step(stock, ids)
    assert want.keys() == {"loss", *dict(stock.named_parameters())}
    assert_all_close(got, want)


def test_bf16_training_step_errs_at_most_twice_as_much_as_stock():
    """Against an fp32 run of the same weights, by the rule of tests/test_ops.py: the patched
    model's error is at most twice the stock model's, plus a small atol (1e-3 of each tensor's
    largest magnitude, an eighth of bf16's epsilon) where the stock model happens to be exact."""
    stock = build(torch.bfloat16)
    patched, stock32 = hf_fused.patch_model(copy.deepcopy(stock)), copy.deepcopy(stock).float()
    ids = token_ids()
    got, want, exact = train_step(patched, ids), train_step(stock, ids), train_step(stock32, ids)
    assert got.keys() == want.keys() == exact.keys()
    for name, ref in exact.items():
        err, stock_err = ((t[name].float() - ref).abs().max().item() for t in (got, want))
        assert err <= 2 * stock_err + 1e-3 * ref.abs().max().item(), (name, err, stock_err)


def test_compiled_training_step_is_one_graph_with_the_eager_gradients():
    """Compiled, the ops' backward is traced too, and o_proj/down_proj call streaming_linear
    (eager code keeps F.linear), so its backward runs as well."""
    model = hf_fused.patch_model(build(torch.float32))
    twin = copy.deepcopy(model)
    ids = token_ids()
    assert_all_close(train_step(twin, ids, compiled=True), train_step(model, ids))


# ---- Op level: each op's gradients are its reference's ----


class Op(NamedTuple):
    fn: Callable[..., Tensor]
    reference: Callable[..., Tensor]
    takes_norm: bool
    rows: int  # of its weight


OPS = {
    "rmsnorm_qkv": Op(rmsnorm_qkv, rmsnorm_qkv_ref, True, 48),
    "rmsnorm_gate_up": Op(rmsnorm_gate_up, rmsnorm_gate_up_ref, True, 48),
    "streaming_linear": Op(streaming_linear, F.linear, False, 48),
}
# (op, tokens M, bias, keyword arguments); one token takes the weight-streaming kernels.
CASES = [
    ("rmsnorm_qkv", 1, True, dict(eps=EPS, norm_style="llama")),
    ("rmsnorm_qkv", 5, True, dict(eps=EPS, norm_style="gemma")),
    ("rmsnorm_qkv", 5, False, dict(eps=EPS, norm_style="llama")),
    ("rmsnorm_gate_up", 1, False, dict(eps=EPS, norm_style="llama", activation="silu")),
    ("rmsnorm_gate_up", 5, False, dict(eps=EPS, norm_style="gemma", activation="gelu_tanh")),
    ("streaming_linear", 1, True, {}),
    ("streaming_linear", 3, False, {}),
]


def case_id(case: tuple) -> str:
    name, M, bias, kwargs = case
    return "-".join([name, f"M{M}", *(["bias"] if bias else []), *(v for k, v in kwargs.items() if k != "eps")])


def operands(name: str, M: int, bias: bool, dtype: torch.dtype) -> list[Tensor]:
    """The op's tensor arguments, in its order: x, the norm weight if it takes one, weight, bias if asked."""
    op = OPS[name]
    gen = torch.Generator().manual_seed(0)
    tensors = [3 * torch.randn(M, K, generator=gen)]
    if op.takes_norm:
        tensors.append(1 + 0.5 * torch.randn(K, generator=gen))
    tensors.append(torch.randn(op.rows, K, generator=gen) / K**0.5)
    if bias:
        tensors.append(torch.randn(op.rows, generator=gen))
    return [t.to(dtype).requires_grad_() for t in tensors]


def op_and_reference(case: tuple) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    name, _, _, kwargs = case
    return partial(OPS[name].fn, **kwargs), partial(OPS[name].reference, **kwargs)


@pytest.mark.parametrize("frozen_weights", [False, True], ids=["all", "x-only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_op_gradients_are_the_references_bit_for_bit(case, dtype, frozen_weights):
    op, reference = op_and_reference(case)
    tensors = operands(*case[:3], dtype)
    if frozen_weights:  # as in adapter training: the gradient flows to x alone
        for t in tensors[1:]:
            t.requires_grad_(False)
    wanted = [t for t in tensors if t.requires_grad]
    y = op(*tensors)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = torch.autograd.grad(y, wanted, grad_out)
    want = torch.autograd.grad(reference(*tensors), wanted, grad_out)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("M", [1, 3])
def test_residual_gradient_when_x_was_computed_from_it(M):
    """In a decoder layer o_proj's input was computed from the residual it adds: the residual's
    gradient is the sum over both paths, as the stock layer's autograd gives it."""
    gen = torch.Generator().manual_seed(0)
    residual = (3 * torch.randn(M, K, generator=gen)).requires_grad_()
    weight = (torch.randn(K, K, generator=gen) / K**0.5).requires_grad_()
    grad_out = torch.randn(M, K, generator=gen)

    def layer(linear) -> tuple[Tensor, ...]:
        x = torch.tanh(residual)
        return torch.autograd.grad(linear(x, weight, residual), [residual, weight], grad_out)

    got = layer(lambda x, w, r: streaming_linear(x, w, None, r))
    want = layer(lambda x, w, r: r + F.linear(x, w))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", [c for c in CASES if c[1] > 1], ids=case_id)
def test_op_double_backward_is_the_references(case):
    """A gradient penalty differentiates a gradient: the recomputed reference's graph allows it."""
    op, reference = op_and_reference(case)
    tensors = operands(*case[:3], torch.float32)
    grad_out = torch.randn(reference(*tensors).shape, generator=torch.Generator().manual_seed(1))

    def second_order(fn: Callable[..., Tensor]) -> tuple[Tensor | None, ...]:
        (grad_x,) = torch.autograd.grad(fn(*tensors), tensors[0], grad_out, create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), tensors, allow_unused=True)

    for g, w in zip(second_order(op), second_order(reference), strict=True):
        assert (g is None and w is None) or torch.equal(g, w)


@pytest.mark.parametrize(
    "name, M, bias, flags",
    [
        ("rmsnorm_qkv", 1, True, (EPS, False)),
        ("rmsnorm_qkv", 3, True, (EPS, True)),
        ("rmsnorm_gate_up", 1, False, (EPS, False, "silu")),
        ("rmsnorm_gate_up", 3, False, (EPS, True, "gelu_tanh")),
        ("streaming_linear", 1, True, ()),
    ],
)
def test_opcheck_with_gradients(name, M, bias, flags):
    """opcheck tests the autograd registration only on inputs that require grad; all of these do."""
    torch.library.opcheck(getattr(torch.ops.hf_fused, name), (*operands(name, M, bias, torch.float32), *flags))


# ---- Dtypes the kernels lack ----


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float64_runs_the_reference(case):
    op, reference = op_and_reference(case)
    tensors = operands(*case[:3], torch.float64)
    assert torch.equal(op(*tensors), reference(*tensors))


def logits(model: nn.Module, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_float64_after_patching_runs_like_the_stock_model():
    stock = build(torch.float32)
    patched = hf_fused.patch_model(copy.deepcopy(stock)).to(torch.float64)
    ids = token_ids()
    got, want = logits(patched, ids), logits(stock.to(torch.float64), ids)
    assert got.dtype == torch.float64
    # Not bit for bit: transformers' RMSNorm computes in fp32 even in a float64 model, while
    # hf_fused's reference keeps float64 there (rmsnorm_ref). So they agree to fp32's rounding
    # of the norm (about 1e-7 here), far inside what separates them from any fp32 run.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_float16_after_patching_errs_at_most_twice_as_much_as_stock():
    stock = build(torch.float32)
    patched = hf_fused.patch_model(copy.deepcopy(stock)).to(torch.float16)
    ids = token_ids()
    ref32 = logits(stock, ids)
    err = (logits(patched, ids).float() - ref32).abs().max()
    stock_err = (logits(stock.to(torch.float16), ids).float() - ref32).abs().max()
    assert err <= 2 * stock_err + 1e-3, (err, stock_err)


@pytest.mark.parametrize("name", OPS)
def test_integer_input_is_a_value_error_naming_its_dtype(name):
    x, *weights = operands(name, 2, False, torch.float32)
    kwargs = {"eps": EPS} if OPS[name].takes_norm else {}
    with pytest.raises(ValueError, match="torch.int32"):
        OPS[name].fn(x.detach().to(torch.int32), *weights, **kwargs)
