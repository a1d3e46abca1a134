"""Past one process: DP-SGD trained by two gloo processes (torchrun), Opacus' engines against each other, full
fine-tuning, and a study grid on two Ray workers."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import config
import train
import utils
from models import FrozenBackbone, load_checkpoint, save_checkpoint
from privacy import choose_grad_sample_mode, engine_problem, make_private

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Opacus advice and hook notes, not findings
TIMING = {"train_seconds", "samples_per_second"}  # the only columns allowed to differ between equal studies


def torchrun(args: list[str], tmp_path: Path, processes: int = 2) -> str:
    """Run args under `torchrun --standalone --nproc_per_node processes`, the repository importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


NOISE_PROBE = """
    import json, sys
    import torch, torch.distributed as dist, torch.nn as nn
    from torch.utils.data import DataLoader, TensorDataset
    from parallel import join_process_group
    from privacy import make_private

    group, _ = join_process_group("cpu")
    result = {}
    for mode in ("hooks", "ghost", "bk"):
        torch.manual_seed(0)
        model = nn.Linear(50, 20)  # 1020 coordinates: the noise's spread is measured to about 2 %
        x, y = torch.randn(64, 50), torch.randint(0, 20, (64,))
        loader = DataLoader(TensorDataset(x, y), batch_size=16)  # Poisson rate 1/4: expected batch 16 in all
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        _, module, opt, criterion, _ = make_private(model, opt, loader, noise_multiplier=2.0, max_grad_norm=0.1,
                                                    accountant="rdp", seed=0, grad_sample_mode=mode)
        part = slice(8 * group.rank, 8 * group.rank + 8)  # each process's own 8 samples of the 16

        def step(z):
            opt.noise_multiplier = z
            opt.zero_grad()
            criterion(module(x[part]), y[part]).backward()
            opt.step()
            return torch.cat([p.grad.flatten() for p in model.parameters()])

        noisy, clean = step(2.0), step(0.0)
        both = [torch.zeros_like(noisy) for _ in range(group.world_size)]
        dist.all_gather(both, noisy)
        torch.manual_seed(0)
        twin = nn.Linear(50, 20)  # the same weights (lr 0 kept them), without Opacus' hooks
        reference = torch.zeros_like(clean)  # the clipped sum over both processes' samples, by hand
        for i in range(16):
            twin.zero_grad()
            nn.functional.cross_entropy(twin(x[i : i + 1]), y[i : i + 1]).backward()
            g = torch.cat([p.grad.flatten() for p in twin.parameters()])
            reference += g * min(1.0, 0.1 / (g.norm().item() + 1e-6))
        result[mode] = {"noise_std": (noisy - clean).std().item(), "one_noise_std": 2.0 * 0.1 / 16,
                        "same_on_every_process": all(torch.equal(b, noisy) for b in both),
                        "clean_error": (clean - reference / 16).abs().max().item()}
    if group.main:
        print(json.dumps(result))
"""


def test_two_processes_add_the_noise_once_per_step_to_the_sum_of_both_shares(tmp_path):
    """Opacus' DistributedDPOptimizer: rank 0 alone adds N(0, z²C²) to its clipped sum, the processes' sums are
    added, and the step is divided by the expected batch of all processes: the noise's spread is z·C/B, as in
    one process (not √2 times it, as noise from every process would give), and every process steps alike. The
    sums travel flattened in one all-reduce (privacy.reduce_in_one_bucket): the noiseless step is the clipped
    sum over both processes' samples, to float rounding."""
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(NOISE_PROBE))
    result = json.loads(torchrun([str(script)], tmp_path).strip().splitlines()[-1])
    for mode, r in result.items():
        assert 0.92 < r["noise_std"] / r["one_noise_std"] < 1.08, (mode, r)
        assert r["same_on_every_process"], mode
        assert r["clean_error"] < 1e-6, (mode, r)


def test_two_gloo_processes_spend_the_same_epsilon_and_learn_as_well_as_one(tmp_path):
    """The same (q, z, T), so the same ε, recorded once by rank 0; accuracy within a few points of one process."""
    args = ["--models", "cnn", "--privacy", "dp-sgd", "--epsilons", "50", "--epochs", "15", "--accountant", "rdp"]
    utils.run_cli(lambda: train.main([*args, "--out", str(tmp_path / "one")]))
    torchrun(["train.py", *args, "--out", str(tmp_path / "two")], tmp_path)
    (one,), (two,) = ([utils.read_json(p) for p in (tmp_path / d).glob("*/metrics.json")] for d in ("one", "two"))
    assert two["processes"] == 2 and one["processes"] == 1
    for key in ("epsilon", "noise_multiplier", "sample_rate", "steps"):
        assert two[key] == pytest.approx(one[key], rel=1e-9), key
    assert one["accuracy"] > 0.8  # the comparison means something only if one process learns
    assert abs(two["accuracy"] - one["accuracy"]) <= 0.08
    history = utils.read_csv(next((tmp_path / "two").glob("*/history.csv")))
    assert [int(r["epoch"]) for r in history] == list(range(1, 16))  # one writer, every epoch once


