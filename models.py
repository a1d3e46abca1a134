"""Architectures by name (a registry, as in timm) and pretrained backbones with trainable linear heads.

Every model takes images in [0, 1]; any normalisation a backbone expects happens inside its wrapper, so
attacks and metrics never see normalised pixels.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from utils import UsageError, atomic_write_bytes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class LeNet(nn.Module):
    """The LeNet of Deep Leakage from Gradients: sigmoid activations (twice differentiable, unlike ReLU)
    and U(-0.5, 0.5) initialisation, which make the gradient-matching problem well conditioned."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        channels, height, width = in_shape
        self.body = nn.Sequential(
            nn.Conv2d(channels, 12, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=1),
            nn.Sigmoid(),
            nn.Flatten(),
        )
        self.fc = nn.Linear(12 * math.ceil(height / 4) * math.ceil(width / 4), num_classes)
        for p in self.parameters():
            nn.init.uniform_(p, -0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class CNN(nn.Module):
    """A small CNN that Opacus accepts as it is: GroupNorm instead of BatchNorm, so no statistics are shared
    between samples. Three conv blocks, then a fully connected layer and the classifier."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, hidden: int = 128):
        super().__init__()
        channels = in_shape[0]

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.ReLU()]

        self.features = nn.Sequential(
            *block(channels, 16), nn.MaxPool2d(2),
            *block(16, 32), nn.MaxPool2d(2),
            *block(32, 64), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )  # fmt: skip
        self.fc = nn.Linear(64 * 4 * 4, hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.relu(self.fc(self.features(x))))


class MLP(nn.Module):
    """Fully connected network on flattened inputs: `mlp` for tabular rows, `fcnn` (wide) for images."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, hidden: int = 64):
        super().__init__()
        self.fc = nn.Linear(math.prod(in_shape), hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.relu(self.fc(x.flatten(1))))


class FrozenBackbone(nn.Module):
    """A pretrained backbone, frozen and always in eval mode, with a trainable linear head.

    The backbone stays in eval mode even when the model is trained: a BatchNorm in train mode would mix
    the statistics of different samples, which breaks per-sample DP accounting and changes features.
    `unfreeze` turns it into a model fine-tuned end to end (train.py --finetune full).
    """

    frozen = True

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, image_size: int):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.head = nn.Linear(feature_dim, num_classes)
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> FrozenBackbone:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def unfreeze(self) -> FrozenBackbone:
        """Make the backbone trainable end to end under DP-SGD: Opacus' ModuleValidator.fix replaces each
        BatchNorm, which mixes samples, by a GroupNorm (Opacus' documented fix), so the pretrained weights
        of every other layer are kept and the normalisation layers start afresh; in-place operations compute
        out of place (out_of_place), so Opacus' backward hooks can see through them."""
        from opacus.validators import ModuleValidator

        self.backbone = out_of_place(ModuleValidator.fix(self.backbone.requires_grad_(True)))  # trainable layers only
        self.frozen = False
        return self.train(self.training)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of images in [0, 1]: grey to RGB, resize, ImageNet normalisation. The backbone
        is frozen but differentiable: a gradient reaches the image (feature inversion needs it); training and
        the feature cache call it without gradients."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        out = self.backbone((x - self.mean) / self.std)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def out_of_place(module: nn.Module) -> nn.Module:
    """`module` with its in-place operations computed out of place, the same function with the same parameters
    (and state_dict keys). Opacus' hooks, functorch and ghost engines rely on full backward hooks, which fail
    when a hooked layer's output is modified in place: in-place activations (inplace=True), and a residual
    `x += shortcut` onto a normalisation layer's output, as in timm's and torchvision's ResNets. The flags are
    cleared; the functional form is rewritten through torch.fx, whose trace records `+=` as an add and in
    which in-place tensor methods (`add_`) become their out-of-place twins (the fix Opacus proposes for
    ModuleValidator.fix). A module torch.fx cannot trace (data-dependent control flow, as in transformers)
    keeps its forward; the trial step of privacy.choose_grad_sample_mode then picks an engine that works."""
    for layer in module.modules():
        if getattr(layer, "inplace", False) is True:
            layer.inplace = False
    try:
        traced = torch.fx.symbolic_trace(module)
    except Exception:  # any failure to trace leaves the module as it was
        return module
    for node in traced.graph.nodes:
        if node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
        name = node.target if node.op == "call_method" else ""
        if name.endswith("_") and not name.startswith("_") and callable(getattr(torch.Tensor, name[:-1], None)):
            node.target = name[:-1]
    traced.recompile()
    return traced


def _weights_error(model: str, source: str, how: str, err: Exception) -> UsageError:
    detail = " ".join(str(err).split()).rstrip(".")  # hub errors span lines; the message stays one paragraph
    return UsageError(
        f"could not load the pretrained weights of '{model}' ({source}): {type(err).__name__}: {detail}. "
        f"Download them once with network access: {how} (they are cached under ~/.cache/huggingface), "
        "or pass --no-pretrained to build the model with random weights for a smoke test."
    )


def require_weights(repo: str, model: str, how: str) -> None:
    """Fail at once, not after a minute of hub retries, when pretrained weights are neither in the local
    Hugging Face cache nor downloadable (no network): one quick connection attempt decides."""
    from huggingface_hub import try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(repo, f), str) for f in ("model.safetensors", "pytorch_model.bin")):
        return
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError as err:
        raise _weights_error(model, repo, how, err) from None


