"""Named datasets, all as tensors with pixels (or features) in [0, 1].

Embedded sets ship inside installed packages and need no network: `faces` (the default), `digits`,
`breast-cancer` and `photos`. The real sets (`mnist`, `cifar10`, `cifar100`, `hotdog`, `folder:PATH`) are
read from `data/` and, for the torchvision ones, downloaded there when a network is available.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import train_test_split

from utils import UsageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class DataSplit:
    """Train and test tensors of one dataset. Images are (N, C, H, W) in [0, 1]; tabular rows are (N, D)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.x_train.dim() == 4


@dataclass
class DataOptions:
    """How to load: where real data lives, whether to download, the split seed and size for folders."""

    root: Path = Path("data")
    download: bool = True
    seed: int = 0
    test_fraction: float = 0.25
    image_size: int = 64


def _split(name: str, x: np.ndarray, y: np.ndarray, classes: list[str], opts: DataOptions) -> DataSplit:
    """A fixed, stratified, seeded train/test split of an embedded set."""
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=opts.test_fraction, stratify=y, random_state=opts.seed)
    as_x = lambda a: torch.as_tensor(a, dtype=torch.float32)
    as_y = lambda a: torch.as_tensor(a, dtype=torch.long)
    return DataSplit(name, as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te), classes)


def load_faces(opts: DataOptions) -> DataSplit:
    """scikit-image's LFW subset: 100 faces and 100 non-faces, 25x25 grey; the offline stand-in for hot dogs."""
    from skimage.data import lfw_subset

    images = lfw_subset().astype(np.float32)[:, None]  # the first 100 are faces
    labels = np.r_[np.ones(100), np.zeros(100)].astype(np.int64)
    return _split("faces", images, labels, ["not_face", "face"], opts)


def load_digits(opts: DataOptions) -> DataSplit:
    """scikit-learn's 8x8 digits (values 0..16), upsampled bilinearly to 32x32 so image models and LeNet fit."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = torch.as_tensor(bunch.images / 16.0, dtype=torch.float32)[:, None]
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    return _split("digits", images.numpy(), bunch.target, [str(c) for c in range(10)], opts)


def load_breast_cancer(opts: DataOptions) -> DataSplit:
    """scikit-learn's tabular breast-cancer set, min-max scaled to [0, 1] with the training rows' range."""
    from sklearn.datasets import load_breast_cancer as sk_cancer

    bunch = sk_cancer()
    split = _split("breast-cancer", bunch.data, bunch.target, list(bunch.target_names), opts)
    lo, hi = split.x_train.min(0).values, split.x_train.max(0).values
    scale = (hi - lo).clamp_min(1e-12)
    split.x_train = (split.x_train - lo) / scale
    split.x_test = ((split.x_test - lo) / scale).clamp(0, 1)
    return split


PHOTO_NAMES = ["astronaut", "camera", "coffee", "chelsea", "rocket", "cat", "coins", "moon"]


def load_photos(opts: DataOptions) -> DataSplit:
    """scikit-image's sample photographs, RGB at `image_size`: a colour set for attacks, not for training."""
    import skimage.data as skd

    images = torch.stack([_resize(getattr(skd, n)(), opts.image_size) for n in PHOTO_NAMES])
    labels = torch.arange(len(PHOTO_NAMES))
    empty = images[:0]
    return DataSplit("photos", images, labels, empty, labels[:0], PHOTO_NAMES)


def _resize(array: np.ndarray, size: int) -> torch.Tensor:
    """HxW or HxWxC uint8/float array to a (3, size, size) float tensor in [0, 1]."""
    x = torch.as_tensor(np.asarray(array, dtype=np.float32))
    if x.max() > 1.0:
        x = x / 255.0
    if x.dim() == 2:
        x = x[..., None].expand(-1, -1, 3)
    x = x[..., :3].permute(2, 0, 1)[None]
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def _torchvision(name: str, cls_name: str) -> Callable[[DataOptions], DataSplit]:
    def load(opts: DataOptions) -> DataSplit:
        import torchvision

        cls = getattr(torchvision.datasets, cls_name)
        root = Path(opts.root) / name
        existed = root.exists()
        try:
            train = cls(root, train=True, download=opts.download)
            test = cls(root, train=False, download=opts.download)
        except (RuntimeError, OSError) as err:
            if not existed:  # a failed download leaves empty folders that would look like a dataset
                shutil.rmtree(root, ignore_errors=True)
            raise UsageError(
                f"dataset '{name}' is not in {root} and could not be downloaded ({err}). Run once with network "
                f"access (`uv run train.py --dataset {name}` downloads it into {root}), or copy the torchvision "
                f"{cls_name} files there; offline, use an embedded set: faces, digits, breast-cancer."
            ) from None

        def tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.as_tensor(np.asarray(ds.data), dtype=torch.float32) / 255.0
            x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
            return x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)

        (x_tr, y_tr), (x_te, y_te) = tensors(train), tensors(test)
        return DataSplit(name, x_tr, y_tr, x_te, y_te, list(train.classes))

    load.__doc__ = f"torchvision {cls_name}, downloaded into data/{name} when online."
    return load