def _linear_conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 3 * 3, 8), nn.ReLU(), nn.Linear(8, 3),
    )  # fmt: skip


def _one_private_step(mode: str) -> list[torch.Tensor]:
    model = _linear_conv_model()
    torch.manual_seed(1)
    x, y = torch.rand(40, 1, 8, 8), torch.randint(0, 3, (40,))
    loader = DataLoader(TensorDataset(x, y), batch_size=10, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _, module, opt, criterion, loader = make_private(
        model, opt, loader, noise_multiplier=1.3, max_grad_norm=0.05, accountant="rdp", seed=3, grad_sample_mode=mode
    )
    xb, yb = next(iter(loader))
    assert len(yb) > 0
    opt.zero_grad()
    criterion(module(xb), yb).backward()
    opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_ghost_clipping_and_book_keeping_take_the_same_clipped_and_noised_step_as_hooks(mode):
    """Fast gradient clipping (ghost norms for the Linear layers, per-sample gradients for the rest) and
    book-keeping (one backward pass; a per-sample gradient norm for the first conv, whose T(p_in + p_out) >
    p_in·p_out, a Gram-matrix ghost norm for the second, per-sample gradients for the GroupNorm, the clipped sums
    as reweighted products) clip every sample to the same norm as the classic hooks, draw the same noise from
    the same seed and take the same step; the clip is far below the gradients' norms, so a wrong norm would
    show."""
    hooks, ghost = _one_private_step("hooks"), _one_private_step(mode)
    for h, g, p in zip(hooks, ghost, _linear_conv_model().parameters(), strict=True):
        assert not torch.allclose(h, p.detach())  # the step moved every parameter
        torch.testing.assert_close(g, h, atol=1e-6, rtol=1e-5)


def test_book_keeping_steps_on_an_empty_poisson_batch_with_noise_alone_and_keeps_no_state():
    """Poisson sampling can draw no sample: the step's gradient is then the noise alone (zero without noise), and
    the next batch's step is the one a fresh model takes, nothing of the empty one left in the hooks."""

    def private(model: nn.Module):
        x, y = torch.rand(40, 1, 8, 8), torch.randint(0, 3, (40,))
        loader = DataLoader(TensorDataset(x, y), batch_size=10)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        _, module, opt, criterion, _ = make_private(
            model,
            opt,
            loader,
            noise_multiplier=0.0,
            max_grad_norm=0.05,
            accountant="rdp",
            seed=3,
            grad_sample_mode="bk",
        )
        return module, opt, criterion, x[:10], y[:10]

    def step(module, opt, criterion, x, y) -> None:
        opt.zero_grad()
        criterion(module(x), y).backward()
        opt.step()

    module, opt, criterion, x, y = private(_linear_conv_model())
    step(module, opt, criterion, x[:0], y[:0])
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in module.parameters())
    step(module, opt, criterion, x, y)
    fresh = private(_linear_conv_model())
    step(*fresh)
    for p, q in zip(module.parameters(), fresh[0].parameters(), strict=True):
        torch.testing.assert_close(p, q)


class Twice(nn.Module):
    """One Linear layer applied twice per forward pass (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.relu(self.layer(x)))


def test_book_keeping_refuses_a_layer_used_twice_and_auto_takes_an_engine_that_handles_it():
    """bk keeps one input and output gradient per layer and forward pass, so tied weights are named and refused
    by the trial step; Opacus' ghost clipping refuses them too, and auto falls back to the hooks."""
    model, example = Twice(), torch.rand(2, 4)
    with pytest.raises(utils.UsageError, match=r"--grad-sample-mode bk cannot train layer 'layer' \(Linear\)"):
        choose_grad_sample_mode(model, "bk", example)
    assert choose_grad_sample_mode(model, "auto", example) == "hooks"


class Scaled(nn.Module):
    """A layer with a trainable weight of its own, which PyTorch's expanded weights cannot differentiate."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_a_layer_an_engine_cannot_train_is_named_with_an_engine_that_can():
    model = nn.Sequential(nn.Linear(4, 3), Scaled())
    with pytest.raises(utils.UsageError, match=r"--grad-sample-mode ew cannot train layer '1' \(Scaled\).*Use --grad-sample-mode bk"):  # fmt: skip
        choose_grad_sample_mode(model, "ew")
    assert choose_grad_sample_mode(model, "auto") == "bk"
    with pytest.raises(utils.UsageError, match=r"layer '1' \(BatchNorm1d\): BatchNorm cannot support.*GroupNorm"):
        choose_grad_sample_mode(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), "auto")


class Residual(nn.Module):
    """A residual block that adds in place onto a hooked layer's output, as timm's ResNets do."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        y += x
        return y


