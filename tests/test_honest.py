"""The honest server's analytic readout: the first fully connected layer gives its input away exactly for one
sample (the image for an MLP, the features for a CNN or a frozen backbone's head), modelling the defense it
knows; the attacks never import the evaluation side; the ε of one attacked release is the accountant's."""

from __future__ import annotations

import ast
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import norm

from attacks import ATTACKS
from attacks.honest import mixing_columns
from attacks.labels import recover_labels
from attacks.layerwise import last_convolution, recover_conv_input, smoothed_front
from attacks.readout import (
    _explained_in_turn,
    layer_inputs,
    preactivation_grads,
    rank_one_readout,
    readout_gradients,
    readout_inputs,
)
from data_sources import load_dataset
from defenses import ClientSetup, MechanismSpec, client_update
from metrics import count_accuracy
from models import MLP, create_model
from privacy import epsilon_spent, release_epsilon

ROOT = Path(__file__).resolve().parents[1]
CFG = SimpleNamespace(seed=0, inversion_steps=3, inversion_gradient_weight=0.1, inversion_restarts=2, log_every=1)


def lone_update(model, image, label, mechanism="none", strength=None, **setup):
    return client_update(model, image, label, MechanismSpec(mechanism, strength), ClientSetup(**setup))


@pytest.mark.parametrize("architecture, dataset", [("fcnn", "digits"), ("mlp", "breast-cancer"), ("cnn", "faces")])
def test_the_first_fc_layer_gives_a_lone_samples_input_exactly(architecture, dataset):
    split = load_dataset(dataset)
    torch.manual_seed(0)
    model = create_model(architecture, split.input_shape, split.num_classes)
    x, y = split.x_train[5:6], split.y_train[5:6]
    rec = ATTACKS["fc-readout"].run(model, lone_update(model, x, y), split.input_shape, split.num_classes, CFG, print)
    read = rec.images.flatten(1) if rec.features is None else rec.features  # pixels for an MLP, else features
    assert (read - layer_inputs(model, x)).abs().max() < 1e-4
    assert rec.labels.tolist() == y.tolist() and rec.exact == 1


@pytest.mark.parametrize("backbone", ["resnet50", "dinov2"])
def test_a_frozen_backbones_head_gives_the_features_exactly(backbone):
    """Random weights (offline): the head's gradient gives the backbone features of the image exactly, and
    the backbone, frozen but differentiable, lets the inversion move the image."""
    split = load_dataset("faces")
    torch.manual_seed(0)
    model = create_model(backbone, split.input_shape, split.num_classes, pretrained=False)
    x, y = split.x_train[:1], split.y_train[:1]
    logged = []
    rec = ATTACKS["fc-readout"].run(
        model, lone_update(model, x, y), split.input_shape, split.num_classes, CFG, lambda *a: logged.append(a)
    )
    true = model.features(x).detach()
    assert torch.nn.functional.cosine_similarity(rec.features, true).item() > 0.9999
    assert not torch.equal(logged[0][1], logged[-1][1])  # the images moved: a gradient reached them


def test_the_readout_models_the_regularized_loss():
    """Under PDP-SGD's penalty the weight gradient is b x^T + 2 kappa W x^2: the naive ratio is off, the
    readout that adds the known penalty is exact."""
    split = load_dataset("digits")
    torch.manual_seed(0)
    model = create_model("fcnn", split.input_shape, split.num_classes)
    x, y = split.x_train[:1], split.y_train[:1]
    update = lone_update(model, x, y, "regularized", kappa=1e-3)
    grad_w, grad_b = readout_gradients(model, update)
    naive = rank_one_readout(grad_w, grad_b)
    adaptive = rank_one_readout(grad_w, grad_b, model.fc.weight.detach(), update.kappa)
    assert (adaptive - x.flatten()).abs().max() < 1e-4 < (naive - x.flatten()).abs().max()


