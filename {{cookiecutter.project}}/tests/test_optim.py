"""The optimizer and schedule every module shares (modules/optim.py)."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from {{cookiecutter.package}}.errors import ConfigError
from {{cookiecutter.package}}.modules.optim import WarmupCosine, build_adamw, configure_optimizers, warmup_cosine

ADAMW = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3}
CONSTANT = {
    "_target_": "{{cookiecutter.package}}.modules.optim.WarmupCosine",
    "_partial_": True,
    "warmup_steps": 0,
    "min_lr_ratio": 1.0,
    "total_steps": 10,
}


def test_warmup_cosine_by_hand():
    def f(step: int) -> float:
        return warmup_cosine(step, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)

    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5)  # (step + 1) / warmup
    assert f(10) == pytest.approx(1.0)  # the peak, then half a cosine ...
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # ... halfway down ...
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)  # ... and the floor after


def test_weight_decay_reaches_matrices_only():
    net = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    opt = build_adamw(net.parameters(), lr=1e-3, weight_decay=0.1, fused=False)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2} and len(decay["params"]) == 2  # embedding, linear weight
    assert {p.ndim for p in no_decay["params"]} == {1} and len(no_decay["params"]) == 3  # norm gain/bias, bias


class Regression(L.LightningModule):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.fused = fused

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x).float(), y)

    def configure_optimizers(self) -> dict:
        optimizer = {**ADAMW, "lr": 1e-2, "weight_decay": 0.0, "fused": self.fused}
        return configure_optimizers(self, self.parameters(), optimizer, CONSTANT)


def fit(fused: bool, clip: float | None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = Regression(fused)
    g = torch.Generator().manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(96, 8, generator=g), 100 * torch.randn(96, 1, generator=g)), 32)
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        gradient_clip_val=clip,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_fused_adamw_clips_gradients_under_bf16_autocast():
    """Lightning refuses to clip for an optimizer that can unscale gradients itself (the fused
    kernel); under bf16 there is no loss scaling, so ours clips and matches the foreach kernel."""
    fused, foreach, unclipped = fit(True, clip=0.01), fit(False, clip=0.01), fit(True, clip=None)
    for key, value in foreach.items():
        torch.testing.assert_close(fused[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # The targets are large, so the gradients are far above 0.01: clipping changed the steps.
    assert any(not torch.allclose(fused[k], unclipped[k], atol=1e-5) for k in fused)


def test_fused_with_fp16_loss_scaling_and_clipping_is_one_clear_error():
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()), gradient_clip_val=1.0)
    module = SimpleNamespace(trainer=trainer)
    params = nn.Linear(2, 2).parameters()
    with pytest.raises(ConfigError, match="model.optimizer.fused=true cannot clip gradients"):
        configure_optimizers(module, params, {**ADAMW, "fused": True}, CONSTANT)


class Lion(torch.optim.SGD):
    """A paper's optimizer: any class whose first argument is the parameter groups."""


def test_any_optimizer_class_gets_the_weight_decay_groups_and_the_schedule():
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    module = SimpleNamespace(trainer=SimpleNamespace(precision_plugin=None, gradient_clip_val=None))
    node = {"_target_": f"{__name__}.Lion", "_partial_": True, "lr": 0.5, "weight_decay": 0.01}
    schedule = {**CONSTANT, "warmup_steps": 4, "min_lr_ratio": 0.1}
    out = configure_optimizers(module, net.parameters(), node, schedule)
    opt = out["optimizer"]
    assert type(opt) is Lion
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]  # the weight; bias, norm gain and bias
    assert [g["lr"] for g in opt.param_groups] == [0.5 / 4] * 2  # warmup step 0 of 4: lr * 1/4


@pytest.mark.parametrize(
    "optimizer, schedule, message",
    [
        ({**ADAMW, "_partial_": False}, CONSTANT, "model.optimizer needs `_partial_: true`"),
        ({**ADAMW, "momentum": 0.9}, CONSTANT, r"model.optimizer: torch.optim.AdamW does not take these arguments"),
        ({**ADAMW, "_target_": "torch.optim.Adamm"}, CONSTANT, r"model.optimizer._target_='torch.optim.Adamm' cannot"),
        (ADAMW, {**CONSTANT, "total_steps": None}, "the LR schedule needs a length: set trainer.max_steps"),
        (ADAMW, {**CONSTANT, "min_lr_ratio": 2.0}, r"model.scheduler: .*min_lr_ratio=2.0 in \[0, 1\]"),
    ],
)
def test_bad_optimizer_and_schedule_nodes_name_the_key(optimizer, schedule, message):
    trainer = SimpleNamespace(precision_plugin=None, gradient_clip_val=None, estimated_stepping_batches=float("inf"))
    with pytest.raises(ConfigError, match=message):
        configure_optimizers(SimpleNamespace(trainer=trainer), nn.Linear(2, 2).parameters(), optimizer, schedule)


def test_a_resume_keeps_the_checkpoints_schedule_and_says_so_when_this_run_planned_another(caplog):
    def schedule(total: int) -> WarmupCosine:
        opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=1.0)
        return WarmupCosine(opt, warmup_steps=2, total_steps=total, min_lr_ratio=0.1)

    first = schedule(24)
    for _ in range(12):
        first.optimizer.step()
        first.step()
    state = first.state_dict()

    same = schedule(24)
    with caplog.at_level("WARNING"):
        same.load_state_dict(state)
    assert caplog.text == ""  # the same plan: nothing to say

    longer = schedule(48)  # resumed with trainer.max_steps=48
    with caplog.at_level("WARNING"):
        longer.load_state_dict(state)
    assert (
        "resuming keeps the checkpoint's LR schedule: total_steps 24 (this run: 48); the cosine ends at step 24"
        in caplog.text
    )
    for _ in range(12):  # the original shape, step for step, down to the floor at 24 and flat after
        longer.optimizer.step()
        longer.step()
        first.optimizer.step()
        first.step()
        assert longer.get_last_lr() == first.get_last_lr()
    assert longer.get_last_lr()[0] == pytest.approx(0.1)
