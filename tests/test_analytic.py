"""Malicious-server attacks (attacks/malicious.py): exact readouts, collisions, DP, disjoint aux data, no NaN."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gradient_attack
import utils
from attacks import inversion, malicious
from attacks.readout import layer_inputs, readout_images, reads_pixels
from config import AttackConfig
from data_sources import DataOptions, load_dataset
from defenses import ClientSetup, MechanismSpec, client_update
from metrics import reconstruction_scores
from models import CNN, MLP, create_model


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", DataOptions())


def _attack(sent, images, labels, num_classes, setup=None, mechanism="none"):
    update = client_update(sent, images, labels, MechanismSpec(mechanism, None), setup or ClientSetup())
    readout = malicious.read_sent(sent, update, tuple(images.shape[1:]), num_classes)
    recs, rec_labels = readout_images(readout, len(images), tuple(images.shape[1:]))
    return readout, recs, rec_labels


def _matched_error(originals, recs):
    order = torch.as_tensor(reconstruction_scores(originals, recs)["order"])
    return (recs[order] - originals).abs().flatten(1).amax(1)


def test_giavmp_recovers_a_batch_exactly(digits, tmp_path):
    torch.manual_seed(0)
    model = MLP(digits.input_shape, digits.num_classes, hidden=256)
    sent = malicious.giavmp_model(model, digits.x_train, batch_size=8, per_sample=4, seed=0, cache_dir=tmp_path)
    images, labels = digits.x_test[:8], digits.y_test[:8]
    readout, recs, rec_labels = _attack(sent, images, labels, digits.num_classes)
    assert readout.exact == 8
    assert _matched_error(images, recs).max() < 1e-4
    order = torch.as_tensor(reconstruction_scores(images, recs)["order"])
    assert torch.equal(rec_labels[order], labels)  # each exact readout also names its label
    assert readout.unexplained < 1e-4


def test_giavmp_layer_is_fitted_on_aux_data_only_and_cached(digits, tmp_path):
    model = MLP(digits.input_shape, digits.num_classes, hidden=64)
    aux, victim = digits.x_train, digits.x_test
    assert not (torch.cdist(victim.flatten(1), aux.flatten(1)).amin(1) == 0).any()  # the splits are disjoint
    first = malicious.giavmp_model(model, aux, 8, 2, 0, tmp_path)
    assert len(list(tmp_path.glob("giavmp-*.safetensors"))) == 1
    again = malicious.giavmp_model(model, aux, 8, 2, 0, tmp_path)  # read back from the cache
    assert torch.equal(malicious.trap_layer(first).weight, malicious.trap_layer(again).weight)
    # The fit sees only its inputs: adding the victim's images would change it (and the cache key).
    other = malicious.giavmp_model(model, torch.cat([aux, victim]), 8, 2, 0, tmp_path)
    assert len(list(tmp_path.glob("giavmp-*.safetensors"))) == 2
    assert not torch.equal(malicious.trap_layer(first).bias, malicious.trap_layer(other).bias)
    # Each neuron fires for r/B of the auxiliary samples, r in FIRING_RATES: mostly 1/B, the rate that
    # maximises lone activations.
    fires = (layer_inputs(first, aux) @ malicious.trap_layer(first).weight.T + malicious.trap_layer(first).bias) > 0
    rates = fires.float().mean(0) * 8
    assert all(min(abs(r - allowed) for allowed in malicious.FIRING_RATES) < 0.05 for r in rates.tolist())
    assert (rates - 1).abs().lt(0.05).float().mean() > 0.3


def _bins(sent, images):
    """The bin of each image in each statistic (columns): how many of that group's neurons it fires, minus one."""
    with torch.no_grad():
        fired = sent.imprint.linear0(images.flatten(1)) > 0
    return torch.stack([group.sum(1) - 1 for group in fired.split(sent.imprint.groups, dim=1)], 1).squeeze(1)


