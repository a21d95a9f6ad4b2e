"""Trainer presets: DDP and FSDP2 in 2 CPU processes (gloo), sharded checkpoints, CUDA-only presets."""

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from {{cookiecutter.package}}.checkpoints import consolidate, is_complete
from {{cookiecutter.package}}.errors import ConfigError, DataPathError
{%- if cookiecutter.clip %}
from {{cookiecutter.package}}.modules.clip import CLIPModule
{%- endif %}
{%- if cookiecutter.gpt %}
from {{cookiecutter.package}}.modules.gpt import GPTModule
{%- endif %}
from {{cookiecutter.package}}.parallel import (
    DeepSpeedStrategy,
    FSDP2Strategy,
    compile_with_deepcompile,
    fsdp2_shard,
    mark_zero3_leaves,
    step_entry_points,
)
from {{cookiecutter.package}}.training import build_trainer

from .conftest import {% if cookiecutter.clip %}CLIP_TINY, {% endif %}{% if cookiecutter.gpt %}TINY, {% endif %}run_script

# Two CPU processes; float32 everywhere so DDP and FSDP2 compute the same thing.
TWO_CPUS = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "trainer.max_steps=4"]
FSDP = ["trainer=fsdp", "trainer.strategy.param_dtype=null", "trainer.strategy.reduce_dtype=null"]

# This project's networks: (LightningModule, the overrides that make it tiny).
MODELS = {
{%- if cookiecutter.gpt %}
    "gpt": (GPTModule, [*TINY, "callbacks.text_samples=null"]),  # data.paths: the test corpus, below
{%- endif %}
{%- if cookiecutter.clip %}
    "clip": (CLIPModule, [*CLIP_TINY, "callbacks.similarity=null"]),  # BatchNorm in its ResNet tower
{%- endif %}
}


@pytest.fixture(params=list(MODELS))
def model(request: pytest.FixtureRequest) -> tuple[type[L.LightningModule], list[str]]:
    module, overrides = MODELS[request.param]
    if request.param == "gpt":
        overrides = [*overrides, f"data.paths=[{request.getfixturevalue('corpus')}]"]
    return module, overrides


def train_run(tmp: Path, name: str, model: tuple[type, list[str]], data_dir: Path, *overrides: str) -> Path:
    run_dir = tmp / name
    quiet = ["callbacks.progress_bar=null", "callbacks.model_summary=null"]
    run_script(
        "train.py",
        *model[1],
        f"paths.data_dir={data_dir}",
        *TWO_CPUS,
        *quiet,
        "model.optimizer.fused=true",  # the GPU default: the non-finite check hands it its flag (DTensors too)
        "trainer.val_check_interval=2",
        f"hydra.run.dir={run_dir}",
        *overrides,
    )
    return run_dir / "checkpoints"


@pytest.mark.slow
def test_fsdp2_shards_saves_resumes_and_consolidates_to_the_ddp_weights(tmp_path, model, data_dir):
    ddp = train_run(tmp_path, "ddp", model, data_dir, "trainer=ddp")
    reference = torch.load(ddp / "last.ckpt", weights_only=True)["state_dict"]

    # FSDP2, stopped after 2 of 4 steps (a sharded checkpoint at step 2), then resumed from it.
    stop = ["+callbacks.stop._target_=tests.conftest.StopAtStep", "+callbacks.stop.step=2"]
    first = train_run(tmp_path, "fsdp-a", model, data_dir, *FSDP, *stop)
    assert (first / "last.ckpt" / "meta.pt").is_file() and len(list((first / "last.ckpt").glob("*.distcp"))) == 2
    assert is_complete(first / "last.ckpt") and not list(first.glob(".*"))  # marked whole, nothing partial left
    second = train_run(tmp_path, "fsdp-b", model, data_dir, *FSDP, f"ckpt_path={first / 'last.ckpt'}")

    full = consolidate(second / "last.ckpt", tmp_path / "full.ckpt")
    checkpoint = torch.load(full, weights_only=True)
    assert checkpoint["global_step"] == 4
    module = model[0].load_from_checkpoint(full, weights_only=True)  # a plain, unsharded model
    weights = module.state_dict()
    assert weights.keys() == reference.keys()
    for key, value in reference.items():  # sharded training == replicated training, step for step
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_consolidate_rejects_what_is_not_a_sharded_checkpoint(tmp_path):
    with pytest.raises(DataPathError, match="is not a sharded checkpoint folder"):
        consolidate(tmp_path, tmp_path / "out.ckpt")
    assert not (tmp_path / "out.ckpt").exists()


@pytest.mark.parametrize("preset", ["deepspeed", "deepspeed_compile", "deepspeed_offload"])
def test_cuda_only_presets_fail_at_once_on_cpu_saying_what_to_use(compose_cfg, preset):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = compose_cfg(overrides=[f"trainer={preset}"])
    with pytest.raises(ConfigError, match="needs CUDA GPUs.*use trainer=ddp"):
        build_trainer(cfg)


