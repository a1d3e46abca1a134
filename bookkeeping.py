"""Book-Keeping ghost clipping (Bu et al., ICML 2023) on Opacus' hooks: DP-SGD's clipped gradient sum in one
backward pass (`--grad-sample-mode bk`).

Opacus' ghost clipping (fast gradient clipping) takes two backward passes: the first for the per-sample gradient
norms, the second of the loss reweighted by the clipping factors. Book-keeping keeps what the first pass's
hooks see anyway (each layer's input activations and output gradients) and writes the clipped sum
Σ_i c_i ∇_i directly as a reweighted product of the two: for a Linear layer Σ_i c_i δ_i a_iᵀ, for a
convolution the weight gradient of the output gradients scaled sample by sample (torch.nn.grad.conv2d_weight,
one im2col product, no per-sample gradient). The backward pass asks autograd for the layers' output gradients
only, so no unclipped weight gradient is ever computed: DP-SGD's arithmetic is plain training's plus the norms.

Norms: Linear layers take Opacus' ghost norm; a convolution takes the cheaper of the Gram-matrix ghost norm,
B·T²·(p_in + p_out) for T output positions, and the norm of its per-sample gradient, B·T·p_in·p_out (mixed ghost
clipping, Bu, Mao and Xu, NeurIPS 2022), neither kept past the hook; any other layer (GroupNorm, layers without an
Opacus rule) its Opacus per-sample gradient, reweighted by the clipping factors for the sum.

Everything else is Opacus': the hooks (GradSampleModuleFastGradientClipping), the noise and its scale
(DPOptimizerFastGradientClipping), Poisson sampling and the accountant's hook, so the accounting is that of
every other engine; a test checks the update against the hooks engine's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping, DPTensorFastGradientClipping
from opacus.utils.module_utils import requires_grad, trainable_parameters
from opacus.utils.tensor_utils import unfold2d

Params = dict[nn.Parameter, torch.Tensor]
Clipped = Callable[[torch.Tensor], Params]  # clipping factors (one per sample) -> each parameter's clipped sum


def per_sample(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The per-sample factors c shaped to broadcast over a batch-first tensor like `like`."""
    return c.view(-1, *[1] * (like.dim() - 1))


def linear_rule(layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor) -> tuple[Params, Clipped]:
    """Opacus' ghost norm; the clipped sum Σ_i c_i δ_i a_iᵀ is one matrix product."""
    a = activations[0].to(backprops.dtype)
    norms = GradSampleModuleFastGradientClipping.NORM_SAMPLERS[nn.Linear](layer, [a], backprops)

    def clipped(c: torch.Tensor) -> Params:
        scaled = backprops * per_sample(c, backprops)
        sums = {}
        if layer.weight.requires_grad:
            sums[layer.weight] = scaled.reshape(-1, scaled.shape[-1]).T @ a.reshape(-1, a.shape[-1])
        if layer.bias is not None and layer.bias.requires_grad:
            sums[layer.bias] = scaled.reshape(-1, scaled.shape[-1]).sum(0)
        return sums

    return norms, clipped


def conv2d_rule(layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor) -> tuple[Params, Clipped]:
    """Mixed ghost clipping: the per-sample norm from the Gram matrices of the im2col columns and of the output
    gradients when T(p_in + p_out) < p_in·p_out, else from the per-sample gradient; the clipped sum is the
    weight gradient of the reweighted output gradients."""
    x = activations[0].to(backprops.dtype)
    n = len(x)
    norms, samples = {}, None
    if layer.weight.requires_grad:
        cols = unfold2d(
            x, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride, dilation=layer.dilation
        )  # (n, p_in, T)
        grads = backprops.reshape(n, layer.out_channels, -1)  # (n, p_out, T)
        (p_in, positions), p_out = cols.shape[1:], grads.shape[1]
        if positions * (p_in + p_out) < p_in * p_out:
            gram = torch.bmm(cols.transpose(1, 2), cols) * torch.bmm(grads.transpose(1, 2), grads)
            squared = gram.sum((1, 2)).clamp(min=0)
        else:  # kept for the sum: no larger than the columns and output gradients, B·T·(p_in + p_out)
            samples = torch.bmm(grads, cols.transpose(1, 2)).flatten(1)  # (n, p_out·p_in)
            squared = samples.square().sum(1)
        norms[layer.weight] = squared.sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = backprops.sum((2, 3)).norm(2, dim=1)

    def clipped(c: torch.Tensor) -> Params:
        scaled = backprops * per_sample(c, backprops)
        sums = {}
        if samples is not None:
            sums[layer.weight] = c @ samples
        elif layer.weight.requires_grad:
            sums[layer.weight] = torch.nn.grad.conv2d_weight(
                x, layer.weight.shape, scaled, layer.stride, layer.padding, layer.dilation, layer.groups
            )
        if layer.bias is not None and layer.bias.requires_grad:
            sums[layer.bias] = scaled.sum((0, 2, 3))
        return sums

    return norms, clipped