def test_rtf_recovers_samples_alone_in_their_bins(digits):
    torch.manual_seed(0)
    model = create_model("lenet", digits.input_shape, digits.num_classes)
    sent = malicious.rtf_model(model, digits.x_train, bins=64, measurement="random", seed=0)
    bins = _bins(sent, digits.x_test)
    _, first = np.unique(bins.numpy(), return_index=True)
    pick = torch.as_tensor(first[:12])  # twelve samples in twelve different bins
    readout, recs, _ = _attack(sent, digits.x_test[pick], digits.y_test[pick], digits.num_classes)
    assert readout.exact == 12 and readout.collisions == 0
    assert _matched_error(digits.x_test[pick], recs).max() < 1e-4


def test_rtf_reads_a_trained_models_confident_samples_as_lone_samples(digits):
    """On a trained model a confident sample's gradient is tiny, and its bin (a difference of two sums over
    many samples) carries float32 rounding up to ~1e-2 of it: the check allows for that rounding, so all
    24 samples in distinct bins count as exact (a fixed 2e-5 tolerance called 4 of them collisions)."""
    torch.manual_seed(0)
    honest = malicious.honest_training(create_model("fcnn", digits.input_shape, digits.num_classes), digits, 3, 0)
    sent = malicious.rtf_model(honest, digits.x_train, bins=64, measurement="random", seed=0)
    _, first = np.unique(_bins(sent, digits.x_test).numpy(), return_index=True)
    pick = torch.as_tensor(first[:24])
    readout, recs, _ = _attack(sent, digits.x_test[pick], digits.y_test[pick], digits.num_classes)
    assert readout.exact == 24 and readout.collisions == 0
    assert _matched_error(digits.x_test[pick], recs).max() < 1e-3  # > 60 dB


def test_rtf_reports_collisions_and_does_not_count_them(digits):
    torch.manual_seed(0)
    model = create_model("lenet", digits.input_shape, digits.num_classes)
    sent = malicious.rtf_model(model, digits.x_train, bins=32, measurement="random", seed=1)
    bins = _bins(sent, digits.x_test).numpy()
    values, first, counts = np.unique(bins, return_index=True, return_counts=True)
    shared = int(values[counts >= 2][0])
    pair = np.flatnonzero(bins == shared)[:2]  # two samples in one bin
    alone = [i for v, i in zip(values, first, strict=True) if v != shared][:6]
    pick = torch.as_tensor([*pair, *alone])
    images = digits.x_test[pick]
    readout, recs, _ = _attack(sent, images, digits.y_test[pick], digits.num_classes)
    assert readout.exact == 6 and readout.collisions == 1
    psnr = np.array(reconstruction_scores(images, recs)["psnr"])
    assert (psnr[2:] > 60).all() and (psnr[:2] < 30).all()  # the pair is not counted as recovered


def test_dp_noise_destroys_the_readout(digits, tmp_path):
    torch.manual_seed(0)
    model = MLP(digits.input_shape, digits.num_classes, hidden=128)
    sent = malicious.giavmp_model(model, digits.x_train, batch_size=8, per_sample=4, seed=0, cache_dir=tmp_path)
    images, labels = digits.x_test[:8], digits.y_test[:8]
    setup = ClientSetup(max_grad_norm=1.0, noise_multiplier=1.0)
    readout, recs, _ = _attack(sent, images, labels, digits.num_classes, setup, mechanism="dp-sgd")
    assert readout.exact == 0
    assert np.mean(reconstruction_scores(images, recs)["psnr"]) < 20


def test_rtf_peeling_recovers_a_sample_that_is_alone_nowhere(digits):
    """Two statistics: b shares its first-statistic bin with a and its second-statistic bin with c, so no
    readout holds b alone; a and c are read first, subtracted, and b is then read exactly."""
    torch.manual_seed(0)
    model = create_model("fcnn", digits.input_shape, digits.num_classes)
    sent = malicious.rtf_model(model, digits.x_train, bins=64, measurement="random", seed=0, measurements=2)
    assert sent.imprint.groups == [32, 32]
    bins = _bins(sent, digits.x_test).tolist()
    a, b, c = next(
        (a, b, c)
        for a in range(len(bins))
        for b in range(len(bins))
        for c in range(len(bins))
        if len({a, b, c}) == 3 and bins[a][0] == bins[b][0] != bins[c][0] and bins[b][1] == bins[c][1] != bins[a][1]
    )
    pick = torch.as_tensor([a, b, c])
    readout, recs, _ = _attack(sent, digits.x_test[pick], digits.y_test[pick], digits.num_classes)
    assert readout.exact == 3 and readout.collisions == 0
    assert _matched_error(digits.x_test[pick], recs).max() < 1e-4


