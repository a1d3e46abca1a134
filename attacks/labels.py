"""Label recovery from the last layer's gradient, before any image is reconstructed.

For softmax cross-entropy averaged over a batch of B samples, the classifier's bias gradient is
g_c = mean_i p_ic - n_c / B, with p the predicted probabilities and n_c how many samples carry label c.
For one sample only the true class has g_c < 0 (iDLG, Zhao et al. 2020). For a batch we count
n_c = B (p̄_c - g_c) (iLRG, Ma et al. ICLR 2023): the counts are exact once the batch's mean prediction p̄ is,
and p̄ is known exactly where the samples' inputs to the last layers are (iLRG recovers them at initialisation;
here the exact readouts of fc-peel give them). Samples the server has not read are estimated by the model's mean
prediction on uniform random inputs where its predictions hardly depend on the input (at initialisation, the
case iLRG's estimate rests on), else by 1/C per class: a trained model predicts noise confidently, and fits its
samples so well that their gradient (their error p - y) carries almost nothing of their labels, which only
reading the samples themselves gives back (a trained fcnn, digits, B = 128: 0.17 of the counts right with the
random inputs' mean, 0.89 with 1/C).
Without a bias, the weight rows play its role: their sums are g_c times the (non-negative) activations.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from defenses import SharedUpdate, trainable_parameters

INPUT_DEPENDENCE = 0.03  # largest per-class std of the predictions on random inputs below which their mean
# stands for any sample's: 0.006-0.026 at initialisation (fcnn on digits, cnn on faces, LeNet), 0.04-0.065 after
# training (fcnn and cnn); an untrained fcnn on faces (0.039) falls on the 1/C side, which is its own mean ~1/C


def last_layer_gradients(model: nn.Module, gradients: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The per-class gradient signal of the model's last Linear layer: its bias gradient, or, without a
    bias, the row sums of its weight gradient."""
    params = trainable_parameters(model)
    last = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad][-1]
    index = {id(p): i for i, p in enumerate(params)}
    if last.bias is not None:
        return gradients[index[id(last.bias)]]
    return gradients[index[id(last.weight)]].sum(1)


@torch.no_grad()
def random_predictions(
    model: nn.Module, input_shape: tuple[int, ...], samples: int = 64, seed: int = 0
) -> torch.Tensor:
    """The model's softmax on `samples` uniform random inputs."""
    device = next(model.parameters()).device
    x = torch.rand((samples, *input_shape), generator=torch.Generator().manual_seed(seed)).to(device)
    return model(x).softmax(1)


def mean_prediction(model: nn.Module, input_shape: tuple[int, ...], samples: int = 64, seed: int = 0) -> torch.Tensor:
    """The model's average softmax over uniform random inputs: an estimate of p̄ that needs no data."""
    return random_predictions(model, input_shape, samples, seed).mean(0)


@torch.no_grad()
def batch_mean_prediction(
    model: nn.Module, input_shape: tuple[int, ...], count: int, read: torch.Tensor | None, seed: int
) -> torch.Tensor:
    """p̄ of a batch of `count`: exact for the `read` samples (their readout-layer inputs); for the others the
    mean prediction on random inputs where predictions hardly depend on the input, else 1/C."""
    noise = random_predictions(model, input_shape, seed=seed).cpu().double()
    unread = noise.mean(0) if noise.std(0).max() < INPUT_DEPENDENCE else torch.full_like(noise[0], 1 / noise.shape[1])
    if read is None or not len(read):
        return unread
    from attacks.readout import forward_from_layer

    device = next(model.parameters()).device
    known = forward_from_layer(model, read[:count].to(device), input_shape)[0].softmax(1).cpu().double()
    return (known.sum(0) + (count - len(known)) * unread) / count


def recover_labels(
    model: nn.Module,
    update: SharedUpdate,
    input_shape: tuple[int, ...],
    count: int,
    seed: int = 0,
    read: torch.Tensor | None = None,
) -> torch.Tensor:
    """`count` labels (sorted) behind the update. One sample: iDLG. More: every class with a negative
    gradient holds at least one sample, and the rest go to the largest remaining B (p̄_c - g_c), with p̄
    from the samples already `read` (their inputs to the readout layer) where there are any."""
    grads = tuple(g / update.num_clients for g in update.gradients)
    signal = last_layer_gradients(model, grads).detach().cpu().double()
    if count == 1:
        return torch.tensor([int(signal.argmin())])
    estimate = count * (batch_mean_prediction(model, input_shape, count, read, seed) - signal)
    counts = torch.zeros_like(signal, dtype=torch.long)
    for c in torch.argsort(signal)[:count]:
        if signal[c] < 0:
            counts[c] = 1
    while counts.sum() < count:
        c = int(torch.argmax(estimate - counts))
        counts[c] += 1
    return torch.repeat_interleave(torch.arange(len(signal)), counts)
