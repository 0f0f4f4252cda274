"""Per-example gradient clipping in one backward pass, for models built from Linear and
Conv2d layers (book-keeping, Bu et al. 2023, "Differentially private optimization on large
model at small cost").

DP-SGD needs the sum over a batch of each example's gradient clipped to norm C. For a layer
whose output for example i is y_i = W a_i (+ b), that example's weight gradient is g_i a_i^T
with g_i = dL_i/dy_i. So the forward pass keeps each layer's input a, one autograd call gives
every layer's output gradient g (the weights' own gradients are never computed), and then:
- Linear on (batch, features): the example's squared norm is |g_i|^2 |a_i|^2 (+ |g_i|^2 for
  the bias), never materialised, and the clipped sum is (c * g)^T a;
- Conv2d, and Linear on longer inputs: the per-example gradients are materialised from the
  unfolded input (they are small for the models this is for), then summed with weights c.
with c_i = min(1, C / (|grad_i| + 1e-6)), exactly Opacus's clipping factor. This is the
sum Opacus's GradSampleModule + DPOptimizer compute (tested equal), without their hooks and
per-parameter bookkeeping, whose fixed cost of ~0.7 ms a step is 3x the whole step of a
small tabular model.

Only models whose every module is exactly a known per-example operation qualify
(`supports`); anything else (custom forward code, subclasses, normalisation over the batch,
shared layers or weights, in-place activations, hooks) goes through Opacus.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class Shift(nn.Module):
    """x + offset, a constant (e.g. centring pixels): a per-example operation without
    parameters, which `supports` knows."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset

    def extra_repr(self) -> str:
        return f"offset={self.offset}"


_PER_EXAMPLE = {
    Shift,
    nn.Linear,
    nn.Conv2d,
    nn.Sequential,
    nn.Identity,
    nn.Flatten,
    nn.Dropout,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
}


def supports(model: nn.Module) -> bool:
    """True when every module of `model` is exactly (not a subclass of) Linear, a plain
    Conv2d or a known per-example operation, none works in place or carries hooks, and no
    layer or parameter is used twice: then each example's gradient depends on that example
    alone, and the layers' recorded inputs and outputs are what autograd differentiates."""
    modules = [m for _, m in model.named_modules(remove_duplicate=False)]
    parameters = [p for _, p in model.named_parameters(remove_duplicate=False)]
    if len({id(m) for m in modules}) < len(modules) or len({id(p) for p in parameters}) < len(parameters):
        return False
    for m in modules:
        kind = type(m)
        if (
            kind not in _PER_EXAMPLE
            or m._forward_hooks
            or m._forward_pre_hooks
            or getattr(m, "inplace", False)
        ):
            return False
        if kind is nn.Conv2d:
            assert isinstance(m, nn.Conv2d)
            if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                return False
        elif kind is not nn.Linear and any(True for _ in m.parameters(recurse=False)):
            return False
    return any(p.requires_grad for p in parameters)


@dataclass
class _Call:
    layer: nn.Linear | nn.Conv2d
    input: torch.Tensor
    output: torch.Tensor


class BookKeeping:
    """While alive, records the inputs and outputs of `model`'s layers on each forward pass;
    `clipped_sum(losses)` turns the batch's per-example losses into the sum of clipped
    per-example gradients, written to each parameter's `.grad`."""

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        self.max_grad_norm = max_grad_norm
        self._calls: list[_Call] = []
        layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
        self._hooks = [m.register_forward_hook(self._record) for m in layers if _trainable(m)]

    def _record(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        assert isinstance(layer, nn.Linear | nn.Conv2d)
        self._calls.append(_Call(layer, inputs[0].detach(), output))

    def clipped_sum(self, losses: torch.Tensor) -> None:
        calls, self._calls = self._calls, []
        grads = torch.autograd.grad(losses.sum(), [c.output for c in calls])
        squared = torch.zeros(len(losses), dtype=losses.dtype, device=losses.device)
        sums = []  # per call: (call, a, g) for Linear on 2-D inputs, else (call, per-example grads, bias grads)
        for call, g in zip(calls, grads, strict=True):
            layer, a = call.layer, call.input
            if isinstance(layer, nn.Linear) and a.dim() == 2:
                g_squared = g.square().sum(1)
                if layer.weight.requires_grad:
                    squared += g_squared * a.square().sum(1)
                if _trains(layer.bias):
                    squared += g_squared
                sums.append((call, a, g))
                continue
            if isinstance(layer, nn.Conv2d):
                assert not isinstance(layer.padding, str)  # `supports` refused "same"/"valid"
                patches = nn.functional.unfold(
                    a, layer.kernel_size, layer.dilation, layer.padding, layer.stride
                )
                g = g.flatten(2)  # batch x out x positions
            else:  # Linear over a sequence: batch x positions x features
                patches, g = a.flatten(1, -2).transpose(1, 2), g.flatten(1, -2).transpose(1, 2)
            per_example = torch.bmm(g, patches.transpose(1, 2))  # batch x out x fan-in
            bias = g.sum(2)
            if layer.weight.requires_grad:
                squared += per_example.square().sum((1, 2))
            if _trains(layer.bias):
                squared += bias.square().sum(1)
            sums.append((call, per_example, bias))
        # An example whose loss or gradient is not finite (a server can send weights that
        # overflow for some inputs only) contributes nothing: a NaN would poison the whole sum,
        # and whether the update is finite would tell the server whether that example is there.
        finite = torch.isfinite(squared) & torch.isfinite(losses.detach())
        factor = torch.where(finite, (self.max_grad_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0), 0.0)
        for call, first, second in sums:
            layer = call.layer
            keep = finite.view(-1, *([1] * (first.dim() - 1)))
            first = torch.where(keep, first, 0.0)  # 0 x inf would still be NaN
            second = torch.where(finite.view(-1, *([1] * (second.dim() - 1))), second, 0.0)
            if first.dim() == 2:  # Linear on (batch, features): first = a, second = g
                weighted = second * factor[:, None]
                weight_grad, bias_grad = weighted.T @ first, weighted.sum(0)
            else:
                weight_grad, bias_grad = torch.einsum("b,bij->ij", factor, first), factor @ second
            if layer.weight.requires_grad:
                layer.weight.grad = weight_grad.view_as(layer.weight)
            if _trains(layer.bias):
                assert layer.bias is not None
                layer.bias.grad = bias_grad

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._calls = []


def _trainable(layer: nn.Module) -> bool:
    return any(p.requires_grad for p in layer.parameters())


def _trains(parameter: torch.Tensor | None) -> bool:
    return parameter is not None and parameter.requires_grad