class Unit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Stack(nn.Module):
    shard_units = (Unit,)

    def __init__(self, n: int) -> None:
        super().__init__()
        self.units = nn.ModuleList(Unit() for _ in range(n))


@pytest.fixture
def one_rank_mesh():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


@pytest.mark.parametrize("reshard", [True, False])
def test_fsdp2_keeps_the_last_unit_gathered_and_prefetches_as_configured(one_rank_mesh, reshard):
    stack = Stack(4)
    fsdp2_shard(stack, one_rank_mesh, reshard_after_forward=reshard, prefetch=2)
    states = [unit._get_fsdp_state() for unit in stack.units]
    # Backward starts with the last unit, so it never frees its gathered weights after forward.
    assert [s._fsdp_param_group.post_forward_mesh_info is not None for s in states] == [reshard] * 3 + [False]
    assert [s._states_to_forward_prefetch for s in states] == [states[1:3], states[2:4], states[3:], []]
    assert [s._states_to_backward_prefetch for s in states] == [[], states[:1], states[1::-1], states[2:0:-1]]


def test_fsdp2_prefetch_of_one_leaves_fsdp2_its_own_order(one_rank_mesh):
    stack = Stack(3)
    fsdp2_shard(stack, one_rank_mesh, prefetch=1)
    for unit in stack.units:
        state = unit._get_fsdp_state()
        assert state._states_to_forward_prefetch == [] and state._states_to_backward_prefetch == []


def test_fsdp2_strategy_rejects_a_prefetch_below_one():
    with pytest.raises(ValueError, match=r"trainer.strategy.prefetch=0: expected a positive number"):
        FSDP2Strategy(prefetch=0)


def test_zero3_leaves_are_the_units_of_every_shardable_network():
    """DeepSpeedStrategy (trainer=deepspeed) marks these before DeepSpeed places its hooks: each unit
    is then gathered whole, nothing inside a unit and nothing outside the units is a leaf."""
    pytest.importorskip("deepspeed")
    from deepspeed.utils import z3_leaf_module

    root = nn.ModuleDict({"a": Stack(3), "b": Stack(2), "head": nn.Linear(4, 4)})
    units = mark_zero3_leaves(root)
    assert units == [*root["a"].units, *root["b"].units]
    assert [m for m in root.modules() if z3_leaf_module(m)] == units


@pytest.mark.parametrize("preset", ["deepspeed", "deepspeed_compile", "deepspeed_offload"])
def test_deepspeed_presets_are_valid_zero_configs_and_a_misspelt_key_is_named(compose_cfg, preset):
    pytest.importorskip("deepspeed")
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    strategy = instantiate(compose_cfg("train", [f"trainer={preset}"]).trainer.strategy, _convert_="all")
    assert isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3
    assert strategy.deepcompile == (preset == "deepspeed_compile")
    if preset == "deepspeed":  # docs/scaling.md's example of one ZeRO key changed from the command line
        documented = "trainer.strategy.config.zero_optimization.reduce_bucket_size=50000000"
        cfg = compose_cfg("train", [f"trainer={preset}", documented])
        assert instantiate(cfg.trainer.strategy, _convert_="all").config["zero_optimization"]["reduce_bucket_size"] == (
            50_000_000
        )
    typo = "+trainer.strategy.config.zero_optimization.stage3_prefetch_bucket_sise=1"
    with pytest.raises(InstantiationException) as e:  # what train.py prints as one line (cli.py)
        instantiate(compose_cfg("train", [f"trainer={preset}", typo]).trainer.strategy, _convert_="all")
    assert isinstance(e.value.__cause__, ConfigError)
    assert str(e.value.__cause__).startswith(
        "trainer.strategy.config.zero_optimization: stage3_prefetch_bucket_sise: Extra inputs are not permitted"
    )