def resnet50(in_shape: tuple[int, ...], num_classes: int, pretrained: bool = True) -> FrozenBackbone:
    """timm's ResNet50 (ImageNet weights `resnet50.a1_in1k`) as a frozen 2048-d feature extractor."""
    import timm

    source = "timm resnet50.a1_in1k"
    how = "uv run python -c \"import timm; timm.create_model('resnet50.a1_in1k', pretrained=True)\""
    if pretrained:
        require_weights("timm/resnet50.a1_in1k", "resnet50", how)
    try:
        backbone = timm.create_model("resnet50.a1_in1k", pretrained=pretrained, num_classes=0)
    except Exception as err:  # hub errors come in many types; all mean "weights unavailable"
        raise _weights_error("resnet50", source, how, err) from None
    return FrozenBackbone(backbone, backbone.num_features, num_classes, image_size=224)


DINOV2_NAME = "facebook/dinov2-with-registers-small"


def dinov2(in_shape: tuple[int, ...], num_classes: int, pretrained: bool = True) -> FrozenBackbone:
    """DINOv2 with registers, ViT-S/14 (transformers), as a frozen 384-d CLS-feature extractor.

    ViT-S rather than ViT-B: a quarter of the compute for a head-only study on CPU, and its linear-probe
    ImageNet accuracy is within a few points of ViT-B's.
    """
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    if pretrained:
        how = (
            'uv run python -c "from transformers import Dinov2WithRegistersModel; '
            f"Dinov2WithRegistersModel.from_pretrained('{DINOV2_NAME}')\""
        )
        require_weights(DINOV2_NAME, "dinov2", how)
        try:
            backbone = Dinov2WithRegistersModel.from_pretrained(DINOV2_NAME)
        except Exception as err:  # hub errors come in many types; all mean "weights unavailable"
            raise _weights_error("dinov2", f"transformers {DINOV2_NAME}", how, err) from None
    else:
        config = Dinov2WithRegistersConfig(
            hidden_size=384, num_hidden_layers=12, num_attention_heads=6, num_register_tokens=4, image_size=224
        )
        backbone = Dinov2WithRegistersModel(config)
    return FrozenBackbone(backbone, backbone.config.hidden_size, num_classes, image_size=224)


def _small(cls: type[nn.Module], **kwargs) -> Callable[..., nn.Module]:
    def build(in_shape: tuple[int, ...], num_classes: int, pretrained: bool = True) -> nn.Module:
        return cls(in_shape, num_classes, **kwargs)

    build.__doc__ = cls.__doc__
    return build


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": _small(LeNet),
    "cnn": _small(CNN),
    "cnn-wide": _small(CNN, hidden=1024),  # GIAvMP's CNN victim: ~1024 neurons after the convolutions
    "mlp": _small(MLP, hidden=64),
    "fcnn": _small(MLP, hidden=1024),
    "resnet50": resnet50,
    "dinov2": dinov2,
}
IMAGE_ONLY = {"lenet", "cnn", "cnn-wide", "resnet50", "dinov2"}
PRETRAINED = {"resnet50", "dinov2"}  # the models whose weights come from the hub (--no-pretrained: random ones)


def check_model_name(name: str) -> None:
    if name not in MODELS:
        raise UsageError(f"unknown model '{name}'; choose one of {', '.join(MODELS)}.")


def create_model(name: str, in_shape: tuple[int, ...], num_classes: int, pretrained: bool = True) -> nn.Module:
    """Build a model by name for inputs of `in_shape` (C, H, W) or (D,), as timm's create_model does."""
    check_model_name(name)
    if name in IMAGE_ONLY and len(in_shape) != 3:
        raise UsageError(f"model '{name}' needs images but the data has shape {in_shape}; use mlp for tables.")
    return MODELS[name](tuple(in_shape), num_classes, pretrained=pretrained)


def trainable_module(model: nn.Module) -> nn.Module:
    """What training updates: the head of a frozen backbone, otherwise the whole model."""
    return model.head if isinstance(model, FrozenBackbone) and model.frozen else model


@torch.no_grad()
def compute_features(model: FrozenBackbone, x: torch.Tensor, device: torch.device, batch_size: int = 64):
    """Run the frozen backbone once over a split (no augmentation), so the head trains on a feature cache."""
    model = model.to(device).eval()
    return torch.cat([model.features(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


def save_checkpoint(model: nn.Module, path: Path) -> None:
    """Save trainable weights as safetensors (never a pickled module), atomically; frozen backbones are rebuilt
    from their pretrained weights on load, so they are not copied into every run."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if isinstance(model, FrozenBackbone) and model.frozen:
        state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    atomic_write_bytes(Path(path), save(state))


def load_checkpoint(model: nn.Module, path: Path) -> nn.Module:
    """Load weights written by save_checkpoint into a freshly built model of the same architecture."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:  # truncated, garbled or unreadable
        raise UsageError(f"checkpoint {path} is damaged ({err}); retrain that run (train.py --force).") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # same names, other shapes: a checkpoint of another dataset or width
        raise UsageError(f"checkpoint {path} does not fit the model: {err}") from None
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise UsageError(f"checkpoint {path} does not fit the model: missing {missing}, unexpected {unexpected}.")
    return model
