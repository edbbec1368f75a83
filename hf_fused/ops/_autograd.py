"""The ops' backward: the gradient of each op's own PyTorch reference, recomputed.

The forward is a fused kernel that keeps none of the intermediates a backward needs (the
normalized x, the gate and up outputs). So the backward saves only the op's inputs and reruns
the reference on them under autograd: the memory of a checkpointed layer, and exactly the
gradients that the stock, unfused model's autograd gives.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def register_reference_backward(op_name: str, reference: Callable[..., Tensor], added: int | None = None) -> None:
    """Register as ``op_name``'s autograd formula the gradient of ``reference``, a differentiable
    PyTorch function that takes the op's arguments, in the op's order, and computes its output.

    ``added`` is the position of an argument that the op adds to its output as it is (a
    residual): its gradient is grad_output, and the reference runs with None in its place. So
    a residual that the other inputs were computed from is not differentiated through them, as
    autograd.grad would, asked for the gradients of both.
    """

    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        # Tensors go through save_for_backward (version-checked, freed with the graph); None
        # holds their places among the other arguments (eps, flags), kept as they are.
        # The added argument's gradient needs nothing of it: it is not kept.
        inputs = [None if i == added else a for i, a in enumerate(inputs)]
        ctx.save_for_backward(*(a if isinstance(a, Tensor) else None for a in inputs))
        ctx.constants = tuple(None if isinstance(a, Tensor) else a for a in inputs)

    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        needs_grad = ctx.needs_input_grad
        args = [constant if saved is None else saved for saved, constant in zip(ctx.saved_tensors, ctx.constants)]
        if added is not None:
            needs_grad = tuple(needs and i != added for i, needs in enumerate(needs_grad))
        # Eager autograd hands back the inputs themselves, so that a double backward reaches
        # them; a traced backward (torch.compile) hands back plain tensors, made leaves here.
        args = [a.detach().requires_grad_() if needs and not a.requires_grad else a for a, needs in zip(args, needs_grad)]
        wanted = [a for a, needs in zip(args, needs_grad) if needs]
        create_graph = torch.is_grad_enabled()  # a backward runs with grad mode on only under create_graph=True
        with torch.enable_grad():
            grads = iter(torch.autograd.grad(reference(*args), wanted, grad_output, create_graph=create_graph))
        out = [next(grads) if needs else None for needs in needs_grad]
        if added is not None and added < len(out) and ctx.needs_input_grad[added]:
            out[added] = grad_output
        return tuple(out)

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)