def test_the_readout_fits_only_the_shared_entries_of_a_pruned_update():
    split = load_dataset("digits")
    torch.manual_seed(0)
    model = create_model("fcnn", split.input_shape, split.num_classes)
    x, y = split.x_train[:1], split.y_train[:1]
    rec = ATTACKS["fc-readout"].run(model, lone_update(model, x, y, "prune", 0.5), split.input_shape, 10, CFG, print)
    assert (rec.images.flatten() - x.flatten()).abs().max() < 1e-4


def test_the_attacks_never_import_the_evaluation_side():
    """`auto` and every attack choose with what the server has: no module under attacks/ imports the scoring,
    the evaluation or the study that holds the private batch."""
    evaluation = {"metrics", "evaluation", "leakage", "gradient_attack", "config"}
    for path in (ROOT / "attacks").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        runtime = imported - {"config"} if "TYPE_CHECKING" in path.read_text() else imported  # type hints only
        assert not runtime & evaluation, f"{path.name} imports {runtime & evaluation}"


@pytest.mark.parametrize("z", [0.6, 1.3, 3.0])
def test_a_releases_epsilon_is_the_accountants_for_one_gaussian_step(z):
    """The ε of one clipped, noised release: Opacus' accountant for one step at rate 1, and at that ε the
    Gaussian mechanism's exact privacy profile (Balle & Wang 2018) gives a δ just at the target."""
    eps = release_epsilon(z, 1e-5)
    assert eps == pytest.approx(epsilon_spent(z, 1.0, 1, 1e-5, "prv"))
    delta = norm.cdf(-eps * z + 1 / (2 * z)) - math.exp(eps) * norm.cdf(-eps * z - 1 / (2 * z))
    assert 0.8e-5 < delta <= 1e-5


def test_the_last_convolutions_input_comes_back_exactly_for_one_sample():
    """The cnn's conv3 has 64 channels over 6 x 6 positions: its input is the null vector of one linear map,
    scaled to the exact features; under a defense the features are not explained and the step declines."""
    split = load_dataset("faces")
    torch.manual_seed(0)
    model = create_model("cnn", split.input_shape, split.num_classes)
    x, y = split.x_train[7:8], split.y_train[7:8]
    conv = last_convolution(model)
    true = readout_inputs(model, x, conv).detach()
    features = layer_inputs(model, x)
    recovered = recover_conv_input(model, lone_update(model, x, y), features, split.input_shape)
    assert conv is model.features[8] and (recovered - true).norm() / true.norm() < 1e-4
    noisy = lone_update(model, x, y, "noise", 1e-3)
    assert recover_conv_input(model, noisy, features, split.input_shape) is None
    two = client_update(model, split.x_train[:2], split.y_train[:2], MechanismSpec("none", None), ClientSetup())
    assert recover_conv_input(model, two, features, split.input_shape) is None  # a batch: no such step


def test_the_smoothed_front_becomes_the_exact_network_at_temperature_zero():
    split = load_dataset("faces")
    torch.manual_seed(0)
    model = create_model("cnn", split.input_shape, split.num_classes)
    smooth, conv, temperature = smoothed_front(model, last_convolution(model))
    x = split.x_train[:3]
    exact = readout_inputs(model, x, last_convolution(model))
    assert torch.equal(readout_inputs(smooth, x, conv), exact)  # tau None: ReLU and max-pool themselves
    temperature.tau = 1e-4
    assert torch.allclose(readout_inputs(smooth, x, conv), exact, atol=1e-3)
    temperature.tau = 0.3
    assert not torch.allclose(readout_inputs(smooth, x, conv), exact, atol=1e-2)


# --- whole batches from an honest layer: fc-peel, cpa, label counts (issue #14) ---------------------------


def separable_model_and_batch():
    """A tiny MLP whose hidden neuron i (i < 6) fires iff input coordinate i exceeds 0.5, and six samples: four
    alone on their own neuron (coordinates 2-5), two (0 and 1) sharing neuron 0 and no other; the rest of the
    neurons never fire. Coordinates 6 and 7 make every sample distinct."""
    torch.manual_seed(0)
    model = MLP((8,), 3, hidden=16)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.fill_(-1.0)
        model.fc.weight[:6, :6] = 10 * torch.eye(6)
        model.fc.bias[:6] = -5.0
    x = torch.zeros(6, 8)
    x[[0, 1, 2, 3, 4, 5], [0, 0, 2, 3, 4, 5]] = 1.0
    x[:, 6:] = torch.rand(6, 2, generator=torch.Generator().manual_seed(1))
    return model, x, torch.tensor([0, 1, 2, 0, 1, 2])


