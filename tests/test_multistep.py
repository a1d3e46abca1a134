"""fc-peel on FedAvg weight updates (attacks/multistep.py): exact where the batch separates, and never a false
certificate where it does not."""

import torch

from attacks.multistep import WeightUpdate, in_box, read_weight_update, readouts
from data_sources import load_dataset
from defenses import ClientSetup, MechanismSpec, client_update
from models import create_model


def weight_update(model_name: str, samples: int, epochs: int, batch_size: int, seed: int = 0):
    split = load_dataset("digits")
    order = torch.randperm(len(split.x_train), generator=torch.Generator().manual_seed(seed))[:samples]
    x, y = split.x_train[order], split.y_train[order]
    torch.manual_seed(seed)
    model = create_model(model_name, split.input_shape, split.num_classes)
    update = client_update(
        model, x, y, MechanismSpec("none", None), ClientSetup(lr=0.05, seed=seed), epochs=epochs, batch_size=batch_size
    )
    return model, update, x.flatten(1), y, split


def certified_errors(readout, x: torch.Tensor) -> torch.Tensor:
    """Each certified readout's distance (max abs pixel) to the nearest private image."""
    return torch.cdist(readout.inputs[: readout.exact], x, p=float("inf")).min(1).values


def test_separable_multistep_update_read_exactly():
    # 6 digits, 3 epochs of 3 batches of 2: 9 steps, the wide layer holds every digit on neurons of its own
    model, update, x, y, split = weight_update("fcnn", 6, 3, 2)
    assert update.local_steps == 9
    readout = read_weight_update(model, update, split.input_shape, split.num_classes, 0)
    assert readout.exact == 6
    assert certified_errors(readout, x).max() < 1e-4
    matched = torch.cdist(x, readout.inputs[:6], p=float("inf")).argmin(1)
    assert sorted(matched.tolist()) == list(range(6))  # every digit once
    assert (readout.labels[matched] == y).float().mean() >= 0.5  # the returned model after 9 steps; chance 0.1


def test_dimitrov_setting_certifies_nothing_false():
    # Dimitrov et al.'s setting: 50 digits behind 10 epochs x 10 batches of 5 (100 steps), the update computed from
    # the float32 weights the client returns: the wide fcnn certifies some digits, each exact to the weights'
    # rounding; the narrow mlp (64 neurons) mixes the digits on every neuron: nothing certified falsely
    model, update, x, _, split = weight_update("fcnn", 50, 10, 5, seed=1)
    readout = read_weight_update(model, update, split.input_shape, split.num_classes, 1)
    assert readout.exact > 0
    assert (certified_errors(readout, x) < 1e-4).all()
    # the data range sorts the raw reads: every read of one digit lies in [0, 1], most mixtures' do not
    reads = readouts(WeightUpdate(model, update))
    exact = torch.cdist(reads[:, :-1].float(), x, p=float("inf")).min(1).values < 1e-3
    assert exact.sum() >= 5 and in_box(reads[exact], True).all()
    assert in_box(reads[~exact], True).float().mean() < 0.3
    assert in_box(reads[~exact], False).all()  # features have no range
    model, update, x, _, split = weight_update("mlp", 50, 10, 5, seed=1)
    readout = read_weight_update(model, update, split.input_shape, split.num_classes, 1)
    assert readout.exact < 50
    assert (certified_errors(readout, x) < 1e-4).all()


def test_secure_aggregation_sum_of_unequal_clients_read_as_one_update():
    # two clients of 4 and 2 digits, 2 epochs in batches of 2 each: the server sees only the sum of their updates
    split = load_dataset("digits")
    x, y = split.x_train[:6], split.y_train[:6]
    torch.manual_seed(0)
    model = create_model("fcnn", split.input_shape, split.num_classes)
    secagg = MechanismSpec("secagg", 2.0)
    update = client_update(
        model, x[:4], y[:4], secagg, ClientSetup(lr=0.05), others=[(x[4:], y[4:])], epochs=2, batch_size=2
    )
    assert update.num_clients == 2 and update.local_steps == 4
    readout = read_weight_update(model, update, split.input_shape, split.num_classes, 0)
    assert readout.exact == 6
    assert (certified_errors(readout, x.flatten(1)) < 1e-4).all()
