"""Sharding and compilation applied to plain networks, chosen in configs/trainer/, never in a module.

A network names the submodule classes that are its natural units of work in a class attribute,
`shard_units` (the GPT names its transformer `Block`; networks.py, the protocol). From that alone:
- `compile_units` compiles each unit's forward with torch.compile (what the module's `compile`
  switch does on any strategy: per unit, so FSDP's hooks stay outside the compiled graphs);
- `FSDP2Strategy` shards each unit, then each network root, with FSDP2's `fully_shard` over the
  data-parallel mesh (ZeRO-3 style: parameters, gradients and optimizer state all sharded);
- `DeepSpeedStrategy` has DeepSpeed ZeRO-3 gather each unit's parameters whole (a ZeRO-3 "leaf"),
  in hooks on the unit, instead of hooking every layer inside it; or, with DeepSpeed's DeepCompile
  on (trainer=deepspeed_compile), compiles the module's step entry points with the gathers inside.
Activation checkpointing is per unit too, inside the network (`gradient_checkpointing` in its config).
"""

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import lightning as L
import torch
from lightning.pytorch import strategies
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from .errors import ConfigError
from .networks import compile_units, units_of  # noqa: F401  (compile_units: the protocol's, re-exported)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, None: None}


def shardable_networks(root: nn.Module) -> list[nn.Module]:
    """The outermost submodules that declare `shard_units` (a module's student, teacher, towers...)."""
    found: list[nn.Module] = []
    for module in root.modules():
        if getattr(module, "shard_units", None) and not any(module in set(n.modules()) for n in found):
            found.append(module)
    return found


def fsdp2_shard(
    root: nn.Module,
    mesh: Any,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    prefetch: int = 1,
) -> list[nn.Module]:
    """fully_shard every unit of every shardable network under `root`, then each network itself
    (its embeddings and heads), so one all-gather per unit overlaps the previous unit's compute.

    reshard_after_forward frees each unit's gathered weights after its forward (gathered again in
    backward), except the last unit's: backward needs those first, at once. prefetch > 1 issues
    the all-gathers of that many units ahead (forward and backward) instead of FSDP2's one."""
    networks = shardable_networks(root)
    if not networks:
        raise TypeError(
            f"{type(root).__name__} has no network with `shard_units`: nothing to shard. Declare the block "
            "classes on the network, e.g. `shard_units = (Block,)`."
        )
    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
        "reshard_after_forward": reshard_after_forward,
    }
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for network in networks:
        if param_dtype is not None:
            # BatchNorm's running statistics are fp32 buffers that FSDP2 does not cast, and its kernels
            # refuse bf16 weights beside fp32 statistics: such layers keep fp32 weights (their own
            # FSDP2 group), as under autocast; their bf16 input is what those kernels accept.
            norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            for norm in norms:
                fully_shard(norm, **{**kwargs, "mp_policy": MixedPrecisionPolicy(reduce_dtype=reduce_dtype)})
        units = units_of(network)
        for i, unit in enumerate(units):
            fully_shard(unit, **{**kwargs, "reshard_after_forward": reshard_after_forward and i < len(units) - 1})
        fully_shard(network, **kwargs)
        if prefetch > 1:
            for i, unit in enumerate(units):
                unit.set_modules_to_forward_prefetch(units[i + 1 : i + 1 + prefetch])
                unit.set_modules_to_backward_prefetch(units[max(0, i - prefetch) : i][::-1])
    return networks