def test_fc_peel_reads_the_separable_samples_exactly_and_reports_the_collision_apart():
    model, x, y = separable_model_and_batch()
    update = client_update(model, x, y, MechanismSpec("none", None), ClientSetup())
    rec = ATTACKS["fc-peel"].run(model, update, (8,), 3, CFG, lambda *a: None)
    assert rec.exact == 4 and rec.collisions >= 1  # samples 0 and 1 share their only neuron: a collision
    distance = torch.cdist(rec.images[: rec.exact], x, p=float("inf"))
    assert distance.amin(1).max() < 1e-4 and sorted(distance.argmin(1).tolist()) == [2, 3, 4, 5]
    assert rec.labels[: rec.exact].tolist() == y[distance.argmin(1)].tolist()
    shared = torch.cdist(rec.images[rec.exact :], x[:2], p=float("inf"))
    assert shared.min() > 1e-2  # the mixture is neither sample, and is not counted as one


@pytest.mark.parametrize("duplicate_first", [False, True])
def test_a_second_imprecise_readout_of_a_sample_is_not_certified_and_keeps_no_sample_out(duplicate_first):
    """Sample A fires neurons 2 and 6, sample B neuron 3. Neuron 6 reads A' = A + 0.016 on a firing coordinate
    (as rounding left over from peeling did at digits B = 128), a lone-looking readout that passes the
    single-sample check, farther from A than distinct images can be from each other (faces: 0.013), which
    merging by distance kept as a second sample. Once one of A and A' is taken and peeled, the other's
    readout is A's gradient, so it is not taken; B still is."""
    model, x, y = separable_model_and_batch()
    with torch.no_grad():
        model.fc.weight[6, 2], model.fc.bias[6] = 10.0, -5.0  # neuron 6 fires with neuron 2
    a, b = x[2], x[3]
    a_read_again = a.clone()
    a_read_again[2] += 0.016
    candidates = torch.stack([a, a_read_again, b])
    labels = y[[2, 2, 3]]
    g = preactivation_grads(model, candidates, labels, (8,)).double()
    db = g[0] + g[2]
    db[6] = g[1, 6]  # neuron 6 reads exactly as a lone A' would (what passed the check)
    rows = torch.tensor([2, 6, 3])
    rank = torch.tensor([-2.0, -3.0, -1.0]) if duplicate_first else torch.tensor([-3.0, -2.0, -1.0])
    taken = _explained_in_turn(model, torch.eye(16).double(), db, torch.zeros(16).double(), candidates, labels, rows,
                               rank, (8,))  # fmt: skip
    assert len(taken) == 2 and taken[-1] == 2  # one readout of A (the better-ranked) and B
    assert taken[0] == (1 if duplicate_first else 0)


def test_fc_peel_recovers_a_batch_from_the_update_alone():
    """The batch is wiped after the client computed its update: the attack still reads all of it, exactly,
    so nothing but the update (and the model) reached it."""
    split = load_dataset("digits")
    torch.manual_seed(0)
    model = create_model("fcnn", split.input_shape, split.num_classes)
    x, y = split.x_train[:8].clone(), split.y_train[:8].clone()
    kept = x.clone()
    update = client_update(model, x, y, MechanismSpec("none", None), ClientSetup())
    x.zero_()
    y.zero_()
    rec = ATTACKS["fc-peel"].run(model, update, split.input_shape, split.num_classes, CFG, lambda *a: None)
    assert rec.exact == 8
    assert torch.cdist(rec.images.flatten(1), kept.flatten(1), p=float("inf")).amin(0).max() < 1e-4


