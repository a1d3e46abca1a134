"""Every default of the project, as plain dataclasses (the federation's in config/federated.py). Edit a field
to change what a command does by default; every field is also a command-line option (`--epochs 20`,
`--models cnn resnet50`), through tyro. Each class validates itself before any work starts and raises
UsageError with the bad value and the allowed ones.

This module imports nothing heavy at the top (no torch): `--help` answers at once, and validation imports the
registries it checks against only when it runs."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro

from utils import UsageError

MAX_EPOCHS = 10_000  # far beyond any study here; 10^8 made the accountant ask for terabytes
MAX_CANARIES = 1_000_000  # canaries need distinct trainable coordinates (the digits cnn has 156 010)
MAX_PRIOR_SIZE = 10**9


@dataclass
class TrainConfig:
    """The training study: models x privacy settings on one dataset; writes runs/train."""

    dataset: str = "faces"
    """faces (default: embedded, offline, the stand-in for hot-dog), digits, breast-cancer, mnist, cifar10,
    cifar100, hotdog, or folder:PATH (PATH/{train,test}/<class>/*.jpg)"""
    models: list[str] = field(default_factory=lambda: ["cnn"])
    """any of cnn cnn-wide lenet mlp fcnn resnet50 dinov2"""
    privacy: list[str] = field(default_factory=lambda: ["none", "dp-sgd", "regularized"])  # training modes
    epsilons: list[float] = field(default_factory=lambda: [8.0, 25.0, 50.0])  # DP-SGD target ε, the seed study's
    delta: float = 1e-5  # must stay below 1/N for N training samples
    max_grad_norm: float = 1.0  # per-sample clipping bound C of DP-SGD
    accountant: str = "prv"  # Opacus' default accountant; rdp and gdp also work
    prior_size: int = 100
    """reconstruction-risk bound of every DP-SGD run against a prior of this many equally likely candidates
    (beside the bound for 10); it is read off the recorded noise, rate and steps, so changing it redoes nothing"""
    audit_canaries: int = 0
    """one-run privacy audit: train with this many gradient canaries (each a member with probability 1/2) and
    report two ε lower bounds at 95 % confidence (Steinke et al.'s and the f-DP one) beside the accountant's ε
    (0: no audit; 1000 to 10^5: more canaries, tighter bounds)"""
    epochs: int = 15  # faces: the plain CNN reaches ~0.98 test accuracy; the default study takes ~1 min on 2 CPUs
    batch_size: int = 32  # expected batch size; DP-SGD samples each example with rate batch_size / N
    lr: float = 0.05  # SGD learning rate (momentum 0.9)
    reg_sigma: float = 0.3
    """PDP-SGD noise scale σ; penalty weight κ = (lr · σ)². At σ = 1 the penalty swamps the cnn's loss (about
    5.5 vs 0.69 at initialisation on faces) and drives it to chance; at 0.3 it is about 0.5"""
    test_fraction: float = 0.25  # held-out share of the embedded sets (stratified, seeded)
    image_size: int = 64  # side length for image folders and photos; pretrained backbones resize to 224
    pretrained: bool = True  # --no-pretrained builds resnet50/dinov2 with random weights (smoke tests)
    feature_cache: bool = True  # head-only models train on backbone features computed once per split
    finetune: str = "head"
    """resnet50/dinov2: head (train a linear head on the frozen backbone) or full (train the backbone end to end,
    its BatchNorms replaced by GroupNorms through Opacus' ModuleValidator.fix, as DP-SGD needs)"""
    grad_sample_mode: str = "auto"
    """Opacus' per-sample gradient engine for DP-SGD: hooks, functorch, ew (expanded weights), ghost (fast
    gradient clipping), bk (book-keeping on Opacus' ghost-mode hooks, bookkeeping.py), or auto: the fastest that
    handles the model (bench/dp_engine_bench.py)"""
    workers: int = 1  # runs trained at once, each in its own local Ray worker (1: one after another, no Ray)
    ray_address: str | None = None  # an existing Ray cluster to run the study's runs on (e.g. auto, ray://host:10001)
    seed: int = 0  # one seed for the split, the initialisation, the batches and the noise; in the run names
    device: str = "auto"  # auto (cuda when available, else cpu), cpu, cuda or cuda:N
    threads: int = 1
    """torch CPU threads (0: torch's default, one per core, worth it for resnet50/dinov2); the cnn trained 25x
    faster on 1 than on 2 on a busy 2-core CPU"""
    data_root: Path = Path("data")  # where downloaded and image-folder datasets live
    download: bool = True  # fetch torchvision datasets into data_root when missing
    out: Path = Path("runs/train")  # one directory per run, and summary.csv / summary.md of every finished one
    force: bool = False  # redo runs that already finished

    def validate(self) -> None:
        from data_sources import check_dataset_name
        from models import check_model_name
        from privacy import ACCOUNTANTS, PRIVACY_MODES, PRV_MAX_EPSILON

        check_dataset_name(self.dataset)
        if not self.models:
            raise UsageError("--models is empty; name at least one model.")
        for name in self.models:
            check_model_name(name)
        for mode in self.privacy:
            if mode not in PRIVACY_MODES:
                raise UsageError(f"unknown privacy mode '{mode}'; choose from {', '.join(PRIVACY_MODES)}.")
        if "dp-sgd" in self.privacy and not self.epsilons:
            raise UsageError("--privacy includes dp-sgd but --epsilons is empty; give e.g. --epsilons 8 25 50.")
        for eps in self.epsilons:
            if not eps > 0:
                raise UsageError(f"epsilon {eps} is not positive; a privacy budget must be > 0 (e.g. 1, 8, 50).")
        if self.accountant not in ACCOUNTANTS:
            raise UsageError(f"unknown accountant '{self.accountant}'; choose from {', '.join(ACCOUNTANTS)}.")
        if self.accountant == "prv" and "dp-sgd" in self.privacy and max(self.epsilons) > PRV_MAX_EPSILON:
            raise UsageError(
                f"epsilon {max(self.epsilons):g} is above {PRV_MAX_EPSILON:g}, where the prv accountant's noise search "
                "becomes numerically unstable and takes minutes; use --accountant rdp for such budgets."
            )
        if not self.max_grad_norm > 0:
            raise UsageError(f"--max-grad-norm {self.max_grad_norm} must be positive (e.g. 1.0).")
        check_prior_size(self.prior_size)
        if not 0 <= self.audit_canaries <= MAX_CANARIES:
            raise UsageError(
                f"--audit-canaries {self.audit_canaries} must lie in [0, {MAX_CANARIES}] (0: no audit; 1000 is typical)."
            )
        if self.audit_canaries and self.accountant == "gdp":  # a central-limit approximation, not an upper bound
            raise UsageError(
                "--audit-canaries with --accountant gdp: an audit checks a lower bound against the accountant's ε, "
                "and gdp's ε is an approximation that can fall below the true ε (its search also fails at the "
                "little noise a plain run's audit reaches); use --accountant prv or rdp."
            )
        if not 1 <= self.epochs <= MAX_EPOCHS:
            raise UsageError(
                f"--epochs {self.epochs} must lie in [1, {MAX_EPOCHS}]: the accountant's work and memory grow with the "
                "number of steps (15 train the cnn on faces)."
            )
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size} must be at least 1.")
        if not self.lr > 0:
            raise UsageError(f"--lr {self.lr} must be positive.")
        if not 0 < self.test_fraction < 1:
            raise UsageError(f"--test-fraction {self.test_fraction} must lie in (0, 1).")
        if self.reg_sigma < 0:
            raise UsageError(f"--reg-sigma {self.reg_sigma} must be >= 0.")
        if self.threads < 0:
            raise UsageError(f"--threads {self.threads} must be >= 0 (0 keeps torch's default).")
        self.check_scale()

    def check_scale(self) -> None:
        """The options past one process: engine, fine-tuning, Ray workers, torchrun."""
        from parallel import check_workers, launched_processes
        from privacy import GRAD_SAMPLE_MODES

        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise UsageError(
                f"--grad-sample-mode '{self.grad_sample_mode}' is unknown; choose from {', '.join(GRAD_SAMPLE_MODES)}."
            )
        if self.finetune not in ("head", "full"):
            raise UsageError(f"--finetune '{self.finetune}' is unknown; choose head (a linear head) or full.")
        check_workers(self.workers, self.ray_address)
        if launched_processes() > 1 and (self.workers > 1 or self.ray_address):
            raise UsageError(
                "torchrun trains each run with all its processes; --workers/--ray-address run several runs at once. "
                "Use one or the other: drop --workers/--ray-address under torchrun, or run without torchrun."
            )
        if launched_processes() > 1 and self.audit_canaries:
            raise UsageError("--audit-canaries observes the noisy sum of one process; run the audit without torchrun.")

    def validate_data(self, num_train: int) -> None:
        """Checks that need the training-set size N."""
        if self.batch_size > num_train:
            raise UsageError(
                f"--batch-size {self.batch_size} is larger than the {num_train} training samples of "
                f"'{self.dataset}'; use at most {num_train}."
            )
        if "dp-sgd" in self.privacy and not 0 < self.delta < 1 / num_train:
            raise UsageError(
                f"--delta {self.delta} must lie in (0, 1/N) = (0, {1 / num_train:.3g}) for the {num_train} "
                f"training samples of '{self.dataset}'; 1e-5 is the usual choice."
            )


# the seed study's budgets, the regularized mode, and one setting of each classic gradient defense
DEFAULT_MECHANISMS = "none dp-sgd:8 dp-sgd:25 dp-sgd:50 regularized prune:0.2 quantize:4 noise:0.01 topk:0.1".split()
# what a plainly trained run shares besides its plain gradient: each gradient defense at its default strength
DEFAULT_DEFENSES = "prune:0.2 quantize:4 noise:0.01 topk:0.1".split()
DEMO_MODEL, DEMO_DATASET = "lenet", "digits"  # the demonstration victim when no training run exists


@dataclass
class AttackConfig:
    """The leakage study: by default every finished training run under --train-runs, each attacked under its
    own privacy mode (a plain run also under each gradient defense) with the strongest attack the server can
    choose (auto); writes runs/attack. Mechanisms read name[:strength] (sweeps name:a,b,c): none, dp-sgd[:EPS],
    regularized, prune:P, quantize:BITS, noise:SIGMA, topk:K, secagg:CLIENTS."""

    from_run: list[str] = field(default_factory=list)
    """train.py run directories or globs (runs/train/*): the victims"""
    train_runs: Path = Path("runs/train")  # without --from-run/--model: attack every finished run found here
    model: str | None = None
    """a fresh victim instead: lenet cnn cnn-wide mlp fcnn resnet50 dinov2 (with no training run at all, the
    demonstration victim: a fresh lenet, the DLG LeNet, on digits)"""
    dataset: str | None = None
    """the fresh victim's data (default digits): faces, digits, breast-cancer, photos, mnist, cifar10, cifar100,
    hotdog or folder:PATH; trained victims use their own"""
    pretrained: bool = True  # a fresh resnet50/dinov2's weights; --no-pretrained for random ones offline
    indices: list[int] = field(default_factory=list)  # training-set indices to attack; default a seeded draw
    num_images: int = 4  # images in the seeded draw
    images: list[Path] = field(default_factory=list)  # the user's own image files instead of the dataset
    labels: list[int] = field(default_factory=list)  # their labels; default class 0 for every file
    num_classes: int = 10  # classes of a fresh victim built for --images without a --dataset
    batch_sizes: Annotated[list[int], tyro.conf.arg(aliases=("--batch-size",))] = field(default_factory=lambda: [1])
    """images per shared update; one run per batch size, e.g. 1 2 4 8"""
    mechanisms: list[str] = field(default_factory=list)
    """what the client shares, name[:strength] (sweeps name:a,b,c): none dp-sgd[:EPS] regularized prune:P
    quantize:BITS noise:SIGMA topk:K secagg:CLIENTS, for every victim; empty: each victim's own (a plain run
    none and each gradient defense, a DP-SGD run dp-sgd at its own ε, a regularized run regularized), and the
    whole default grid for the demonstration victim"""
    attacks: Annotated[list[str], tyro.conf.arg(aliases=("--attack",))] = field(default_factory=lambda: ["auto"])
    """auto, or any of fc-readout fc-peel cpa ig idlg dlg dlg-adam ig-naive dlg-naive giavmp rtf ggl grnn, and on a
    FedAvg update (--local-epochs/--local-batches) ig-weight ig-multi dlf fc-peel. auto runs every honest attack that
    applies to the victim (fc-readout, ig, and idlg on smooth networks; for batch sizes above 1 also fc-peel,
    and cpa on fully connected victims; fc-readout alone on a frozen backbone's head), each in its own run, and
    keeps per batch the one whose reconstruction best explains the shared update. prior-aware (alone) watches
    DP-SGD train a fresh model and picks the target among 10
    candidates, --trials times per ε: the attack that shows whether the bound on any attack is tight"""
    iterations: int | None = None  # per 1024 input values: 100 L-BFGS (dlg, idlg), 1000 Adam (dlg-adam, ig)
    local_epochs: int = 1
    """attack a FedAvg client's weight update instead of one gradient: its local epochs of SGD over its
    --local-batches x batch-size images (with --attacks ig-weight ig-multi dlf)"""
    local_batches: int = 1  # ... and the batches of --batch-size images it holds (local steps: epochs x batches)
    restarts: int = 1  # random initialisations per batch (one batched optimisation); the best match is kept
    log_every: int = 10  # iterations between logged scores and snapshots
    success_ssim: float = 0.5  # SSIM from which a reconstruction counts as a success (recognisable)
    trials: int = 100  # prior-aware: DP-SGD trainings watched per ε (the success rate's 95 % interval is about ±0.1)
    prior_size: int = 100
    """bound on any reconstruction of a dp-sgd release against a prior of this many equally likely candidates
    (beside the bound for 10), in summary.csv"""
    threads: int = 1  # torch CPU threads: per-image attack ops are too small to gain from more
    seed: int = 0  # one seed for the image draw, the client's noise and the attacks' initialisations
    device: str = "auto"  # auto (cuda when available, else cpu), cpu, cuda or cuda:N
    image_size: int = 32  # side of photos and image folders for a fresh victim: the CIFAR size DLG was shown on
    data_root: Path = Path("data")  # where downloaded and image-folder datasets live
    download: bool = False  # the attack study reads data already there; train.py downloads
    out: Path = Path("runs/attack")  # one directory per run, and summary.csv / summary.md of every finished one
    force: bool = False  # redo runs that already finished
    inversion_steps: int = 1000
    """feature inversion (fc-readout on a CNN or a frozen backbone, giavmp on a CNN): Adam steps turning the
    features read off the FC layer into images"""
    inversion_restarts: int = 8
    """one sample on a CNN: restarts of the inversion from the last convolution's input (recovered exactly), run
    as one batch; the best third is averaged"""
    inversion_gradient_weight: float = 0.1
    """weight of the conv-gradient match relative to the feature term's pull (0: features only); level with
    feature matching alone in our measurements, at 2-3x the cost"""
    giavmp_per_sample: int = 4  # GIAvMP: lone-neuron activations per auxiliary sample the malicious layer aims for
    rtf_bins: int = 128  # RtF imprint neurons K; one statistic leaves a sample alone w.p. (1 - 1/K)^(B - 1)
    rtf_measurements: int = 0
    """RtF: statistics the K neurons are split among (0: for each batch size, the count whose simulated readout
    recovers most: 2-3 for B < K = 128, as peeling across statistics resolves shared bins)"""
    rtf_measurement: str = "random"  # RtF's first statistic h(x): random (unit direction) or brightness
    rtf_thresholds: str = "gaussian"  # RtF bins at the quantiles of a normal fit to h on aux data, or empirical
    honest_epochs: int = 5
    """giavmp/rtf on a fresh victim: epochs of honest training on aux data before poisoning, so the detector
    compares a trained model (~0.9 digits accuracy) with the poisoned one; trained victims keep theirs"""
    poisoning_max_drop: float = 0.1  # the client's detector flags a received model this much less accurate
    cache_dir: Path = Path("runs/cache")  # fitted malicious layers, keyed by their settings and aux data
    workers: int = 1  # cells attacked at once, each in its own local Ray worker (1: one after another, no Ray)
    ray_address: str | None = None  # an existing Ray cluster to run the study's cells on (e.g. auto, ray://host:10001)
    generator: Path | None = None
    """ggl: a generator of your own (safetensors with ggl's metadata) instead of the one the server trains on its
    auxiliary data and caches in --cache-dir (once per dataset, seed and auxiliary split)"""
    generator_epochs: int = 40  # ggl: epochs of the conditional VAE whose decoder is the generator
    ggl_optimizer: str = "auto"
    """ggl's latent search: cma (CMA-ES), adam, or auto: CMA-ES under prune, topk and quantize, whose masks and
    bins block the gradient path, Adam otherwise (the paper's choice)"""

    @property
    def fresh_victim(self) -> bool:
        """Whether the victim is a freshly built model (--model or --dataset given) rather than training runs."""
        return self.model is not None or self.dataset is not None

    def check_prior_aware(self) -> None:
        """prior-aware watches DP-SGD train a fresh model: it runs alone, on dp-sgd mechanisms with an ε."""
        from defenses import parse_mechanisms

        if self.attacks != ["prior-aware"] or self.from_run or self.images:
            raise UsageError(
                "--attacks prior-aware watches DP-SGD train a fresh model (--model, --dataset; mlp on digits by "
                "default), so it runs on its own: without other attacks, --from-run or --images."
            )
        specs = parse_mechanisms(self.mechanisms) if self.mechanisms else []
        if any(spec.name != "dp-sgd" or spec.strength is None for spec in specs):
            raise UsageError(
                f"--attacks prior-aware attacks DP-SGD training at a given ε; --mechanisms {' '.join(self.mechanisms)} "
                "must all be dp-sgd:EPS (e.g. dp-sgd:1,4,8,16, the default)."
            )
        if not 1 <= self.trials <= 100_000:
            raise UsageError(f"--trials {self.trials} must lie in [1, 100000] (100 give an interval of about ±0.1).")

    def validate(self) -> None:
        from attacks import ATTACKS
        from data_sources import check_dataset_name
        from defenses import parse_mechanisms
        from models import check_model_name
        from parallel import check_workers

        check_workers(self.workers, self.ray_address)
        if self.from_run and self.fresh_victim:
            raise UsageError(
                "--from-run attacks trained models on their own data; --model/--dataset build a fresh one. "
                "Give one or the other."
            )
        if self.dataset is not None:
            check_dataset_name(self.dataset)
        if self.model is not None:
            check_model_name(self.model)
        if not self.attacks:
            raise UsageError(f"--attacks is empty; name auto or at least one of {', '.join(ATTACKS)}.")
        for name in self.attacks:
            if name not in ATTACKS and name not in ("auto", "prior-aware"):
                raise UsageError(f"unknown attack '{name}'; choose auto, prior-aware or any of {', '.join(ATTACKS)}.")
        if "prior-aware" in self.attacks:
            self.check_prior_aware()
        if self.mechanisms:
            parse_mechanisms(self.mechanisms)
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise UsageError(f"--batch-sizes {self.batch_sizes} must be positive integers, e.g. 1 2 4 8.")
        if len(set(self.indices)) != len(self.indices):
            repeated = sorted({i for i in self.indices if self.indices.count(i) > 1})
            raise UsageError(f"--indices repeats {repeated}; give each training image once.")
        if self.images and self.indices:
            raise UsageError("give either --images (your own files) or --indices (dataset images), not both.")
        if self.labels and len(self.labels) != len(self.images):
            raise UsageError(f"--labels has {len(self.labels)} entries for {len(self.images)} --images; give one each.")
        if self.num_classes < 2:
            raise UsageError(f"--num-classes {self.num_classes} must be at least 2.")
        if self.num_images < 1:
            raise UsageError(f"--num-images {self.num_images} must be at least 1.")
        if self.local_epochs < 1 or self.local_batches < 1:
            raise UsageError(
                f"--local-epochs {self.local_epochs} and --local-batches {self.local_batches} must be at least 1 "
                "(1 and 1: one gradient step, the default; e.g. 10 and 10 for Dimitrov et al.'s FedAvg setting)."
            )
        if self.local_epochs * self.local_batches > 1:
            from attacks.federated import ATTACKS as FEDAVG_ATTACKS

            # fc-peel reads a weight update too (attacks/multistep.py)
            wrong = [a for a in self.attacks if a not in FEDAVG_ATTACKS and a != "fc-peel"]
            if wrong:
                raise UsageError(
                    f"--local-epochs {self.local_epochs} --local-batches {self.local_batches} make the client share a "
                    f"FedAvg weight update, which {' '.join(wrong)} cannot read; use --attacks "
                    f"{' '.join(FEDAVG_ATTACKS)} fc-peel (or drop the local options for one gradient step)."
                )
        if self.iterations is not None and self.iterations < 1:
            raise UsageError(f"--iterations {self.iterations} must be at least 1.")
        if self.restarts < 1:
            raise UsageError(f"--restarts {self.restarts} must be at least 1.")
        if self.log_every < 1:
            raise UsageError(f"--log-every {self.log_every} must be at least 1.")
        if not 0 < self.success_ssim <= 1:
            raise UsageError(f"--success-ssim {self.success_ssim} must lie in (0, 1].")
        check_prior_size(self.prior_size)
        if self.threads < 1:
            raise UsageError(f"--threads {self.threads} must be at least 1.")
        if self.image_size < 4:
            raise UsageError(f"--image-size {self.image_size} must be at least 4 pixels.")
        if self.giavmp_per_sample < 1:
            raise UsageError(f"--giavmp-per-sample {self.giavmp_per_sample} must be at least 1 (e.g. 4).")
        if self.rtf_bins < 2:
            raise UsageError(f"--rtf-bins {self.rtf_bins} must be at least 2; use at least the batch size (e.g. 128).")
        if not 0 <= self.rtf_measurements <= self.rtf_bins // 2:
            raise UsageError(
                f"--rtf-measurements {self.rtf_measurements} must lie in [0, {self.rtf_bins // 2}] (at least 2 bins "
                f"per statistic for --rtf-bins {self.rtf_bins}); 0 picks the count for the batch sizes."
            )
        if self.rtf_thresholds not in ("gaussian", "empirical"):
            raise UsageError(f"--rtf-thresholds '{self.rtf_thresholds}' is unknown; choose gaussian or empirical.")
        if self.honest_epochs < 0:
            raise UsageError(f"--honest-epochs {self.honest_epochs} must be >= 0 (0 sends the fresh model).")
        if not 0 <= self.poisoning_max_drop <= 1:
            raise UsageError(f"--poisoning-max-drop {self.poisoning_max_drop} must lie in [0, 1], e.g. 0.1.")
        if not 0 <= self.inversion_gradient_weight <= 10:
            raise UsageError(
                f"--inversion-gradient-weight {self.inversion_gradient_weight} must lie in [0, 10] (0.1 by default; "
                "0 inverts the conv features by feature matching alone)."
            )
        if self.inversion_restarts < 1:
            raise UsageError(f"--inversion-restarts {self.inversion_restarts} must be at least 1 (e.g. 8).")
        if self.inversion_steps < 1:
            raise UsageError(f"--inversion-steps {self.inversion_steps} must be at least 1 (e.g. 200).")
        if self.rtf_measurement not in ("random", "brightness"):
            raise UsageError(f"--rtf-measurement '{self.rtf_measurement}' is unknown; choose random or brightness.")
        self.check_generative()

    def check_generative(self) -> None:
        """ggl's options, and its generator file (missing or not safetensors) before any work."""
        from attacks.generative import generator_metadata

        if self.ggl_optimizer not in ("auto", "cma", "adam"):
            raise UsageError(f"--ggl-optimizer '{self.ggl_optimizer}' is unknown; choose auto, cma or adam.")
        if self.generator_epochs < 1:
            raise UsageError(f"--generator-epochs {self.generator_epochs} must be at least 1 (e.g. 40).")
        if self.generator is not None:
            generator_metadata(self.generator)
        elif "ggl" in self.attacks and self.images and self.dataset is None and self.model is not None:
            raise UsageError(
                "ggl trains its generator on auxiliary data other than the victim's images, and a fresh victim on "
                "your --images has no other data; name the dataset they come from (--dataset) or give --generator."
            )


def parse(cls: type, args: list[str] | None = None):
    """Build a config from the command line (defaults from the dataclass) and validate it: first what every
    command shares (finite numbers, the seed, the device), then the class's own checks."""
    cfg = tyro.cli(cls, args=args, description=inspect.cleandoc(cls.__doc__))
    check_common(cfg)
    cfg.validate()
    return cfg


def check_prior_size(prior_size: int) -> None:
    """A prior of n candidates has baseline success 1/n: n must be at least 2."""
    if not 2 <= prior_size <= MAX_PRIOR_SIZE:
        raise UsageError(
            f"--prior-size {prior_size} must lie in [2, {MAX_PRIOR_SIZE}]: the reconstruction bound is for an "
            "attacker choosing among that many equally likely candidates (e.g. 10, 100, 1000)."
        )


def check_common(cfg) -> None:
    """No option may be NaN or infinite (they train garbage that looks finished); a seed must be one numpy and
    torch accept; a device must be one torch knows."""
    for item in dataclasses.fields(cfg):
        value = getattr(cfg, item.name)
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
            shown = " ".join(map(str, default)) if isinstance(default, list) else default
            raise UsageError(
                f"--{item.name.replace('_', '-')} {bad[0]} is not a finite number; give an ordinary one (default: {shown})."
            )
    seed = getattr(cfg, "seed", 0)
    if not 0 <= seed < 2**32:
        raise UsageError(f"--seed {seed} must lie in [0, 2^32); e.g. 0, 1, 2 for repeated studies.")
    device = getattr(cfg, "device", "auto")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise UsageError(f"--device '{device}' is unknown; use auto (cuda when there is one), cpu, cuda or cuda:N.")


@dataclass
class AnalysisConfig:
    """The analysis: reads the finished runs under --runs and writes figures and report.md to --out."""

    runs: Path = Path("runs")  # holds train/ (from train.py) and attack/ (from gradient_attack.py)
    out: Path = Path("runs/report")
    """figures and report.md (the README's own figures are made with --out static)"""
    ssim_threshold: float = 0.5  # below this final SSIM an attack "stops working"; matches the attack's success_ssim
    prior_size: int = 100  # reconstruction bounds against a prior of this many candidates, beside 10
    dpi: int = 200  # print quality
    max_images: int = 8  # rows (images) shown per reconstruction grid; more make unreadable figures
    max_snapshots: int = 8  # columns (iterations) shown per reconstruction-evolution figure

    def validate(self) -> None:
        if not 0 < self.ssim_threshold <= 1:
            raise UsageError(
                f"--ssim-threshold {self.ssim_threshold} must lie in (0, 1]: SSIM is 1 for an exact "
                "reconstruction; 0.5 is the usual line between recognisable and not."
            )
        check_prior_size(self.prior_size)
        if not 50 <= self.dpi <= 1200:
            raise UsageError(f"--dpi {self.dpi} must lie in [50, 1200]; 200 is print quality, 100 for quick looks.")
        if self.max_images < 1:
            raise UsageError(f"--max-images {self.max_images} must be at least 1.")
        if self.max_snapshots < 1:
            raise UsageError(f"--max-snapshots {self.max_snapshots} must be at least 1.")


from config.federated import FederatedConfig as FederatedConfig  # noqa: E402  (it uses the helpers above)
