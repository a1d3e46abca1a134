"""Training-time privacy: DP-SGD through Opacus, the loss-regularized alternative (PDP-SGD), and the
conversion between a target ε and a noise multiplier, always through an Opacus accountant."""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from bookkeeping import BookKeepingPrivacyEngine
from utils import UsageError

PRIVACY_MODES = ("none", "dp-sgd", "regularized")
# Opacus' per-sample gradient engines (--grad-sample-mode): hooks (its classic autograd hooks), functorch (vmap
# over torch.func.grad), ew (PyTorch's expanded weights), ghost (fast gradient clipping: per-sample norms, then a
# second backward pass of the reweighted loss; ghost norms without per-sample gradients for Linear layers), bk
# (book-keeping on Opacus' ghost-mode hooks: one backward pass, the clipped sum written directly; bookkeeping.py).
GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch", "ew", "ghost", "bk")
# What `auto` tries, in this order; the first that handles the model. Measured (bench/dp_engine_bench.py, medians of
# interleaved repetitions): book-keeping is the fastest and leanest on both models, by far on a ResNet-18 fine-tuned
# end to end (loaded CPU: 2.1x plain's time and 1.5x its training memory, against ghost's 13.2x and 8.5x and hooks'
# 12.4x and 19x), and on the study's small cnn (quiet CPU; faces, B = 32: bk 2.03x plain's time, ghost 2.62x, hooks
# 2.50x; digits, B = 128: bk 1.43x, ghost 1.92x, hooks 2.86x).
ENGINE_PREFERENCE = ("bk", "ghost", "hooks", "ew", "functorch")
# Layer types PyTorch's expanded weights differentiate per sample; any other layer with trainable weights fails.
EXPANDED_WEIGHTS_LAYERS = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.GroupNorm, nn.LayerNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)  # fmt: skip
ACCOUNTANTS = ("prv", "rdp", "gdp")  # Opacus' accountants; "prv" is PrivacyEngine's default
PRV_MAX_EPSILON = 100.0  # above this the prv accountant's search overflows and runs for minutes (ε = 200: ~3 min)


def noise_multiplier_for(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv"
) -> float:
    """The smallest noise multiplier whose ε after `steps` Poisson-sampled steps is at most the target:
    the same search Opacus' make_private_with_epsilon does, so training and attacks agree. A budget no noise
    reaches is a UsageError, found before any run trains."""
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )
    except ValueError as err:
        raise UsageError(
            f"no noise multiplier reaches ε = {target_epsilon:g} at δ = {delta:g} over {steps} steps at sampling "
            f"rate {sample_rate:.3g} (Opacus: {err}); give a larger ε (budgets from about 0.1 up work here)."
        ) from None