def per_sample_rule(
    layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> tuple[Params, Clipped]:
    """Any other layer: Opacus' per-sample gradients (its grad sampler for the layer type, else functorch), their
    norms, and their sum weighted by the clipping factors."""
    sampler = GradSampleModuleFastGradientClipping.GRAD_SAMPLERS.get(type(layer), ft_compute_per_sample_gradient)
    samples = {p: g for p, g in sampler(layer, activations, backprops).items() if p.requires_grad}
    norms = {p: g.reshape(len(g), -1).norm(2, dim=1) for p, g in samples.items()}
    return norms, lambda c: {p: torch.einsum("n,n...->...", c, g) for p, g in samples.items()}


def rule_for(layer: nn.Module) -> Callable[[nn.Module, list[torch.Tensor], torch.Tensor], tuple[Params, Clipped]]:
    """The layer's rule: Linear and ordinary convolutions (one group, zero padding given in numbers) have their
    own; the rest go through Opacus' per-sample gradients."""
    if type(layer) is nn.Linear:
        return linear_rule
    ordinary = type(layer) is nn.Conv2d and layer.groups == 1 and layer.padding_mode == "zeros"
    return conv2d_rule if ordinary and not isinstance(layer.padding, str) else per_sample_rule


class GradSampleModuleBookKeeping(GradSampleModuleFastGradientClipping):
    """Opacus' fast-gradient-clipping module whose backward hooks keep, for each layer, its per-sample norms and
    how to write its clipped gradient sum once the clipping factors are known (write_clipped_gradients)."""

    def __init__(self, m: nn.Module, **kwargs):
        super().__init__(m, **kwargs)
        self.outputs: list[torch.Tensor] = []  # the hooked layers' outputs: autograd differentiates towards them
        self.clippers: list[Clipped] = []

    def forward(self, *args, **kwargs):
        self.outputs.clear()
        self.clippers.clear()
        return super().forward(*args, **kwargs)

    def capture_activations_hook(self, module: nn.Module, forward_input, forward_output) -> None:
        before = len(getattr(module, "activations", []))
        super().capture_activations_hook(module, forward_input, forward_output)
        if len(getattr(module, "activations", [])) == before:
            return
        if before or not isinstance(forward_output, torch.Tensor):
            raise NotImplementedError(
                "book-keeping needs every trainable layer called once per forward pass with one tensor output "
                "(no tied or reused layers, no recurrent layers)"
            )
        self.outputs.append(forward_output)

    def capture_backprops_hook(self, module: nn.Module, _forward_input, forward_output, loss_reduction, batch_first):
        if not self.hooks_enabled:
            return
        activations, backprops = self.rearrange_grad_samples(  # "sum": unscaled; the scale goes on the B norms
            module=module, backprops=forward_output[0].detach(), loss_reduction="sum", batch_first=batch_first
        )
        scale = module.max_batch_len if loss_reduction == "mean" else 1  # backprops of a mean are ∇_i / B
        norms, clipped = rule_for(module)(module, activations, backprops)
        for param, norm in norms.items():
            param._norm_sample = norm * scale
        for _, param in trainable_parameters(module):
            param._forward_counter -= 1
        self.clippers.append(lambda c: clipped(c * scale))
        del module.max_batch_len

    def write_clipped_gradients(self) -> None:
        """p.grad = Σ_i c_i ∇_i p with Opacus' clipping factors c_i = min(1, C / ‖∇_i‖) (what its optimizer
        then noises and scales)."""
        factors = self.get_clipping_coef()
        for clipped in self.clippers:
            for param, total in clipped(factors).items():
                param.grad = total.view_as(param)
        self.outputs.clear()
        self.clippers.clear()

    def skip_empty_batch(self) -> None:
        """An empty Poisson batch: zero gradients (the optimizer still noises them), nothing kept."""
        for module in self._module.modules():
            if requires_grad(module) and getattr(module, "activations", None):
                module.activations.clear()
                for _, param in trainable_parameters(module):
                    param._forward_counter = 0
        for param in self.trainable_parameters:
            param.grad = torch.zeros_like(param)
        self.outputs.clear()
        self.clippers.clear()


class DPTensorBookKeeping(DPTensorFastGradientClipping):
    """The loss of a book-keeping step: `backward()` is one backward pass to the layers' outputs, then the
    clipped sums."""

    def backward(self) -> None:
        module, losses = self.module, self.loss_per_sample
        if losses.numel() == 0:
            module.skip_empty_batch()
            return
        reduced = losses.mean() if self.loss_reduction == "mean" else losses.sum()
        torch.autograd.grad(reduced, module.outputs, allow_unused=True)
        module.write_clipped_gradients()


class DPLossBookKeeping(DPLossFastGradientClipping):
    def __call__(self, *args, **kwargs) -> DPTensorBookKeeping:
        loss = super().__call__(*args, **kwargs)
        return DPTensorBookKeeping(loss.module, loss.optimizer, loss.loss_per_sample, loss.loss_reduction)


class BookKeepingPrivacyEngine(PrivacyEngine):
    """Opacus' PrivacyEngine in its ghost mode (make_private(grad_sample_mode="ghost"): its optimizer, data loader
    and accountant) with the book-keeping module and loss in place of fast gradient clipping's."""

    def _prepare_model(self, module: nn.Module, *, batch_first=True, max_grad_norm=1.0, loss_reduction="mean", **_):
        self.validate(module=module, optimizer=None, data_loader=None)
        return GradSampleModuleBookKeeping(
            module, batch_first=batch_first, loss_reduction=loss_reduction, max_grad_norm=max_grad_norm
        )

    def _prepare_criterion(self, *, module, optimizer, criterion, loss_reduction="mean", **_) -> DPLossBookKeeping:
        return DPLossBookKeeping(module, optimizer, criterion, loss_reduction)