def broadcast_buffers_after_forward(network: nn.Module, group: Any = None) -> None:
    """After each training forward, copy rank 0's buffers (BatchNorm running statistics) to every
    rank, so all ranks hold what DDP keeps (rank 0's statistics, broadcast_buffers=True). FSDP2
    shards parameters only: without this each rank's statistics drift apart, and a sharded
    checkpoint keeps whichever rank's copy its writer picks. One broadcast per buffer dtype, and
    none at all for networks without buffers (the GPT)."""
    if next(network.buffers(), None) is None:
        return

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if not module.training:
            return
        buffers = list(module.buffers())  # read now: moving the model to its device replaces them
        for dtype in sorted({b.dtype for b in buffers}, key=str):  # the same order on every rank
            same = [b for b in buffers if b.dtype == dtype]
            flat = torch.cat([b.detach().reshape(-1) for b in same])
            torch.distributed.broadcast(flat, group=group, group_src=0)
            for b, value in zip(same, flat.split([b.numel() for b in same])):
                # Through .data: BatchNorm's backward holds these tensors (unused in training mode),
                # and autograd would reject a visible in-place change.
                b.data.copy_(value.view_as(b))

    network.register_forward_hook(hook)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy (FSDP2, DTensor) with the sharding applied for you.

    After the LightningModule's `configure_model` built its networks, every network that declares
    `shard_units` is sharded unit by unit over all devices. param_dtype "bfloat16" all-gathers and
    computes in bf16 while the sharded master weights and optimizer state stay fp32; reduce_dtype
    "float32" averages gradients in fp32. Checkpoints are sharded folders (one file per rank plus
    meta.pt); `python -m <package>.checkpoints <folder> <file>` consolidates one into a single file.
    """

    def __init__(
        self,
        param_dtype: str | None = "bfloat16",
        reduce_dtype: str | None = "float32",
        reshard_after_forward: bool = True,
        cpu_offload: bool = False,
        prefetch: int = 1,
        save_distributed_checkpoint: bool = True,
        **kwargs: Any,
    ) -> None:
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"trainer.strategy.prefetch={prefetch!r}: expected a positive number of units")
        for name, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value not in DTYPES:
                raise ValueError(f"trainer.strategy.{name}={value!r}: expected one of {sorted(map(str, DTYPES))}")
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.shard_kwargs = {
            "param_dtype": DTYPES[param_dtype],
            "reduce_dtype": DTYPES[reduce_dtype],
            "reshard_after_forward": reshard_after_forward,
            "cpu_offload": cpu_offload,
            "prefetch": prefetch,
        }

    def setup_environment(self) -> None:
        # Every device is one data-parallel shard (Lightning's "auto" would make each node one shard).
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def setup(self, trainer: L.Trainer) -> None:
        mesh = self.device_mesh["data_parallel"]
        for network in fsdp2_shard(self.lightning_module, mesh, **self.shard_kwargs):
            broadcast_buffers_after_forward(network, mesh.get_group())
        super().setup(trainer)


def mark_zero3_leaves(root: nn.Module) -> list[nn.Module]:
    """Make every unit of every shardable network under `root` a DeepSpeed ZeRO-3 leaf: DeepSpeed
    then fetches all of a unit's parameters at once when the unit's forward (or backward) begins,
    with hooks on the unit only. Call before the DeepSpeed engine is built (it places the hooks)."""
    from deepspeed.utils import set_z3_leaf_module  # imported here: the other strategies don't need it

    units = [unit for network in shardable_networks(root) for unit in units_of(network)]
    for unit in units:
        set_z3_leaf_module(unit, True)
    return units


class DeepSpeedStrategy(strategies.DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy; under ZeRO stage 3 each network unit is gathered whole.

    Out of the box ZeRO-3 hooks every submodule (each Linear, each LayerNorm) and gathers its few
    parameters just in time: many small all-gathers and a Python hook per layer. Gathered per unit,
    as FSDP2 shards, a 774M GPT trained 1.14x faster on two H200s in one lease (docs/performance.md).
    Networks without `shard_units` keep DeepSpeed's default.

    The `zero_optimization` section of `config` is checked against DeepSpeed's own schema when the
    strategy is built, so a misspelt key stops the run before any model is built, naming the key.
    """

    def __init__(self, config: dict | str | None = None, **kwargs: Any) -> None:
        super().__init__(config=config, **kwargs)
        if isinstance(self.config, dict) and self.config.get("zero_optimization"):
            check_zero_config(self.config["zero_optimization"])

    @property
    def deepcompile(self) -> bool:
        """DeepSpeed's DeepCompile is asked for: `compile: {deepcompile: true}` in the config."""
        return isinstance(self.config, dict) and bool((self.config.get("compile") or {}).get("deepcompile"))

    def setup(self, trainer: L.Trainer) -> None:
        if self.deepcompile:
            step_entry_points(self.lightning_module)  # a module DeepCompile cannot serve stops here, not later
        elif self.zero_stage_3:
            # Not under DeepCompile: it removes ZeRO-3's hooks but not the backward hooks of leaves,
            # and those break its graph ("Module-level backwards hooks require compiled autograd").
            mark_zero3_leaves(self.lightning_module)
        super().setup(trainer)

    def _setup_model_and_optimizer(self, model: nn.Module, optimizer: Any, lr_scheduler: Any = None) -> tuple[Any, Any]:
        engine, optimizer = super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        if self.deepcompile:
            compile_with_deepcompile(engine, self.lightning_module)
        return engine, optimizer

    def eager_weights(self, network: nn.Module) -> AbstractContextManager:
        """A context in which `network` can run outside the compiled entry points (text samples):
        under DeepCompile, ZeRO-3's gathering hooks are gone, so its parameters are gathered whole."""
        return gathered_whole(network) if self.deepcompile else nullcontext()


