"""The generative-prior attacks: GGL's generator learns only from the auxiliary split (never the victims' images),
GGL recovers an image of its generator's range without a defense, GRNN's label branch finds the label, and a
--generator that is missing or pickled is refused before any work (exit 2, one message)."""

import pickle
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import config
import utils
import victims
from attacks import ATTACKS, generative
from defenses import ClientSetup, MechanismSpec, client_update
from metrics import reconstruction_scores
from models import create_model
from tests.test_attacks import small_digits
from tests.test_gradient_attack import run_cli

SHAPE = (1, 16, 16)


def lenet():
    torch.manual_seed(0)
    return create_model("lenet", SHAPE, 10)


def attack_cfg(**overrides) -> SimpleNamespace:
    return SimpleNamespace(
        **{"seed": 0, "restarts": 1, "iterations": 300, "log_every": 100, "ggl_optimizer": "auto", "generator": None,
           **overrides}
    )  # fmt: skip


def test_the_generator_learns_only_from_images_other_than_the_victims(tmp_path, monkeypatch):
    seen = []
    train = generative.train_generator

    def spy(images, labels, num_classes, epochs, seed):
        seen.append(images.clone())
        return train(images[:64], labels[:64], num_classes, epochs, seed)

    monkeypatch.setattr(generative, "train_generator", spy)
    out, cache = tmp_path / "attack", tmp_path / "cache"
    args = ["--model", "lenet", "--dataset", "digits", "--attacks", "ggl", "--mechanisms", "none", "noise:0.1",
            "--num-images", "3", "--iterations", "2", "--generator-epochs", "1", "--out", str(out),
            "--cache-dir", str(cache)]  # fmt: skip
    assert run_cli(args) == 0
    assert len(seen) == 1  # once for the study, reused across its cells
    private = utils.read_json(next(out.glob("*-ggl-none-*")) / "config.json")["indices"]
    split = victims.load_data(config.AttackConfig(), "digits", {"seed": 0, "test_fraction": 0.25, "image_size": 32})
    others = [i for i in range(len(split.x_train)) if i not in private]
    assert len(private) == 3 and torch.equal(seen[0], split.x_train[others])
    assert len(list(cache.glob("ggl-digits-s0-*.safetensors"))) == 1
    assert run_cli([*args, "--force"]) == 0 and len(seen) == 1  # a second study reads the cached generator


@pytest.fixture(scope="module")
def generator():
    """A generator trained briefly on 16 small digits: its range holds plausible digit-like images."""
    images, labels = small_digits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures set up before the one-thread fixture: the same generator everywhere
    yield generative.train_generator(images, labels, 10, epochs=30, seed=0)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("optimizer", ["adam", "cma"])
def test_ggl_recovers_an_image_of_its_generators_range(generator, optimizer):
    label = torch.tensor([3])
    z = torch.randn(1, generative.LATENT, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = generator(torch.cat([z, F.one_hot(label, 10).float()], 1))
    model = lenet()
    update = client_update(model, target, label, MechanismSpec("none", None), ClientSetup())
    rec = generative.run_ggl(
        model,
        update,
        SHAPE,
        10,
        attack_cfg(ggl_optimizer=optimizer, iterations=400),
        lambda *a: None,
        generator=generator,
    )
    ssim = reconstruction_scores(target, rec.images)["ssim"][0]
    assert ssim > 0.9
    assert rec.labels.tolist() == [3]


def test_grnn_label_branch_recovers_the_label_at_batch_one():
    images, labels = small_digits()
    model = lenet()
    for i in (2, 5):
        update = client_update(model, images[i : i + 1], labels[i : i + 1], MechanismSpec("none", None), ClientSetup())
        rec = ATTACKS["grnn"].run(model, update, SHAPE, 10, attack_cfg(iterations=100), lambda *a: None)
        assert rec.labels.tolist() == labels[i : i + 1].tolist()


@pytest.mark.parametrize("kind", ["missing", "pickled"])
def test_a_missing_or_pickled_generator_is_refused_before_any_work(tmp_path, capsys, kind):
    path = tmp_path / "generator.pt"
    if kind == "pickled":
        path.write_bytes(pickle.dumps({"stem.weight": torch.zeros(2, 2)}))
    out = tmp_path / "attack"
    args = ["--model", "lenet", "--dataset", "digits", "--attacks", "ggl", "--generator", str(path), "--out", str(out)]
    assert run_cli(args) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err and err.count("\n") == 1
    assert ("no such file" if kind == "missing" else "Pickled checkpoints") in err
    assert not out.exists()