def test_the_imprint_design_beats_uniform_binning(digits):
    """The simulation agrees with (1 - 1/K)^(B - 1) for one statistic; the chosen design (two statistics for
    K = 128 and B <= K) recovers at least that share of real batches, and the statistics are uncorrelated."""
    assert abs(malicious.simulated_recovery(64, [64], draws=2000) - (1 - 1 / 64) ** 63) < 0.015
    assert malicious.best_measurement_count(128, [16, 32, 64, 128]) == 2
    assert malicious.best_measurement_count(32, [128]) == 1  # B >> K: splitting the bins only costs
    directions = malicious.measurement_directions(digits.x_train.flatten(1), 3, "random", seed=0)
    assert np.abs(np.corrcoef((digits.x_train.flatten(1) @ directions.T).T.numpy())[np.triu_indices(3, 1)]).max() < 1e-5
    model = create_model("fcnn", digits.input_shape, digits.num_classes)
    sent = malicious.rtf_model(model, digits.x_train, bins=128, measurement="random", seed=0, measurements=2)
    recovered = []
    for seed in range(3):
        pick = torch.randperm(len(digits.x_test), generator=torch.Generator().manual_seed(seed))[:32]
        _, recs, _ = _attack(sent, digits.x_test[pick], digits.y_test[pick], digits.num_classes)
        recovered.append(np.mean(np.array(reconstruction_scores(digits.x_test[pick], recs)["psnr"]) >= 30))
    assert np.mean(recovered) >= (1 - 1 / 128) ** 31


