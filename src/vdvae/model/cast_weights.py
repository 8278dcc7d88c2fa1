"""Call a model under autocast with its convolution weights cast all at once.

Autocast casts each convolution's fp32 weight and bias to bf16 when the convolution runs, and the
backward casts their gradients back: four operators per convolution, 2,772 for the cifar10 preset,
a third of its eager bf16 step's operators, and about as many kernels in a compiled step. On a
GPU each costs host time, more than these small kernels take on the device. Cast together, the
weights take a cat and a cast forward, and the same backward, with the same bf16 values and the
same fp32 gradients.
"""

import torch
from torch import nn


def flat_view(t: torch.Tensor) -> torch.Tensor:
    """`t`'s elements in memory order, as a 1-D view (`t` is dense: a parameter or its gradient)."""
    return t.as_strided((t.numel(),), (1,))


class CastTogether(torch.autograd.Function):
    """tensors -> the same tensors in `dtype` (same shapes and strides), as views of one flat
    cast of them all; the backward casts their gradients back the same way. The gradients reach
    the weights together, at the end of the backward (DDP then all-reduces them after it)."""

    @staticmethod
    def forward(ctx, dtype, *tensors):
        ctx.layouts = [(t.shape, t.stride()) for t in tensors]
        ctx.input_dtype = tensors[0].dtype
        return cast_flat(tensors, dtype, ctx.layouts)

    @staticmethod
    def backward(ctx, *grads):
        # A gradient laid out otherwise than its weight is first copied into the weight's layout.
        grads = [
            g if g.stride() == stride else g.new_empty_strided(shape, stride).copy_(g)
            for g, (shape, stride) in zip(grads, ctx.layouts, strict=True)
        ]
        return None, *cast_flat(grads, ctx.input_dtype, ctx.layouts)


def cast_flat(tensors, dtype, layouts) -> tuple:
    """`tensors` cast to `dtype` by one cat and one cast, as views with the given (shape, stride)."""
    # Cat, then cast: CUDA's cat runs as a few batched kernels only when it needs no cast.
    flat = torch.cat([flat_view(t) for t in tensors]).to(dtype)
    parts = flat.split([t.numel() for t in tensors])
    return tuple(part.as_strided(*layout) for part, layout in zip(parts, layouts, strict=True))


def cast_conv_weights(module: nn.Module, dtype: torch.dtype) -> dict:
    """name -> the parameter cast to `dtype`, for the parameters of every Conv2d in `module`,
    cast together (differentiably: the gradients reach the fp32 parameters)."""
    params = {
        f"{prefix}.{name}" if prefix else name: p
        for prefix, m in module.named_modules()
        if isinstance(m, nn.Conv2d)
        for name, p in m.named_parameters(recurse=False)
    }
    if not params:
        return {}
    return dict(zip(params, CastTogether.apply(dtype, *params.values()), strict=True))


# On the CPU an operator costs little beyond its work, and per-weight casts are the faster way
# (the cifar10 preset's bf16 forward + backward at batch 8: about 5% faster).
CAST_PER_WEIGHT_ON = {"cpu"}


def call_with_cast_weights(module: nn.Module, *args, **kwargs):
    """`module(*args, **kwargs)`; under autocast on an accelerator, with the convolution weights
    cast together first."""
    device = next(module.parameters()).device.type
    if device in CAST_PER_WEIGHT_ON or not torch.is_autocast_enabled(device):
        return module(*args, **kwargs)
    cast = cast_conv_weights(module, torch.get_autocast_dtype(device))
    return torch.func.functional_call(module, cast, args, kwargs)