def gathered_whole(network: nn.Module) -> AbstractContextManager:
    """A context in which each ZeRO-3 partitioned parameter of `network` holds its whole tensor."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    return GatheredParameters(list(network.parameters()))


def step_entry_points(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """(owner, method name) for each dotted path in the module's `step_entry_points`: the network
    methods through which its training and validation steps use every parameter (GPTModule:
    `("net.loss",)`). ConfigError when the module names none, or a path that is not a method."""
    paths = getattr(module, "step_entry_points", ())
    if not paths:
        raise ConfigError(
            f"trainer.strategy.config.compile.deepcompile=true: {type(module).__name__} names no "
            "`step_entry_points` (the network methods its steps run through, e.g. GPTModule's ('net.loss',)) "
            "for DeepCompile to compile; use trainer=deepspeed"
        )
    found = []
    for path in paths:
        *owners, name = path.split(".")
        owner = module
        for attr in owners:
            owner = getattr(owner, attr, None)
        if not callable(getattr(owner, name, None)):
            raise ConfigError(f"{type(module).__name__}.step_entry_points: {path!r} is not a method of the module")
        found.append((owner, name))
    return found


def compile_with_deepcompile(engine: Any, module: nn.Module) -> None:
    """Compile the module's step entry points with DeepSpeed's DeepCompile backend: ZeRO-3's
    gathers, releases and prefetches become operations in the compiled graph instead of Python hooks
    around every unit. `engine.compile()` would do the same to Lightning's wrapper, whose forward is the
    whole training_step (logging included); this compiles the network's part only. On two H200s at
    774M: 0.94x `trainer=fsdp`, where eager ZeRO-3 reaches 0.75x (docs/performance.md)."""
    if not hasattr(engine, "get_deepspeed_compile_backend"):
        import deepspeed

        raise ConfigError(
            f"trainer.strategy.config.compile.deepcompile=true: deepspeed {deepspeed.__version__}'s engine has no "
            "get_deepspeed_compile_backend (tested with deepspeed 0.19.8); upgrade deepspeed or use trainer=deepspeed"
        )
    backend, _ = engine.get_deepspeed_compile_backend("inductor", {}, None)
    engine._set_deepcompile_active(True)  # what engine.compile() does: the engine's own forward hooks go
    engine._is_compiled = True
    for owner, name in step_entry_points(module):
        setattr(owner, name, _deepcompiled(owner, getattr(owner, name), backend))


def _deepcompiled(owner: nn.Module, method: Any, backend: Any) -> Any:
    """`method` compiled with DeepCompile's backend for steps that build a graph for backward; without
    gradients (validation) it runs eagerly on its owner's weights gathered whole, because DeepCompile's
    graph for a step without gradients failed on the H200 (the cuDNN attention kernel was handed no
    tensor where the graph expected one, docs/performance.md)."""
    compiled = torch.compile(method, backend=backend)

    def entry(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return compiled(*args, **kwargs)
        with gathered_whole(owner):
            return method(*args, **kwargs)

    return entry


def check_zero_config(zero: dict) -> None:
    """Validate DeepSpeed's zero_optimization section with DeepSpeed's own model of it; ConfigError
    naming each wrong key (DeepSpeed itself would only say so when the engine is built)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"trainer.strategy.config.zero_optimization: {problems}") from None