def test_a_failure_only_a_trial_step_shows_is_named_and_auto_takes_an_engine_that_works():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), Residual(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    example = torch.rand(2, 1, 6, 6)
    with pytest.raises(
        utils.UsageError, match=r"hooks cannot train layer '1' \(Residual\): .*Use --grad-sample-mode ew"
    ):
        choose_grad_sample_mode(model, "hooks", example)
    assert choose_grad_sample_mode(model, "auto", example) == "ew"
    assert choose_grad_sample_mode(model, "auto") == "bk"  # without an example only the static check runs


class AddInPlaceMethod(nn.Module):
    """A residual added in place by the tensor method, onto a hooked convolution's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).add_(x)


def test_full_finetune_computes_in_place_residuals_out_of_place_so_every_engine_trains_it():
    """unfreeze rewrites `y += x`, `.add_` and inplace activations out of place (torch.fx): the same function, and
    Opacus' hook-based engines, which fail on such a residual (the test above), now train it; so do they timm's
    ResNet-18, whose blocks end in `x += shortcut`."""
    import timm

    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), Residual(), AddInPlaceMethod(), nn.AdaptiveAvgPool2d(1)]
    x = torch.rand(2, 1, 10, 10)
    before = FrozenBackbone(nn.Sequential(*layers, nn.Flatten()), 4, 2, image_size=10)
    expected = before(x)
    model = before.unfreeze()
    torch.testing.assert_close(model(x), expected)
    for mode in ("hooks", "functorch", "ghost", "bk", "ew"):
        assert engine_problem(model, mode, x) is None, mode
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0)
    model = FrozenBackbone(resnet, resnet.num_features, 2, image_size=32).unfreeze()
    assert choose_grad_sample_mode(model, "hooks", torch.rand(2, 1, 25, 25)) == "hooks"


def test_an_unknown_engine_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(lambda: train.main(["--grad-sample-mode", "fast", "--out", str(tmp_path / "x")]))
    assert exit_info.value.code == 2
    assert "--grad-sample-mode 'fast' is unknown; choose from auto, hooks" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_full_finetune_trains_the_backbone_with_groupnorm_and_checkpoints_it(tmp_path):
    """--finetune full: BatchNorm replaced by GroupNorm (Opacus' ModuleValidator.fix), every weight trained under
    DP-SGD, and the whole model in the checkpoint, which reloads into an unfrozen twin."""
    import training
    from data_sources import load_dataset

    def tiny() -> FrozenBackbone:
        torch.manual_seed(0)
        backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )
        return FrozenBackbone(backbone, 32, 2, image_size=16).unfreeze()

    model = tiny()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.backbone.modules())
    conv = model.backbone.get_submodule("0")  # the backbone is torch.fx's rewrite (models.out_of_place), same names
    before = conv.weight.detach().clone()
    cfg = config.TrainConfig(epochs=1, accountant="rdp", out=tmp_path)
    run = training.Run("r", "tiny", "dp-sgd", 8.0, 1.0, choose_grad_sample_mode(model, "auto"))
    data = load_dataset("faces")
    split, prepare, _ = training.head_inputs(cfg, model, data, torch.device("cpu"))
    assert split is data  # images, not a feature cache: the backbone trains
    training.fit(cfg, run, training.trainable_module(model), prepare, split, torch.device("cpu"), tmp_path / "h.csv")
    assert not torch.equal(conv.weight, before)
    save_checkpoint(model, tmp_path / "m.safetensors")
    other = load_checkpoint(tiny(), tmp_path / "m.safetensors")
    assert torch.equal(other.backbone.get_submodule("0").weight, conv.weight)


def test_a_grid_on_two_ray_workers_writes_what_the_serial_study_writes(tmp_path):
    """--workers 2 runs the grid as Ray tasks: the same run directories and the same summary as one process
    (timings aside), with progress as runs done / total."""
    args = ["--models", "cnn", "mlp", "--privacy", "none", "dp-sgd", "--epsilons", "8", "--epochs", "2"]
    args += ["--accountant", "rdp"]
    utils.run_cli(lambda: train.main([*args, "--out", str(tmp_path / "serial")]))
    utils.run_cli(lambda: train.main([*args, "--workers", "2", "--out", str(tmp_path / "ray")]))
    serial, ray = (utils.read_csv(tmp_path / d / "summary.csv") for d in ("serial", "ray"))
    assert len(serial) == 4
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in ray] == [
        {k: v for k, v in r.items() if k not in TIMING} for r in serial
    ]
    for run in serial:
        a, b = (utils.read_csv(tmp_path / d / run["run"] / "history.csv") for d in ("serial", "ray"))
        assert a == b
