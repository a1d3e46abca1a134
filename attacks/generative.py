"""Generative-prior attacks: search a generator's output instead of free pixels.

- `ggl` (Li et al. CVPR 2022, *Generative Gradient Leakage*): the honest server first trains a generator on its
  auxiliary data (the training split without the victims' images, as the malicious servers' auxiliary data): a
  conditional VAE whose DCGAN decoder is the generator (the paper's BigGAN cannot be downloaded offline, and the
  point is a prior of the data's kind). It is cached in safetensors and reused. The attack reads the labels off
  the last layer, then searches the generator's latent space for images whose gradient, seen through the known
  mechanism (attacks/matching.py), matches the shared one, under GGL's KL prior on the latent vector: with CMA-ES
  (the `cma` library) where the mechanism's masks or bins block the gradient path (prune, top-k, quantize), with
  Adam otherwise, as the paper does. Its answer is always an image of the generator's range: plausible even where
  noise or compression leave pixel-space attacks with nothing, and never closer to the victim than that range.
- `grnn` (Ren, Deng & Xie 2022, *Generative Regression Neural Network*): no pretraining; a generator and a label
  branch fed with fixed noise are trained jointly so that the images and soft labels they produce give the shared
  gradient (again through the mechanism): squared L2 distance plus their Wasserstein term (the authors' code takes
  the Wasserstein distance between the two gradients as point masses, which is their Euclidean distance) plus
  total variation, with RMSprop, their architecture, initialisation and settings.
"""

from __future__ import annotations

import hashlib
import math
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from attacks import Attack, Observer, Reconstruction, Trajectory, best_of_restarts, num_reconstructed, total_variation
from attacks.labels import recover_labels
from attacks.matching import matching_losses, target_gradients
from data_sources import DataSplit
from defenses import SharedUpdate
from utils import UsageError, atomic_write_bytes

if TYPE_CHECKING:
    from config import AttackConfig

GENERATOR_KIND = "ggl-cvae-decoder"  # the metadata a generator file must carry (see load_generator)
LATENT = 32  # GGL's latent size: a digit or face of 32x32 needs few degrees of freedom, and CMA-ES's cost grows
# with the square of the dimension
GGL_WIDTH = 16  # channels of the generator's last block (GRNN's is 32): a quarter of the cost, so it trains
# on 2 CPU cores in well under 2 minutes
VAE_BETA = 0.3  # weight of the VAE's KL term
ADAM_LR = 0.1
ADAM_INIT = 1.0
KL_WEIGHT = 0.1  # GGL's weight of the KL term that keeps a latent vector's statistics those of N(0, 1)
GRADIENT_BLOCKING = ("prune", "topk", "quantize")  # mechanisms whose masks and bins leave a flat or stepped match
GRNN_NOISE = 128  # GRNN's generator input size
GRNN_LR = 1e-4  # GRNN's RMSprop step and momentum, from the authors' code
GRNN_MOMENTUM = 0.99
GRNN_TV = 1e-3  # their total-variation weight for LeNet


