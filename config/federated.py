"""The federation's defaults (`uv run federated.py`): FederatedConfig, validated like the other configs of this
package before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from config import MAX_EPOCHS
from utils import UsageError

FEDERATED_PRIVACY = ("none", "dp-sgd", "dp-fedavg", "secagg")  # what a federated client may add to its update


@dataclass
class FederatedConfig:
    """The federation: K clients with Dirichlet(α) non-IID shares of a dataset train one model with FedAvg on
    Flower's simulation engine, under client privacy none, dp-sgd:EPS (Opacus inside every client),
    dp-fedavg:EPS (client-level DP, Flower's server-side clipping wrapper) or secagg (SecAgg+: the server sees
    only the sum). At --attack-rounds the server hands a client's update to --attack and scores what it rebuilds
    of that client's data; writes runs/federated/<run>/."""

    dataset: str = "digits"  # embedded, offline; 1347 training images: 10 clients hold ~135 each
    model: str = "cnn"
    """any of cnn cnn-wide lenet mlp fcnn resnet50 dinov2; cnn: ~0.95 digits accuracy in the default rounds, and a
    hidden FC layer that the malicious servers' traps (rtf, giavmp) need"""
    clients: int = 10  # K simulated clients (SuperNodes), each holding one partition
    alpha: float = 0.5
    """Dirichlet concentration of each class's split over the clients: 0.5 gives each client a few dominant
    classes (the usual non-IID benchmark setting); large (e.g. 1000) is IID"""
    fraction: float = 1.0  # share of the clients sampled per round (at least one)
    rounds: int = 15  # R FedAvg rounds: the cnn reaches ~0.95 on digits at α = 0.5 by then
    local_epochs: int = 1  # E epochs of local SGD per round, over the client's whole partition
    batch_size: int = 16  # local batch size B (DP-SGD: the expected size of Opacus' Poisson batches)
    lr: float = 0.05  # local plain SGD (no momentum: the update is lr times the sum of the local gradients)
    privacy: str = "none"
    """none, dp-sgd:EPS (sample-level DP-SGD in each client, ε over its R rounds), dp-fedavg:EPS (client-level DP:
    updates clipped to --clipping-norm, Gaussian noise on the average; z from the accountant with sampling rate
    --fraction over R rounds), or secagg (SecAgg+)"""
    max_grad_norm: float = 1.0  # dp-sgd: per-sample clipping bound C, as in the training study
    clipping_norm: float = 1.0
    """dp-fedavg: bound on each client's update norm (digits cnn updates are ~0.5-2 in the first rounds)"""
    delta: float = 1e-5  # DP δ: below 1/n for a client's n samples (dp-sgd) and below 1/K (dp-fedavg)
    accountant: str = "rdp"  # Opacus accountant for every ε here (rdp, prv or gdp); rdp handles rate 1
    attack: str = "ig-weight"
    """the server's attack at --attack-rounds: the FedAvg attacks that read the update as the client's local work
    (ig-weight: one gradient of all its samples; ig-multi, dlf: its local SGD simulated on dummy data), any of
    gradient_attack.py's (ig, dlg, fc-readout, ...), or the malicious servers rtf/giavmp, which send one client a
    trap model in that round. ig-weight: on the default run's round 1 (the smallest client's 29 digits, 2 steps)
    10.0 dB in 63 s, against ig-multi's 9.5 dB in 85 s at as many iterations (dlf = ig-multi at one epoch; 8.9 dB
    at their default 200) and ig's 9.6 dB (one batch of 16)"""
    attack_rounds: list[int] = field(default_factory=lambda: [1])
    """rounds (1..R) in which the server attacks: the smallest sampled client's update (under secagg the round's
    sum); empty: an honest server"""
    attack_iterations: int | None = None  # the attack's iterations; default as in gradient_attack.py
    attack_restarts: int = 1  # random initialisations of optimisation attacks
    trap_batch_size: int = 64
    """malicious servers: the batch size the server asks of the trapped client, for one local step (the server
    sets the round's local work; 64 is the gradient-mode goal's setting)"""
    trap_lr: float = 1e4
    """malicious servers: the learning rate asked of the trapped client. Clients return weights in float32, and
    w - lr g keeps g's digits only where lr g is not tiny next to w: RtF read 0.44 of a batch of 64 off a real
    round at the honest 0.05, 0.94 at 100, and 0.98 offline at 10^4 (the client checks accuracy, not the lr)"""
    poisoning_max_drop: float = 0.1  # the client flags a received model this much less accurate than the last one
    log_every: int = 100  # attack iterations between logged scores and snapshots (of all the update's images)
    success_ssim: float = 0.5  # SSIM from which a reconstruction counts as a success, as in the leakage study
    dmgan_client: int | None = None
    """partition id (0..K-1) of a malicious client that plays DMGAN (Hitaj et al. 2017) in every round it is
    sampled: it drops its samples of --dmgan-class, trains a generator against the global model (which gets one
    extra 'fake' class) and adds generated images labelled fake to its local data; its images are scored into
    <run>/dmgan.csv. None: every client is honest"""
    dmgan_class: int = 3  # the class the DMGAN client lacks and wants images of
    client_cpus: float = 1.0  # CPUs Flower's simulation engine (Ray) reserves per client: 2 run at once on 2 cores
    seed: int = 0  # partitions, initial model, client batches, DP noise, attacks; in the run name
    threads: int = 1  # torch CPU threads per process: the small models train fastest on one
    test_fraction: float = 0.25  # held-out share: the server's global test accuracy
    image_size: int = 64  # side length for image folders
    data_root: Path = Path("data")  # where downloaded and image-folder datasets live
    download: bool = True  # fetch torchvision datasets into data_root when missing
    out: Path = Path("runs/federated")  # one directory per run; summary.csv / summary.md of every finished one
    force: bool = False  # redo a run that already finished

    @property
    def privacy_name(self) -> str:
        return self.privacy.partition(":")[0]

    @property
    def privacy_epsilon(self) -> float | None:
        value = self.privacy.partition(":")[2]
        return float(value) if value else None

    @property
    def sampled_clients(self) -> int:
        """Clients per round, as Flower's FedAvg samples them: int(K * fraction), at least one."""
        return max(1, int(self.clients * self.fraction))

    def validate(self) -> None:
        from attacks import ATTACKS
        from data_sources import check_dataset_name
        from models import check_model_name
        from privacy import ACCOUNTANTS, PRV_MAX_EPSILON

        check_dataset_name(self.dataset)
        check_model_name(self.model)
        if not 2 <= self.clients <= 10_000:
            raise UsageError(f"--clients {self.clients} must lie in [2, 10000] (10 by default).")
        if not self.alpha > 0:
            raise UsageError(f"--alpha {self.alpha} must be positive: 0.5 is non-IID, 1000 about IID.")
        if not 0 < self.fraction <= 1:
            raise UsageError(f"--fraction {self.fraction} must lie in (0, 1]: the share of clients sampled per round.")
        for name, value, most in (("rounds", self.rounds, MAX_EPOCHS), ("local-epochs", self.local_epochs, 1000)):
            if not 1 <= value <= most:
                raise UsageError(f"--{name} {value} must lie in [1, {most}].")
        for name, value in (("batch-size", self.batch_size), ("trap-batch-size", self.trap_batch_size)):
            if value < 1:
                raise UsageError(f"--{name} {value} must be at least 1.")
        for name, value in (
            ("lr", self.lr),
            ("trap-lr", self.trap_lr),
            ("max-grad-norm", self.max_grad_norm),
            ("clipping-norm", self.clipping_norm),
        ):
            if not value > 0:
                raise UsageError(f"--{name} {value} must be positive.")
        name, _, strength = self.privacy.partition(":")
        if name not in FEDERATED_PRIVACY or (name in ("none", "secagg")) == bool(strength):
            raise UsageError(
                f"--privacy '{self.privacy}' is not one of none, dp-sgd:EPS, dp-fedavg:EPS or secagg (e.g. dp-sgd:8)."
            )
        if strength:
            try:
                eps = float(strength)
            except ValueError:
                raise UsageError(
                    f"--privacy '{self.privacy}': '{strength}' is not a number; give an ε such as 8."
                ) from None
            if not 0 < eps <= PRV_MAX_EPSILON:
                raise UsageError(f"--privacy '{self.privacy}': ε must lie in (0, {PRV_MAX_EPSILON:g}].")
        if not 0 < self.delta < 1 / self.clients:
            raise UsageError(f"--delta {self.delta} must lie in (0, 1/K) = (0, {1 / self.clients:.3g}); 1e-5 is usual.")
        if self.accountant not in ACCOUNTANTS:
            raise UsageError(f"unknown accountant '{self.accountant}'; choose from {', '.join(ACCOUNTANTS)}.")
        if name == "secagg" and self.sampled_clients < 3:
            raise UsageError(
                f"--privacy secagg needs at least 3 clients per round (SecAgg+ shares keys among them), but --clients "
                f"{self.clients} at --fraction {self.fraction} samples {self.sampled_clients}."
            )
        if self.attack not in ATTACKS:
            raise UsageError(f"unknown attack '{self.attack}'; choose from {', '.join(ATTACKS)}.")
        if ATTACKS[self.attack].prepare and name == "secagg":
            raise UsageError(
                f"--attack {self.attack} sends one client a trap model whose update has other shapes than the rest; "
                "under secagg it cannot be summed with them. Use an honest attack (e.g. ig) or another --privacy."
            )
        bad = [r for r in self.attack_rounds if not 1 <= r <= self.rounds]
        if bad:
            raise UsageError(f"--attack-rounds {bad} lie outside the rounds 1..{self.rounds}.")
        if self.attack_iterations is not None and self.attack_iterations < 1:
            raise UsageError(f"--attack-iterations {self.attack_iterations} must be at least 1.")
        for name_, value in (("attack-restarts", self.attack_restarts), ("log-every", self.log_every)):
            if value < 1:
                raise UsageError(f"--{name_} {value} must be at least 1.")
        if not 0 <= self.poisoning_max_drop <= 1:
            raise UsageError(f"--poisoning-max-drop {self.poisoning_max_drop} must lie in [0, 1], e.g. 0.1.")
        if not 0 < self.success_ssim <= 1:
            raise UsageError(f"--success-ssim {self.success_ssim} must lie in (0, 1].")
        if self.dmgan_client is not None and not 0 <= self.dmgan_client < self.clients:
            raise UsageError(f"--dmgan-client {self.dmgan_client} must be a partition id in 0..{self.clients - 1}.")
        if self.dmgan_class < 0:
            raise UsageError(f"--dmgan-class {self.dmgan_class} must be a class index (0 or more).")
        if not 0 < self.client_cpus <= 256:
            raise UsageError(f"--client-cpus {self.client_cpus} must lie in (0, 256] (1 runs two clients on 2 cores).")
        if self.threads < 1:
            raise UsageError(f"--threads {self.threads} must be at least 1.")
        if not 0 < self.test_fraction < 1:
            raise UsageError(f"--test-fraction {self.test_fraction} must lie in (0, 1).")