def poisson_schedule(num_samples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """Sample rate and number of steps of `epochs` of Poisson-sampled DP-SGD, as Opacus sets them up: its
    DPDataLoader samples at rate 1 / len(loader) and takes len(loader) steps per epoch, len(loader) being
    the number of batches of an ordinary loader, ceil(N / batch_size)."""
    batches = math.ceil(num_samples / batch_size)
    return 1 / batches, epochs * batches


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """ε the accountant reports for `steps` steps of the sampled Gaussian mechanism (0 steps spend nothing)."""
    if steps == 0:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def release_epsilon(noise_multiplier: float, delta: float) -> float:
    """ε of one release of a clipped, noised gradient on a batch that certainly holds the target: the Gaussian
    mechanism with that noise multiplier (Poisson rate 1, one step), from Opacus' PRV accountant, which is
    exact for it up to its discretisation (RDP would overstate it by ~8 %, and GDP's central-limit
    approximation does not hold for one step). This is what a server that attacks one update faces; the
    training run's ε (subsampled, composed over all steps) is about the whole run."""
    with warnings.catch_warnings():  # at rate 1, PRV takes log(0) in a branch it then discards
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        return epsilon_spent(noise_multiplier, 1.0, 1, delta, "prv")


def unsupported_layer(module: nn.Module, mode: str) -> str | None:
    """The first layer Opacus cannot train in `mode`, named and with the reason; None when every layer works.
    Opacus' ModuleValidator rules out layers that mix samples (BatchNorm) in every mode; expanded weights (ew)
    differentiate only the layer types PyTorch implements for them, and the other engines' backward hooks
    fail on in-place activations. hooks, ghost and bk fall back to functorch for a layer without an Opacus
    per-sample rule, so they handle the rest."""
    for name, layer in module.named_modules():
        validator = ModuleValidator.VALIDATORS.get(type(layer))
        errors = validator(layer) if validator else []
        if errors:
            reason = str(errors[0]).split(". ")[0]
            return f"layer '{name or 'model'}' ({type(layer).__name__}): {reason}"
        if mode != "ew" and getattr(layer, "inplace", False) is True:
            return (
                f"layer '{name or 'model'}' ({type(layer).__name__}): it works in place, which Opacus' backward hooks "
                "cannot differentiate through (set its inplace=False)"
            )
        trainable = any(p.requires_grad for p in layer.parameters(recurse=False))
        if mode == "ew" and trainable and not isinstance(layer, EXPANDED_WEIGHTS_LAYERS):
            return (
                f"layer '{name or 'model'}' ({type(layer).__name__}): PyTorch's expanded weights have no per-sample "
                "gradient for it"
            )
    return None


def engine_problem(module: nn.Module, mode: str, example: torch.Tensor | None) -> str | None:
    """Why Opacus cannot train `module` in `mode`, naming the layer; None when it can. The static check first
    (unsupported_layer), then, given an example input (two samples), one DP-SGD step on a copy: it catches what
    only running shows, such as a residual `x += shortcut` on a hooked layer's output (timm's ResNets), and
    names the innermost layer whose forward pass failed."""
    problem = unsupported_layer(module, mode)
    if problem or example is None:
        return problem
    probe = copy.deepcopy(module)
    names = {id(m): name for name, m in probe.named_modules()}
    inputs, labels = example[:2], torch.zeros(len(example[:2]), dtype=torch.long, device=example.device)
    try:
        optimizer = torch.optim.SGD(probe.parameters(), lr=0.0)
        loader = DataLoader(TensorDataset(inputs.cpu(), labels.cpu()), batch_size=len(labels))
        _, wrapped, optimizer, criterion, _ = make_private(
            probe, optimizer, loader, noise_multiplier=0.0, max_grad_norm=1.0, accountant="rdp", seed=0,
            grad_sample_mode=mode,
        )  # fmt: skip
        criterion(wrapped(inputs), labels).backward()
        optimizer.step()
    except Exception as err:  # any failure of the engine on this model is the answer
        layer, tb = None, err.__traceback__
        while tb is not None:  # the innermost module of the probe whose code was running
            owner = tb.tb_frame.f_locals.get("self")
            layer = owner if id(owner) in names else layer
            tb = tb.tb_next
        where = f"layer '{names[id(layer)] or 'model'}' ({type(layer).__name__})" if layer is not None else "the model"
        return f"{where}: {' '.join(str(err).split('. ')[0].split())}"
    return None


def choose_grad_sample_mode(module: nn.Module, mode: str, example: torch.Tensor | None = None) -> str:
    """The engine DP-SGD trains `module` with: `mode` when Opacus handles every layer in it, for `auto` the
    fastest that does (ENGINE_PREFERENCE). A layer no engine handles, or the asked engine cannot, is a
    UsageError naming the layer and an engine that works, found before any run trains (engine_problem: with
    an example input, by a trial step)."""
    first = ENGINE_PREFERENCE[0] if mode == "auto" else mode
    problem = engine_problem(module, first, example)
    if problem is None:
        return first
    working = next((m for m in ENGINE_PREFERENCE if m != first and engine_problem(module, m, example) is None), None)
    if working is None:
        raise UsageError(
            f"Opacus cannot train {problem}. No per-sample gradient engine handles it; replace it (BatchNorm by "
            "GroupNorm: opacus.validators.ModuleValidator.fix, which --finetune full applies to backbones)."
        )
    if mode == "auto":
        return working
    raise UsageError(
        f"--grad-sample-mode {mode} cannot train {problem}. Use --grad-sample-mode {working} (or auto), which "
        "handles every layer of this model."
    )


def make_private(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    accountant: str,
    seed: int,
    grad_sample_mode: str = "hooks",
) -> tuple[PrivacyEngine, nn.Module, torch.optim.Optimizer, Callable, DataLoader]:
    """Wrap an ordinary loop for DP-SGD: per-sample clipping at max_grad_norm, Poisson sampling, and the noise
    multiplier that noise_multiplier_for found for the target ε over the planned steps (what Opacus'
    make_private_with_epsilon does, with the search done once, before any run trains). Returns the criterion
    too: ghost clipping's loss runs both of its backward passes in `loss.backward()`, book-keeping's its one pass and
    the clipped sums.

    In a torch.distributed process group (torchrun) the module is wrapped in Opacus' DPDDP, which Opacus
    recognises: each process samples its share of the data at the same Poisson rate, clips its own samples,
    rank 0 alone adds the noise, and the optimizer sums the processes' gradients, so every step is one
    sampled Gaussian mechanism with the same (q, z) as in one process."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        module = DPDDP(module)
    engine = (BookKeepingPrivacyEngine if grad_sample_mode == "bk" else PrivacyEngine)(accountant=accountant)
    device = next(module.parameters()).device  # Opacus draws the noise where the gradients are
    generator = torch.Generator(device=device).manual_seed(seed)
    wrapped = engine.make_private(
        module=module,
        optimizer=optimizer,
        data_loader=loader,
        criterion=nn.CrossEntropyLoss(),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        noise_generator=generator,
        grad_sample_mode="ghost" if grad_sample_mode == "bk" else grad_sample_mode,
    )
    if grad_sample_mode in ("ghost", "bk"):
        module, optimizer, criterion, loader = wrapped
    else:
        (module, optimizer, loader), criterion = wrapped, nn.CrossEntropyLoss()
    if distributed:
        optimizer.reduce_gradients = functools.partial(reduce_in_one_bucket, optimizer)
    return engine, module, optimizer, criterion, loader


def reduce_in_one_bucket(optimizer: torch.optim.Optimizer) -> None:
    """Sum the processes' noisy gradient sums in one all-reduce of all of them flattened, as torch's DDP does
    with its buckets, instead of Opacus' one all-reduce per parameter tensor: the same sum divided the same
    way, but on gloo each call has a fixed cost, and for the cnn's 16 tensors the per-tensor calls took
    26 ms a step against 1.9 ms for one flat call, more than the step's own arithmetic."""
    grads = [p.grad for p in optimizer.params if p.requires_grad]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    if optimizer.loss_reduction == "mean":
        flat /= optimizer.world_size
    for grad, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        grad.copy_(part.view_as(grad))


class WeightNoiseRegularizer:
    """PDP-SGD (arXiv 2409.17144): instead of noising gradients, add to the loss the expected squared change
    of each trainable layer's pre-activations under multiplicative Gaussian weight noise.

    For y = W x with W_ij -> W_ij (1 + ξ_ij), ξ ~ N(0, 1), E[Δy_i²] = Σ_j W_ij² x_j², so the penalty is
    κ · mean over the batch of Σ_ij W_ij² x_j², with κ = (η σ)² for learning rate η and noise scale σ.
    Inputs are captured by forward hooks on every trainable Linear and Conv2d, so the term is computed
    from the layer's actual inputs and has gradients on trainable weights only.
    """

    def __init__(self, model: nn.Module, kappa: float):
        self.kappa = kappa
        self.terms: list[torch.Tensor] = []
        layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.requires_grad]
        if not layers:
            raise ValueError("the regularizer needs at least one trainable Linear or Conv2d layer")
        self.handles = [m.register_forward_hook(self._record) for m in layers]

    def _record(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not torch.is_grad_enabled():
            return
        x2, w2 = inputs[0].pow(2), module.weight.pow(2)
        if isinstance(module, nn.Linear):
            term = F.linear(x2, w2)
        else:
            term = F.conv2d(x2, w2, None, module.stride, module.padding, module.dilation, module.groups)
        self.terms.append(term.flatten(1).sum(1).mean())

    def penalty(self) -> torch.Tensor:
        """κ times the terms recorded since the last call (one forward pass); clears them."""
        total = self.kappa * torch.stack(self.terms).sum()
        self.terms.clear()
        return total

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
