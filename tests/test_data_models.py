"""Datasets (embedded, image folders, torchvision offline), models and classification metrics."""

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from PIL import Image

from data_sources import DataOptions, load_dataset, load_image_files
from metrics import classification_metrics
from models import FrozenBackbone, create_model, trainable_module
from utils import UsageError


def _write_folder(root, sizes=(("train", 3), ("test", 2)), classes=("hot_dog", "not_hot_dog")):
    rng = np.random.default_rng(0)
    for part, count in sizes:
        for label in classes:
            (root / part / label).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / part / label / f"{i}.png")


@pytest.mark.parametrize(("name", "shape", "classes"), [("faces", (1, 25, 25), 2), ("digits", (1, 32, 32), 10),
                                                        ("breast-cancer", (30,), 2)])  # fmt: skip
def test_embedded_sets_are_in_unit_range_with_a_fixed_stratified_split(name, shape, classes):
    data = load_dataset(name)
    assert data.input_shape == shape and data.num_classes == classes
    for x in (data.x_train, data.x_test):
        assert x.min() >= 0 and x.max() <= 1
    train_share = torch.bincount(data.y_train).float() / len(data.y_train)
    test_share = torch.bincount(data.y_test).float() / len(data.y_test)
    assert torch.allclose(train_share, test_share, atol=0.05)  # stratified
    again = load_dataset(name)
    assert torch.equal(again.x_train, data.x_train) and torch.equal(again.y_test, data.y_test)
    other = load_dataset(name, DataOptions(seed=1))
    assert not torch.equal(other.y_train, data.y_train)


def test_image_folder_loads_the_hotdog_layout(tmp_path):
    _write_folder(tmp_path / "hotdog")
    data = load_dataset("hotdog", DataOptions(root=tmp_path, image_size=16))
    assert data.classes == ["hot_dog", "not_hot_dog"]
    assert data.x_train.shape == (6, 3, 16, 16) and data.x_test.shape == (4, 3, 16, 16)
    assert data.y_train.tolist() == [0, 0, 0, 1, 1, 1]
    assert 0 <= data.x_train.min() and data.x_train.max() <= 1
    folder = load_dataset(f"folder:{tmp_path / 'hotdog'}", DataOptions(image_size=16))
    assert torch.equal(folder.x_test, data.x_test)


def test_image_folder_without_a_test_split_says_what_is_expected(tmp_path):
    _write_folder(tmp_path / "hotdog", sizes=(("train", 1),))
    with pytest.raises(UsageError, match=r"no test/ directory.*hot-dog-not-hot-dog"):
        load_dataset("hotdog", DataOptions(root=tmp_path))
    with pytest.raises(UsageError, match="is not a directory"):
        load_dataset(f"folder:{tmp_path / 'missing'}")


def test_mnist_offline_and_absent_says_where_and_how(tmp_path):
    with pytest.raises(UsageError, match=r"'mnist' is not in .*mnist.*--dataset mnist"):
        load_dataset("mnist", DataOptions(root=tmp_path, download=False))


def test_user_image_files_fit_the_model_input(tmp_path):
    _write_folder(tmp_path, sizes=(("x", 1),), classes=("a",))
    batch = load_image_files([tmp_path / "x" / "a" / "0.png"], (1, 25, 25))
    assert batch.shape == (1, 1, 25, 25) and 0 <= batch.min() and batch.max() <= 1
    with pytest.raises(UsageError, match="does not exist"):
        load_image_files([tmp_path / "nope.png"], (1, 25, 25))


@pytest.mark.parametrize(("name", "shape"), [("cnn", (1, 25, 25)), ("lenet", (3, 32, 32)), ("mlp", (30,)),
                                             ("fcnn", (1, 8, 8))])  # fmt: skip
def test_small_models_give_logits_and_opacus_accepts_them(name, shape):
    model = create_model(name, shape, 3)
    assert model(torch.rand(2, *shape)).shape == (2, 3)
    assert ModuleValidator.validate(model, strict=False) == []  # no BatchNorm: per-sample DP works as is


def test_frozen_backbone_stays_in_eval_mode_and_only_its_head_trains():
    model = create_model("resnet50", (1, 25, 25), 2, pretrained=False)
    assert isinstance(model, FrozenBackbone) and trainable_module(model) is model.head
    model.train()
    assert model.head.training and not model.backbone.training
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert model(torch.rand(2, 1, 25, 25)).shape == (2, 2)  # grey 25x25 resized to RGB 224 inside


def test_tabular_data_with_an_image_model_is_refused():
    with pytest.raises(UsageError, match="needs images"):
        create_model("cnn", (30,), 2)


@pytest.mark.parametrize("name", ["resnet50", "dinov2"])
def test_pretrained_weights_offline_give_a_usage_error_naming_the_model(name):
    with pytest.raises(UsageError, match=rf"'{name}'.*--no-pretrained") as info:
        create_model(name, (3, 32, 32), 2, pretrained=True)
    assert "\n" not in str(info.value)  # one paragraph


def test_binary_metrics_agree_with_a_hand_computed_confusion_matrix():
    y_true = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    y_pred = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    tp, fn, fp, tn = 3, 1, 2, 4
    m = classification_metrics(y_true, y_pred, 2)
    assert m["accuracy"] == pytest.approx((tp + tn) / 10)
    assert m["precision"] == pytest.approx(tp / (tp + fp))
    assert m["recall"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert m["mcc"] == pytest.approx(mcc)


def test_multiclass_metrics_are_macro_averages():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    # per class (tp, fp, fn, tn): 0 (1,1,1,3), 1 (2,1,0,3), 2 (1,0,1,4)
    m = classification_metrics(y_true, y_pred, 3)
    assert m["precision"] == pytest.approx(np.mean([1 / 2, 2 / 3, 1]))
    assert m["recall"] == pytest.approx(np.mean([1 / 2, 1, 1 / 2]))
    assert m["specificity"] == pytest.approx(np.mean([3 / 4, 3 / 4, 1]))
    assert classification_metrics([0, 1, 2], [0, 1, 2], 3)["mcc"] == pytest.approx(1.0)
