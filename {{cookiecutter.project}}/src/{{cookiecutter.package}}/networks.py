"""The one door between configs and networks: `_target_` nodes built from plain dicts, and the
protocol a causal language model follows so the modules, generation, callbacks and parallel.py can
use it without knowing its class (docs/architecture.md, "The network protocol").

A `_target_` node is stored as a plain dict in every checkpoint's hyper-parameters (torch.load with
weights_only=True reads it), so a checkpoint rebuilds its network in a fresh process from the dict
alone: no Hydra needed, the class only has to be importable.
"""

import functools
import importlib
import inspect
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .errors import ConfigError

# The project's configs/, beside src/: the package is used from its project folder (pip install -e .).
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@runtime_checkable
class CausalLM(Protocol):
    """What the modules, generate.py, the callbacks and the strategies use of a language model.

    config: any object with `vocab_size` (tokens the tokenizer may emit) and `max_length` (longest
        input); the network's logits may have more columns than vocab_size (padding), never fewer.
    forward(idx) -> logits: idx (B, T) token ids -> (B, T, >= vocab_size). Extra keyword arguments
        are allowed (a KV cache, say) as long as `net(idx)` alone returns the logits.
    loss(idx, targets, ignore_index=-100) -> scalar: the mean next-token cross-entropy over the first
        vocab_size columns; targets (B, T) are idx shifted by one, ignore_index masks padding.
    num_params(non_embedding=True) -> int: the parameter count the FLOPs are counted from.
    flops_per_token(seq_len) -> int: training FLOPs (forward + backward) per token at this length.
    shard_units: the submodule classes that FSDP2 shards and `compile_units` compiles one by one.
    """

    config: Any
    shard_units: tuple[type[nn.Module], ...]

    def forward(self, idx: torch.Tensor) -> torch.Tensor: ...

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor: ...

    def num_params(self, non_embedding: bool = True) -> int: ...

    def flops_per_token(self, seq_len: int) -> int: ...


def locate(target: str, key: str) -> Any:
    """The object a dotted path names (`package.module.Name`), or a ConfigError naming the key."""
    module_name, _, attr = str(target).rpartition(".")
    if not module_name:
        raise ConfigError(f"{key}._target_={target!r} is not a dotted path like package.module.Class")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}._target_={target!r} cannot be imported: {e}") from None


def build(spec: Mapping[str, Any], key: str, *args: Any, **kwargs: Any) -> Any:
    """Call spec["_target_"] with the spec's other keys as keyword arguments (after `args`, and
    `kwargs`, which override). `_partial_: true` returns a functools.partial instead of calling.
    A wrong keyword or a value the target rejects (TypeError / ValueError) is a ConfigError that
    names `key`. Nested nodes are passed as they are: a target that takes a sub-network builds it."""
    if not isinstance(spec, Mapping) or "_target_" not in spec:
        raise ConfigError(f"{key} must be a config node with a _target_ (the class to build), got {spec!r}")
    values = {k: v for k, v in spec.items() if k not in ("_target_", "_partial_")}
    target = locate(spec["_target_"], key)
    try:
        signature = inspect.signature(target)
        # A partial gets its remaining arguments later (the parameters, the optimizer); a call needs all now.
        (signature.bind_partial if spec.get("_partial_") else signature.bind)(*args, **{**values, **kwargs})
    except TypeError as e:
        raise ConfigError(f"{key}: {spec['_target_']} does not take these arguments: {e}") from None
    except ValueError:
        pass  # no signature to check (some builtins): the call itself will tell
    if spec.get("_partial_"):
        return functools.partial(target, *args, **{**values, **kwargs})
    try:
        return target(*args, **{**values, **kwargs})
    except ValueError as e:  # the target's own check of a value (a TypeError past the signature check is a bug)
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{key}: {e}") from None


def build_causal_lm(spec: Mapping[str, Any], key: str) -> CausalLM:
    """A network from its node, checked against the protocol (the message lists what is missing)."""
    net = build(spec, key)
    check_causal_lm(net, f"{key}._target_={spec['_target_']}")
    return net


def check_causal_lm(net: Any, what: str) -> None:
    missing = [name for name in ("loss", "num_params", "flops_per_token", "shard_units") if not hasattr(net, name)]
    config = getattr(net, "config", None)
    missing += [f"config.{name}" for name in ("vocab_size", "max_length") if not hasattr(config, name)]
    if not isinstance(net, nn.Module) or missing:
        raise ConfigError(
            f"{what} is not a causal language model: it lacks {missing or ['nn.Module']} "
            "(see docs/architecture.md, 'The network protocol')"
        )


def units_of(network: nn.Module) -> list[nn.Module]:
    """The submodules whose class the network lists in `shard_units` (its blocks), in order."""
    types = tuple(network.shard_units)
    return [m for m in network.modules() if isinstance(m, types)]


def compile_units(network: nn.Module, **compile_kwargs: Any) -> None:
    """torch.compile each unit's forward, and each method named in the network's optional
    `compile_methods`, in place: parameter names (and checkpoints) do not change, and FSDP's
    per-unit hooks (parallel.py) stay outside the compiled graphs.

    A network whose parameters DeepSpeed ZeRO-3 partitioned as they were created (they carry
    `ds_id`) stays eager, with a warning. On two H200s at 774M, compiled units under ZeRO-3 ran 2x
    slower than eager with ZeRO-3's hooks on every layer, and with each unit gathered whole
    (`parallel.DeepSpeedStrategy`) no faster than eager (55.5K against 57.2K tokens/s per GPU), so
    compiling would only add start-up time (docs/performance.md)."""
    if any(hasattr(p, "ds_id") for p in network.parameters()):
        warnings.warn(
            "model.compile=true under DeepSpeed ZeRO-3: the units stay eager (compiled units measured "
            "no faster than eager under ZeRO-3; trainer=deepspeed_compile compiles the whole network with "
            "DeepSpeed's DeepCompile; docs/performance.md)",
            stacklevel=2,
        )
        return
    for unit in units_of(network):
        unit.forward = torch.compile(unit.forward, **compile_kwargs)
    for name in getattr(network, "compile_methods", ()):
        setattr(network, name, torch.compile(getattr(network, name), **compile_kwargs))


def net_presets(target: str | None = None, group: str = "net") -> list[str]:
    """The names in configs/model/<group>/, or those whose `_target_` is `target` (a dotted path)."""
    import yaml  # read here only: scripts and tests use presets, training composes them through Hydra

    paths = sorted((CONFIGS / "model" / group).glob("*.yaml"))
    return [p.stem for p in paths if target is None or yaml.safe_load(p.read_text())["_target_"] == target]


def net_preset(name: str, group: str = "net", data: Mapping[str, Any] | None = None, **values: Any) -> dict[str, Any]:
    """configs/model/<group>/<name>.yaml as a plain `_target_` node, for scripts and tests (train.py
    composes the same file). `values` replace its keys; what it still takes from the data
    (`${data.block_size}`, ...) is read from `data`, and a missing one is a ConfigError."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    path = CONFIGS / "model" / group / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no network preset {name!r} in {path.parent}; choose one of {net_presets(group=group)}")
    root = OmegaConf.create({"data": dict(data or {}), "net": OmegaConf.load(path)})
    for key, value in values.items():
        root.net[key] = value
    try:
        return OmegaConf.to_container(root.net, resolve=True)
    except InterpolationResolutionError as e:
        unset = sorted(k for k in root.net if OmegaConf.is_interpolation(root.net, k)) or str(e)
        raise ConfigError(f"network preset {name!r} takes {unset} from the data: pass them") from None