@pytest.mark.parametrize("name", ["fcnn", "cnn", "lenet"])
def test_imprint_keeps_the_victims_training_step_finite(digits, name):
    torch.manual_seed(0)
    model = create_model(name, digits.input_shape, digits.num_classes)
    sent = malicious.rtf_model(model, digits.x_train, bins=128, measurement="brightness", seed=0)
    with torch.no_grad():  # the block shifts pixels by at most 0.1, so the model behind it still sees the images
        assert (sent.imprint(digits.x_train) - digits.x_train).abs().max().item() <= 0.1 + 1e-5
    optimizer = torch.optim.SGD(sent.parameters(), lr=0.1)
    for step in range(5):
        x, y = digits.x_test[step * 32 : (step + 1) * 32], digits.y_test[step * 32 : (step + 1) * 32]
        loss = F.cross_entropy(sent(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in sent.parameters())


def test_detector_flags_a_poisoned_trained_model(digits, tmp_path):
    torch.manual_seed(0)
    model = MLP(digits.input_shape, digits.num_classes, hidden=64)
    aux = dataclasses.replace(digits, x_train=digits.x_train[:800], y_train=digits.y_train[:800])
    honest = malicious.honest_training(model, aux, epochs=1, seed=0)
    assert honest is not model  # the victim's own model is left as it was
    sent = malicious.giavmp_model(honest, digits.x_train, batch_size=16, per_sample=2, seed=0, cache_dir=tmp_path)
    verdict = malicious.detect_poisoning(honest, sent, digits.x_test, digits.y_test)
    assert verdict["honest_accuracy"] > 0.8 and verdict["received_accuracy"] < 0.5 and verdict["poisoning_detected"]
    assert not malicious.detect_poisoning(honest, honest, digits.x_test, digits.y_test)["poisoning_detected"]


def test_giavmp_on_a_cnn_reads_features_exactly_and_inverts_them(digits, tmp_path):
    torch.manual_seed(0)
    model = CNN(digits.input_shape, digits.num_classes, hidden=256)
    sent = malicious.giavmp_model(model, digits.x_train[:600], batch_size=2, per_sample=2, seed=0, cache_dir=tmp_path)
    images, labels = digits.x_test[:2], digits.y_test[:2]
    update = client_update(sent, images, labels, MechanismSpec("none", None), ClientSetup())
    readout = malicious.read_sent(sent, update, digits.input_shape, digits.num_classes)
    features = layer_inputs(sent, images)
    assert not reads_pixels(sent, digits.input_shape) and readout.exact == 2
    assert torch.cdist(readout.inputs[:2], features).amin(1).max() < 1e-4 * features.abs().max()
    # The gradient-matching term vanishes at the private batch (in any order) and not at random images.
    error = inversion.conv_gradient_error(sent, readout.inputs[:2], readout.labels[:2], digits.input_shape, update)
    assert error(images.flip(0)).item() < 1e-6 and error(torch.rand_like(images)).item() > 0.1
    cfg = AttackConfig(inversion_steps=80, log_every=40)
    logged = []
    rec = malicious.run_malicious(
        sent, update, digits.input_shape, digits.num_classes, cfg, lambda *a: logged.append(a)
    )
    assert [entry[0] for entry in logged] == [0, 40, 80]
    ssim = np.mean(reconstruction_scores(images, rec.images)["ssim"])
    noise = np.mean(reconstruction_scores(images, torch.rand_like(images))["ssim"])
    assert ssim > 0.5 and noise < 0.1 and rec.loss < 0.05  # clearly the digits, and the features match


def test_the_study_reports_the_clients_poisoning_check(tmp_path):
    """gradient_attack.py with giavmp and rtf: the honest model is trained first, the received model's
    accuracy and the detector's verdict land in metrics.json and the summary row, and the recovered
    fractions at 20/30/40 dB in metrics.json."""
    out = tmp_path / "attack"
    args = ["--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--model", "mlp", "--attacks", "giavmp", "rtf",
            "--mechanisms", "none", "--batch-sizes", "4", "--num-images", "4", "--honest-epochs", "1"]  # fmt: skip
    gradient_attack.main(args)
    rows = {r["attack"]: r for r in utils.read_csv(out / "summary.csv")}
    giavmp = utils.read_json(out / rows["giavmp"]["run"] / "metrics.json")
    assert giavmp["honest_accuracy"] > 0.8 and giavmp["received_accuracy"] < 0.5 and giavmp["poisoning_detected"]
    assert rows["giavmp"]["poisoning_detected"] == "True" and float(rows["giavmp"]["recovered_fraction"]) == 1.0
    assert giavmp["recovered_fraction_20db"] >= giavmp["recovered_fraction_30db"] >= giavmp["recovered_fraction_40db"]
    assert giavmp["recovered_fraction_40db"] == 1.0
    assert giavmp["exact_readouts"] == 4 and giavmp["collisions"] >= 0  # each sample read exactly, once
    rtf = utils.read_json(out / rows["rtf"]["run"] / "metrics.json")
    assert rtf["honest_accuracy"] == giavmp["honest_accuracy"]  # the same honest model behind both servers
    assert abs(rtf["received_accuracy"] - rtf["honest_accuracy"]) < 0.1  # the imprint barely changes the model
    assert rtf["exact_readouts"] + rtf["collisions"] >= 1 and rtf["exact_readouts"] <= 4


def test_a_mixture_that_passes_the_check_by_chance_does_not_displace_a_sample(digits, tmp_path):
    """The bench case (digits, B = 16, fcnn) where the old 1e-4 check let one mixture pass as a 17th "exact"
    readout ahead of a real sample: now every sample is read exactly and the first 16 rows are the batch."""
    torch.manual_seed(0)
    model = create_model("fcnn", digits.input_shape, digits.num_classes)
    sent = malicious.giavmp_model(model, digits.x_train, batch_size=16, per_sample=4, seed=0, cache_dir=tmp_path)
    pick = torch.randperm(len(digits.x_test), generator=torch.Generator().manual_seed(0))[:16]
    readout, recs, _ = _attack(sent, digits.x_test[pick], digits.y_test[pick], digits.num_classes)
    assert readout.exact == 16
    assert _matched_error(digits.x_test[pick], recs).max() < 1e-4