def load_image_folder(root: Path, size: int, name: str) -> DataSplit:
    """A `{train,test}/<class>/*.jpg` folder (the Kaggle hot-dog layout), resized to size x size RGB."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        raise UsageError(
            f"image folder {root} has no {' or '.join(f'{m}/' for m in missing)} directory. Expected {root}/train/<class>/*.jpg "
            f"and {root}/test/<class>/*.jpg (for hot-dog: download the Kaggle 'hot-dog-not-hot-dog' set and unzip "
            "it so that data/hotdog/train/hot_dog/ exists)."
        )
    splits = []
    for part in ("train", "test"):
        folder = ImageFolder(str(root / part))
        x = torch.stack([_resize(read_image(Path(p)), size) for p, _ in folder.samples])
        splits.append((x, torch.as_tensor(folder.targets, dtype=torch.long), folder.classes))
    (x_tr, y_tr, classes), (x_te, y_te, test_classes) = splits
    if classes != test_classes:
        raise UsageError(f"{root}: train classes {classes} differ from test classes {test_classes}.")
    return DataSplit(name, x_tr, y_tr, x_te, y_te, classes)


DATASETS: dict[str, Callable[[DataOptions], DataSplit]] = {
    "faces": load_faces,
    "digits": load_digits,
    "breast-cancer": load_breast_cancer,
    "photos": load_photos,
    "mnist": _torchvision("mnist", "MNIST"),
    "cifar10": _torchvision("cifar10", "CIFAR10"),
    "cifar100": _torchvision("cifar100", "CIFAR100"),
    "hotdog": lambda opts: load_image_folder(Path(opts.root) / "hotdog", opts.image_size, "hotdog"),
}


def check_dataset_name(name: str) -> None:
    """Fail early, with the allowed names, on an unknown dataset."""
    if name.startswith("folder:"):
        if not Path(name[len("folder:") :]).is_dir():
            raise UsageError(f"dataset '{name}': {name[len('folder:') :]} is not a directory.")
        return
    if name not in DATASETS:
        raise UsageError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)} or folder:PATH.")


def load_dataset(name: str, opts: DataOptions | None = None) -> DataSplit:
    """Load a dataset by name (see DATASETS), or `folder:PATH` for any image folder in the hot-dog layout."""
    opts = opts or DataOptions()
    check_dataset_name(name)
    if name.startswith("folder:"):
        path = Path(name[len("folder:") :])
        return load_image_folder(path, opts.image_size, path.name)
    return DATASETS[name](opts)


def dirichlet_partition(labels: torch.Tensor, clients: int, alpha: float, seed: int) -> list[torch.Tensor]:
    """Non-IID client shares (Hsu et al. 2019): each class's samples are split over the clients in proportions
    drawn from Dirichlet(alpha, ..., alpha), so small alpha gives each client a few dominant classes and large
    alpha tends to IID shares. Every sample lands in exactly one share. A draw that leaves a client with fewer
    than 2 samples is redrawn (a client must be able to train and be checked), as is usual for this split.
    Returns each client's training indices, sorted."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    if len(y) < 2 * clients:
        raise UsageError(f"{len(y)} training samples cannot give {clients} clients 2 samples each; use fewer clients.")
    for _ in range(1000):
        shares: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for cls in np.unique(y):
            members = rng.permutation(np.flatnonzero(y == cls))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(members)).round().astype(int)[:-1]
            for share, part in zip(shares, np.split(members, cuts), strict=True):
                share.append(part)
        parts = [np.sort(np.concatenate(s)) for s in shares]
        if min(map(len, parts)) >= 2:
            return [torch.as_tensor(p, dtype=torch.long) for p in parts]
    raise UsageError(
        f"Dirichlet(α = {alpha}) left some of {clients} clients almost empty in 1000 draws; use a larger --alpha or "
        "fewer --clients."
    )


def read_image(path: Path) -> np.ndarray:
    """An image file as an RGB array; one Pillow cannot read, or one so large it would exhaust memory (Pillow's
    decompression-bomb guard, from about 179 million pixels), is a UsageError naming it."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Image.DecompressionBombError as err:
        raise UsageError(
            f"{path} is too large to read safely ({err}); give an image under about 10000 x 10000."
        ) from None
    except (UnidentifiedImageError, OSError):
        raise UsageError(f"{path} is not an image that Pillow can read; give PNG or JPEG files.") from None


def image_channels(paths: list[Path]) -> int:
    """1 if every file is a grey image (a grey mode, or RGB with equal channels), else 3."""
    for path in map(Path, paths):
        if path.is_file():
            rgb = read_image(path).astype(np.int16)
            if (rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 1] != rgb[..., 2]).any():
                return 3
    return 1


def load_image_files(paths: list[Path], shape: tuple[int, ...]) -> torch.Tensor:
    """The user's own image files, resized to a model's (C, H, W) input, as a batch in [0, 1]."""
    channels, height, _ = shape
    images = []
    for path in map(Path, paths):
        if path.is_dir():
            raise UsageError(f"--images {path} is a directory; give image files (e.g. {path}/*.png).")
        if not path.is_file():
            raise UsageError(f"image file {path} does not exist; give paths to PNG or JPEG files.")
        array = read_image(path)
        image = _resize(array, height)
        images.append(image.mean(0, keepdim=True) if channels == 1 else image)
    return torch.stack(images)