class LossStack(Stack):
    def loss(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        return x.square().mean()


class StepModule(nn.Module):
    step_entry_points = ("net.loss",)

    def __init__(self) -> None:
        super().__init__()
        self.net = LossStack(2)


def test_deepcompile_compiles_the_step_entry_points_with_the_engines_backend_and_validates_eagerly():
    """trainer=deepspeed_compile: what DeepSpeedStrategy does once DeepSpeed built its engine. The
    engine here stands in for DeepSpeed's (DeepCompile needs CUDA); the compile is torch's own."""
    pytest.importorskip("deepspeed")
    graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    class Engine:  # the two calls DeepSpeedEngine.compile() makes before compiling, recorded
        def get_deepspeed_compile_backend(self, name: str, kwargs: dict, schedule: object) -> tuple:
            self.asked = (name, kwargs, schedule)
            return backend, schedule

        def _set_deepcompile_active(self, active: bool) -> None:
            self.active = active

    module, engine, x = StepModule(), Engine(), torch.randn(3, 4)
    with pytest.raises(ConfigError, match=r"engine has no get_deepspeed_compile_backend.*use trainer=deepspeed"):
        compile_with_deepcompile(object(), module)  # a DeepSpeed without DeepCompile's entry
    expected = module.net.loss(x).detach()
    compile_with_deepcompile(engine, module)
    assert engine.asked == ("inductor", {}, None) and engine.active and engine._is_compiled
    with torch.no_grad():  # validation: eager (DeepCompile's inference graphs failed on the H200)
        assert torch.equal(module.net.loss(x), expected) and graphs == []
    loss = module.net.loss(x)  # training: one graph, through DeepCompile's backend, with gradients
    loss.backward()
    assert len(graphs) == 1 and {n.target for n in graphs[0].graph.nodes if n.op == "placeholder"}
    torch.testing.assert_close(loss.detach(), expected)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("preset", ["deepspeed", "deepspeed_compile"])
def test_deepspeed_setup_makes_units_leaves_only_without_deepcompile(compose_cfg, preset, monkeypatch):
    """Leaves keep backward hooks that DeepCompile does not remove (its graph then breaks and the rest
    runs on partitioned weights), so under DeepCompile no unit is one; a module that names no entry
    point stops in setup, before DeepSpeed builds anything."""
    pytest.importorskip("deepspeed")
    from deepspeed.utils import z3_leaf_module
    from hydra.utils import instantiate
    from lightning.pytorch import strategies

    monkeypatch.setattr(strategies.DeepSpeedStrategy, "setup", lambda self, trainer: None)  # the engine needs CUDA
    strategy = instantiate(compose_cfg("train", [f"trainer={preset}"]).trainer.strategy, _convert_="all")
    strategy._lightning_module = module = StepModule()
    strategy.setup(None)
    leaves = [m for m in module.modules() if z3_leaf_module(m)]
    assert leaves == ([] if preset == "deepspeed_compile" else list(module.net.units))
    strategy._lightning_module = Stack(2)  # names no step_entry_points
    if preset == "deepspeed_compile":
        with pytest.raises(ConfigError, match="Stack names no `step_entry_points`"):
            strategy.setup(None)
    else:
        strategy.setup(None)


def test_deepcompile_refuses_a_module_without_step_entry_points_naming_it():
    with pytest.raises(ConfigError, match=r"deepcompile=true: Stack names no `step_entry_points`.*trainer=deepspeed"):
        step_entry_points(Stack(1))
    module = StepModule()
    assert step_entry_points(module) == [(module.net, "loss")]
    module.step_entry_points = ("net.los",)
    with pytest.raises(ConfigError, match=r"StepModule.step_entry_points: 'net.los' is not a method of the module"):
        step_entry_points(module)


class NormUnit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.norm = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(x))


class NormStack(nn.Module):
    shard_units = (NormUnit,)

    def __init__(self) -> None:
        super().__init__()
        self.units = nn.Sequential(NormUnit(), NormUnit())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(x)


def test_fsdp2_bf16_keeps_batchnorm_weights_in_fp32_beside_its_fp32_statistics(one_rank_mesh):
    # bf16 BatchNorm weights beside fp32 running statistics stop the forward ("expected scalar type
    # BFloat16 but found Float"): the CLIP's ResNet tower under trainer=fsdp met this on 2 H200s.
    stack = NormStack()
    fsdp2_shard(stack, one_rank_mesh, param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    out = stack(torch.randn(8, 4))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    for unit in stack.units:
        assert unit.norm._get_fsdp_state()._mp_policy.param_dtype is None
        assert unit._get_fsdp_state()._mp_policy.param_dtype == torch.bfloat16
        assert unit.norm.running_mean.dtype == torch.float32 and unit.norm.running_mean.abs().sum() > 0


@pytest.mark.parametrize("found_inf", [0.0, 1.0])
def test_fused_adamw_over_fsdp2_shards_skips_its_step_when_handed_found_inf(one_rank_mesh, found_inf):
    # callbacks/nonfinite.py hands the non-finite flag to the optimizer as `found_inf` instead of
    # reading it on the host: under FSDP2 the parameters are DTensors and the flag a plain tensor.
    stack = NormStack()
    fsdp2_shard(stack, one_rank_mesh)
    optimizer = torch.optim.AdamW(stack.parameters(), lr=0.1, fused=True)
    x, weights = torch.randn(8, 4), torch.randn(8, 4)

    def state() -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        moments = [optimizer.state[p] for p in stack.parameters()]
        return [
            (p.full_tensor().clone(), m["exp_avg"].full_tensor().clone(), int(m["step"]))
            for p, m in zip(stack.parameters(), moments)
        ]

    for _ in range(2):  # the second step with the flag, the first without
        (stack(x) * weights).sum().backward()
        before = state() if optimizer.state else None
        optimizer.found_inf = torch.tensor(found_inf) if before else None
        optimizer.step()
        optimizer.zero_grad()
    for (weight, moment, step), (weight_after, moment_after, step_after) in zip(before, state()):
        assert step == 1 and step_after == (1 if found_inf else 2)
        assert torch.equal(weight, weight_after) == bool(found_inf) == torch.equal(moment, moment_after)