def test_fastica_unmixes_known_sources_mixed_by_a_known_matrix():
    """The wiring of the cocktail-party attack: rows (neurons) mixing independent sources (samples) give back
    the mixing matrix's columns up to order, sign and scale."""
    gen = torch.Generator().manual_seed(0)
    sources = torch.distributions.Laplace(0.0, 1.0).sample((2000, 4)).double()
    mixing = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    columns = mixing_columns(mixing @ sources.T, 4, seed=0)
    cosine = torch.nn.functional.normalize(columns, dim=1) @ torch.nn.functional.normalize(mixing.T, dim=1).T
    assert (cosine.abs().amax(0) > 0.99).all() and (cosine.abs().amax(1) > 0.99).all()


def test_label_counts_are_exact_for_distinct_labels_at_initialisation():
    split = load_dataset("digits")
    torch.manual_seed(0)
    model = create_model("fcnn", split.input_shape, split.num_classes)
    pick = torch.stack([(split.y_train == c).nonzero()[0, 0] for c in range(10)])
    x, y = split.x_train[pick], split.y_train[pick]
    update = client_update(model, x, y, MechanismSpec("none", None), ClientSetup())
    assert recover_labels(model, update, split.input_shape, 10).tolist() == list(range(10))
    read = layer_inputs(model, x[:3])  # with some samples read, p̄ is theirs: still exact
    assert recover_labels(model, update, split.input_shape, 10, read=read).tolist() == list(range(10))
    assert count_accuracy(recover_labels(model, update, split.input_shape, 10), y, 10) == 1.0


def test_complement_readouts_are_certified_one_by_one_when_part_of_the_batch_stays_unread():
    """Six neurons every sample fires (T comes out of them) and, for samples 0-2, a neuron that all samples
    but that one fire: the complements read those three exactly. Samples 3 and 4 fire the same neurons, so
    nothing isolates them, from either side. The three read are certified, without the two that are not."""
    torch.manual_seed(0)
    model = MLP((8,), 3, hidden=16)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.fill_(-5.0)  # neurons 9-15: silent
        model.fc.bias[:6] = 1.0  # neurons 0-5: always on
        for k in range(3):  # neuron 6 + k: silent for sample k only
            model.fc.weight[6 + k, k], model.fc.bias[6 + k] = -10.0, 5.0
    x = torch.zeros(5, 8)
    x[[0, 1, 2], [0, 1, 2]] = 1.0
    x[:, 3:] = torch.rand(5, 5, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1])
    update = client_update(model, x, y, MechanismSpec("none", None), ClientSetup())
    rec = ATTACKS["fc-peel"].run(model, update, (8,), 3, CFG, lambda *a: None)
    distance = torch.cdist(rec.images[: rec.exact], x, p=float("inf"))
    assert rec.exact == 3 and sorted(distance.argmin(1).tolist()) == [0, 1, 2]
    assert distance.amin(1).max() < 1e-4
    assert rec.labels[: rec.exact].tolist() == y[distance.argmin(1)].tolist()


def test_label_counts_of_a_model_sure_of_its_batch_take_one_over_c_for_the_samples_not_read():
    """A model sure of every sample's class (logits 30 x + (10, 0, 0), samples one-hot times 1 to 1.5): the
    batch's gradient is ~0, so only the estimate of the unread samples' predictions counts. Random inputs
    fall in class 0 more often than not (the model's predictions depend on the input), and would put four
    samples there; 1/C spreads the six two per class, as they are."""
    torch.manual_seed(0)
    model = MLP((3,), 3, hidden=3)
    with torch.no_grad():
        model.fc.weight.copy_(torch.eye(3))
        model.fc.bias.zero_()
        model.classifier.weight.copy_(30 * torch.eye(3))
        model.classifier.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    x = torch.eye(3)[y] * torch.rand(6, 1, generator=torch.Generator().manual_seed(3)).add(0.5)
    update = client_update(model, x, y, MechanismSpec("none", None), ClientSetup())
    assert count_accuracy(recover_labels(model, update, (3,), 6), y, 3) == 1.0