class Decoder(nn.Module):
    """GGL's generator, a DCGAN decoder: (latent, one-hot label) (N, in_features) -> images (N, *shape) in [0, 1].
    A linear layer to a 4x4 map, then transposed convolutions doubling it up to the smallest power of two
    covering the image (batch norm and ReLU between them), a sigmoid, and a resize to the image's size."""

    def __init__(self, in_features: int, shape: tuple[int, ...], width: int = 16):
        super().__init__()
        channels, doublings = shape[0], doublings_to(shape)
        sizes = [width * 2 ** (doublings - 1 - i) for i in range(doublings)] + [channels]  # 4x4 map's channels first
        self.shape = tuple(shape)
        self.stem = nn.Linear(in_features, sizes[0] * 16)
        layers = []
        for c_in, c_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.BatchNorm2d(c_in), nn.ReLU(), nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)]
        self.blocks = nn.Sequential(*layers, nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resized(self.blocks(self.stem(x).view(len(x), -1, 4, 4)), self.shape)


class GRNNGenerator(nn.Module):
    """GRNN's generator: noise (N, in_features) -> images (N, *shape) in [0, 1]. A linear layer to a 4x4 map
    (their 4x4 transposed convolution of a 1x1 input), then blocks of nearest upsampling, 3x3 convolution, batch
    norm and a gated linear unit, each doubling the side, and a sigmoid; resized to the image's size."""

    def __init__(self, in_features: int, shape: tuple[int, ...], width: int = 32):
        super().__init__()
        channels, doublings = shape[0], doublings_to(shape)
        sizes = [width * 2 ** (doublings - 1 - i) for i in range(doublings)] + [channels]
        self.shape = tuple(shape)
        self.stem = nn.Linear(in_features, 2 * sizes[0] * 16)
        self.blocks = nn.Sequential(*[up_block(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.glu(self.stem(x).view(len(x), -1, 4, 4), dim=1)
        return resized(torch.sigmoid(self.blocks(out)), self.shape)


def up_block(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(channels_in, 2 * channels_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * channels_out),
        nn.GLU(dim=1),
    )


def doublings_to(shape: tuple[int, ...]) -> int:
    """How many doublings take a 4x4 map to the smallest power of two (at least 8) covering the image."""
    return max(1, math.ceil(math.log2(max(shape[1:]) / 4)))


def resized(images: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if images.shape[-2:] == shape[1:]:
        return images
    return F.interpolate(images, size=shape[1:], mode="bilinear", align_corners=False)


def require_images(input_shape: tuple[int, ...], attack: str) -> None:
    if len(input_shape) != 3:
        raise UsageError(
            f"{attack} generates images, but the victim's inputs have shape {input_shape} (a table); use an image "
            "dataset (digits, faces, ...) or another attack (dlg, ig)."
        )


# --- GGL: the generator the server trains on its auxiliary data ------------------------------------------------


class Encoder(nn.Module):
    """The VAE's encoder (used only to train the generator): strided convolutions down to 4x4, then the
    latent mean and log-variance from those features and the one-hot label."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, width: int = 32):
        super().__init__()
        self.side = 4 * 2 ** doublings_to(shape)
        layers, c = [], shape[0]
        for i in range(doublings_to(shape)):
            layers += [nn.Conv2d(c, width * 2**i, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c = width * 2**i
        self.convs = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(c * 16 + num_classes, 2 * LATENT)

    def forward(self, images: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = resized(images, (images.shape[1], self.side, self.side))
        mean, logvar = self.head(torch.cat([self.convs(images), onehot], 1)).chunk(2, dim=1)
        return mean, logvar


def train_generator(images: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int, seed: int) -> Decoder:
    """A conditional VAE fitted on the auxiliary images (N, C, H, W) in [0, 1]; its decoder, images from
    (latent, one-hot label), is the generator. Adam, batches of 64, binary cross-entropy plus the KL term."""
    torch.manual_seed(seed)
    shape = tuple(images.shape[1:])
    decoder = Decoder(LATENT + num_classes, shape, GGL_WIDTH)
    encoder = Encoder(shape, num_classes, GGL_WIDTH)
    optimizer = torch.optim.Adam([*decoder.parameters(), *encoder.parameters()], lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    onehots = F.one_hot(labels, num_classes).float()
    for _ in range(epochs):
        for batch in torch.randperm(len(images)).split(64):
            x, c = images[batch], onehots[batch]
            mean, logvar = encoder(x, c)
            z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
            fit = F.binary_cross_entropy(decoder(torch.cat([z, c], 1)), x, reduction="sum") / len(x)
            kl = -0.5 * (1 + logvar - mean.pow(2) - logvar.exp()).sum() / len(x)
            optimizer.zero_grad()
            (fit + VAE_BETA * kl).backward()
            optimizer.step()
        schedule.step()
    return decoder.eval().requires_grad_(False)


def save_generator(path: Path, generator: Decoder, num_classes: int, source: str) -> None:
    """The generator's weights as safetensors, atomically, with what load_generator checks in the metadata."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    metadata = {
        "kind": GENERATOR_KIND, "latent": str(LATENT), "num_classes": str(num_classes),
        "shape": ",".join(map(str, generator.shape)), "source": source,
    }  # fmt: skip
    atomic_write_bytes(path, save(tensors, metadata))


def generator_metadata(path: Path) -> dict[str, str]:
    """The metadata of a generator file, with a clear error for a missing, pickled or foreign file."""
    from safetensors import SafetensorError, safe_open

    advice = (
        "--generator takes a safetensors file holding a ggl generator (as written to the cache directory, "
        "runs/cache/ggl-*.safetensors); leave it out and the server trains one on its auxiliary data."
    )
    if not Path(path).is_file():
        raise UsageError(f"--generator {path}: no such file. {advice}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise UsageError(
            f"--generator {path} is not a safetensors file ({err}). Pickled checkpoints (.pt, .pth, .pkl) are "
            f"refused: unpickling can run arbitrary code. Save the generator's state dict with "
            f"safetensors.torch.save_file instead. {advice}"
        ) from None
    if metadata.get("kind") != GENERATOR_KIND:
        raise UsageError(f"--generator {path} carries no '{GENERATOR_KIND}' metadata. {advice}")
    return metadata


def load_generator(path: Path, input_shape: tuple[int, ...], num_classes: int) -> Decoder:
    """A generator file, checked to make images of the victim's shape for its classes."""
    from safetensors.torch import load_file

    metadata = generator_metadata(path)
    shape = tuple(int(s) for s in metadata["shape"].split(","))
    if shape != tuple(input_shape) or int(metadata["num_classes"]) != num_classes or int(metadata["latent"]) != LATENT:
        raise UsageError(
            f"--generator {path} makes {metadata['shape']} images of {metadata['num_classes']} classes from a latent "
            f"of {metadata['latent']}, but the victim takes {','.join(map(str, input_shape))} images of {num_classes} "
            f"classes (latent {LATENT}); use a generator trained for this dataset, or leave --generator out."
        )
    generator = Decoder(LATENT + num_classes, shape, GGL_WIDTH)
    generator.load_state_dict(load_file(str(path)))
    return generator.eval().requires_grad_(False)


def cached_generator(aux: DataSplit, cfg: AttackConfig) -> Decoder:
    """The generator for this dataset and seed, trained on the auxiliary split once and then read from
    cfg.cache_dir. The key includes a digest of the auxiliary images, so a generator never serves a study whose
    victims it may have seen (another draw of victim images leaves other auxiliary data, and a new generator)."""
    digest = hashlib.sha256(aux.x_train.contiguous().numpy().tobytes())
    digest.update(f"{LATENT}-{cfg.generator_epochs}".encode())
    path = Path(cfg.cache_dir) / f"ggl-{aux.name}-s{cfg.seed}-{digest.hexdigest()[:12]}.safetensors"
    if not path.exists():
        generator = train_generator(aux.x_train, aux.y_train, aux.num_classes, cfg.generator_epochs, cfg.seed)
        save_generator(path, generator, aux.num_classes, f"{aux.name}, seed {cfg.seed}, {len(aux.x_train)} images")
    return load_generator(path, aux.input_shape, aux.num_classes)


def learn_ggl(aux: DataSplit, cfg: AttackConfig):
    """The honest server's offline step: the user's --generator, or one trained on the auxiliary data (the
    training split without the victims' images); returns GGL's run with it."""
    require_images(aux.input_shape, "ggl")
    if cfg.generator is not None:
        return partial(run_ggl, generator=load_generator(cfg.generator, aux.input_shape, aux.num_classes))
    if aux.name == "user-images":
        raise UsageError(
            "ggl trains its generator on auxiliary data other than the victim's images, and your --images are the "
            "only data here; name the dataset they come from (--dataset) or give a trained --generator."
        )
    return partial(run_ggl, generator=cached_generator(aux, cfg))


# --- GGL: the latent search --------------------------------------------------------------------------------------


def latent_kl(z: torch.Tensor) -> torch.Tensor:
    """GGL's prior term: the KL divergence from N(0, 1) of a normal with each latent vector's own mean and
    variance, summed over the vectors of a candidate; z (R, N, LATENT) -> (R,)."""
    mean, var = z.mean(-1), z.var(-1, unbiased=False)
    return (-0.5 * (1 + torch.log(var + 1e-10) - mean.pow(2) - var)).sum(-1)


def ggl_objective(generator: Decoder, model: nn.Module, update: SharedUpdate, labels: torch.Tensor):
    """Latent vectors z (R, N, LATENT) -> (images (R, N, ...), losses (R,)): the squared L2 distance of the
    images' gradient, through the mechanism, to the shared one, relative to the shared gradient's squared norm
    (so the prior's weight means the same for every model), plus KL_WEIGHT times the latent prior."""
    device = next(model.parameters()).device
    scale = sum(t.pow(2).sum() for t in target_gradients(update)).to(device).clamp_min(1e-30)
    onehot = F.one_hot(labels, generator.stem.in_features - LATENT).float()

    def objective(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r, n = z.shape[:2]
        codes = torch.cat([z.reshape(r * n, LATENT), onehot.repeat(r, 1)], 1)
        images = generator(codes).view(r, n, *generator.shape)
        losses = matching_losses(model, images, labels.expand(r, n), update, "l2") / scale
        return images, losses + KL_WEIGHT * latent_kl(z)

    return objective


def run_ggl(
    model: nn.Module,
    update: SharedUpdate,
    input_shape: tuple[int, ...],
    num_classes: int,
    cfg: AttackConfig,
    observe: Observer,
    generator: Decoder | None = None,
) -> Reconstruction:
    """GGL on one shared update: labels from the last layer, then the latent search (CMA-ES or Adam, see
    ggl_optimizer), the best of cfg.restarts kept."""
    if generator is None:
        if cfg.generator is None:
            raise UsageError("ggl needs a generator: give --generator, or run it through gradient_attack.py.")
        generator = load_generator(cfg.generator, input_shape, num_classes)
    device = next(model.parameters()).device
    generator = generator.to(device)
    count = num_reconstructed(update)
    labels = recover_labels(model, update, input_shape, count, cfg.seed).to(device)
    objective = ggl_objective(generator, model, update, labels)
    if ggl_optimizer(cfg, update) == "cma":
        results = [cma_search(objective, labels, count, cfg, restart) for restart in range(cfg.restarts)]
    else:
        results = adam_search(objective, labels, count, cfg)
    return best_of_restarts(results, observe)


def ggl_optimizer(cfg: AttackConfig, update: SharedUpdate) -> str:
    """--ggl-optimizer, where `auto` takes CMA-ES under the mechanisms that block the gradient path and Adam
    otherwise (the paper's choice)."""
    if cfg.ggl_optimizer != "auto":
        return cfg.ggl_optimizer
    return "cma" if update.mechanism_name in GRADIENT_BLOCKING else "adam"


def cma_search(objective, labels: torch.Tensor, count: int, cfg: AttackConfig, restart: int):
    """CMA-ES (the `cma` library) over the count x LATENT latent values from the prior's mean with step 1, one
    generation per iteration, each generation's population evaluated as one batch. Logs the best so far."""
    import cma

    device = labels.device
    options = {"seed": cfg.seed * 1000 + restart + 1, "verbose": -9, "maxiter": cfg.iterations, "tolfun": 0}
    start = np.random.default_rng(cfg.seed * 1000 + restart).normal(0, 0.1, count * LATENT)
    strategy = cma.CMAEvolutionStrategy(start, 1.0, options)
    trajectory = Trajectory(cfg.iterations, cfg.log_every)

    def evaluate(zs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.tensor(np.array(zs), dtype=torch.float32, device=device).view(len(zs), count, LATENT)
        with torch.no_grad():
            images, losses = objective(z)
        return images, torch.nan_to_num(losses.detach(), nan=math.inf)

    best_images, best_loss = evaluate([start])
    best_images, best_loss = best_images[0], float(best_loss[0])
    trajectory.log(0, best_images, labels, best_loss)
    for iteration in range(1, cfg.iterations + 1):
        zs = strategy.ask()
        images, losses = evaluate(zs)
        strategy.tell(zs, losses.cpu().tolist())
        i = int(losses.argmin())
        if float(losses[i]) < best_loss:
            best_images, best_loss = images[i], float(losses[i])
        trajectory.log(iteration, best_images, labels, best_loss)
    return Reconstruction(best_images, labels.cpu(), best_loss), trajectory


def adam_search(objective, labels: torch.Tensor, count: int, cfg: AttackConfig):
    """Adam on the latent values of every restart at once (they are independent), from the prior's mean,
    step 0.1 decayed on a cosine."""
    starts = [torch.Generator().manual_seed(cfg.seed * 1000 + r) for r in range(cfg.restarts)]
    z = torch.stack([ADAM_INIT * torch.randn(count, LATENT, generator=g) for g in starts]).to(labels.device)
    z.requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=ADAM_LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.iterations)
    trajectories = [Trajectory(cfg.iterations, cfg.log_every) for _ in starts]
    for iteration in range(cfg.iterations + 1):
        images, losses = objective(z)
        for r, trajectory in enumerate(trajectories):
            trajectory.log(iteration, images[r], labels, float(losses[r].detach()))
        if iteration == cfg.iterations or not torch.isfinite(losses).any():
            break
        optimizer.zero_grad()
        losses.sum().backward()
        optimizer.step()
        schedule.step()
    final = losses.detach().cpu()
    return [(Reconstruction(images[r].detach(), labels.cpu(), float(final[r])), trajectories[r]) for r in range(len(z))]


# --- GRNN ---------------------------------------------------------------------------------------------------------


class GRNN(nn.Module):
    """GRNN's two branches on one fixed noise batch: the generator's images and a softmax label per sample."""

    def __init__(self, count: int, shape: tuple[int, ...], num_classes: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("noise", torch.randn(count, GRNN_NOISE, generator=gen))
        torch.manual_seed(seed)
        self.images = GRNNGenerator(GRNN_NOISE, shape)
        self.labels = nn.Linear(GRNN_NOISE, num_classes)
        for m in self.modules():  # the authors' initialisation: N(0, 0.02) weights, zero biases
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images(self.noise), self.labels(self.noise).softmax(1)


def run_grnn(
    model: nn.Module,
    update: SharedUpdate,
    input_shape: tuple[int, ...],
    num_classes: int,
    cfg: AttackConfig,
    observe: Observer,
) -> Reconstruction:
    """GRNN on one shared update, each of cfg.restarts from its own noise and initialisation; the best kept."""
    require_images(input_shape, "grnn")
    results = [grnn_restart(model, update, input_shape, num_classes, cfg, r) for r in range(cfg.restarts)]
    return best_of_restarts(results, observe)


def grnn_restart(
    model: nn.Module,
    update: SharedUpdate,
    input_shape: tuple[int, ...],
    num_classes: int,
    cfg: AttackConfig,
    restart: int,
) -> tuple[Reconstruction, Trajectory]:
    """Train the generator and label branch with RMSprop on ||dg||^2 + ||dg|| + TV, dg the difference between
    the candidate's gradient (through the mechanism, attacks/matching.py) and the shared one."""
    device = next(model.parameters()).device
    net = GRNN(num_reconstructed(update), input_shape, num_classes, cfg.seed * 1000 + restart).to(device)
    optimizer = torch.optim.RMSprop(net.parameters(), lr=GRNN_LR, momentum=GRNN_MOMENTUM)
    trajectory = Trajectory(cfg.iterations, cfg.log_every)
    for iteration in range(cfg.iterations + 1):
        images, soft = net()
        squared = matching_losses(model, images[None], soft[None], update, "l2")[0]
        loss = squared + squared.clamp_min(1e-30).sqrt() + GRNN_TV * total_variation(images)
        trajectory.log(iteration, images, soft.argmax(1), float(loss.detach()))
        if iteration == cfg.iterations or not torch.isfinite(loss):
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return Reconstruction(images.detach(), soft.detach().argmax(1).cpu(), float(loss.detach())), trajectory


GGL_SETTINGS = ("generator", "generator_epochs", "ggl_optimizer")  # the AttackConfig fields ggl reads
ATTACKS = {
    "ggl": Attack(
        run_ggl,
        300,
        description="GGL: latent search of a generator trained on auxiliary data (CMA-ES or Adam)",
        settings=GGL_SETTINGS,
        learn=learn_ggl,
    ),
    "grnn": Attack(run_grnn, 1000, description="GRNN: generator and label branch trained to match the gradient"),
}
