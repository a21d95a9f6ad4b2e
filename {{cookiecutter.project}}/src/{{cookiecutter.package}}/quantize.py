"""Post-training quantization (torchao) of a trained network, and quantization-aware training.

    python quantize.py ckpt_path=<run>/checkpoints/last.ckpt quantize.method=int8_weight_only

writes <run>/checkpoints/last-int8_weight_only.ckpt, a checkpoint that generate.py and the CLIP
pipeline load as they load any other, and prints a table: weight file size, the validation metrics
(loss and perplexity for a GPT, retrieval R@1 for CLIP) and decode speed (GPT), before and after.
The quantized file holds torchao tensors: loading it needs torchao installed.

Which methods run where (torchao 0.18):
  int8_weight_only  int8 weights, float activations: CPU and CUDA; the memory-bound decode gains
  int8_dynamic      int8 weights and per-token int8 activations: CPU and CUDA
  float8_dynamic    float8 weights and activations: CUDA GPUs of compute capability 8.9+ only
Linear layers and embeddings are quantized (the GPT's tied embedding and head stay one tensor);
LayerNorms, biases and convolutions stay in float.
"""

import importlib.util
import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from .benchmark import median_step_ms
from .checkpoints import load_net, read_checkpoint, retie, tied_parameters
from .errors import ConfigError
from .networks import {% if cookiecutter.clip %}build{% if cookiecutter.gpt %}, {% endif %}{% endif %}{% if cookiecutter.gpt %}build_causal_lm{% endif %}
from .training import build_trainer, metrics_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    summary: str
    cuda_capability: tuple[int, int] | None  # None: CPUs and any CUDA GPU; else the oldest GPU it runs on
    embeddings: bool  # also quantize nn.Embedding tables (int8 lookups dequantize the rows they read)


METHODS = {
    "int8_weight_only": Method("int8 weights, float activations", None, True),
    "int8_dynamic": Method("int8 weights, int8 per-token activations", None, True),
    "float8_dynamic": Method("float8 weights and activations", (8, 9), False),
}


def torchao_config(method: str) -> Any:
    """The torchao config object of a method name."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    return {
        "int8_weight_only": lambda: Int8WeightOnlyConfig(granularity=PerRow()),
        "int8_dynamic": lambda: Int8DynamicActivationInt8WeightConfig(granularity=PerRow()),
        "float8_dynamic": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
    }[method]()


def check_method(method: str, device: torch.device, key: str = "quantize.method") -> Method:
    """The method, or one clear error: an unknown name, a device it cannot run on, no torchao."""
    if method not in METHODS:
        raise ConfigError(f"{key}={method!r} is not a quantization method; expected one of {sorted(METHODS)}")
    spec = METHODS[method]
    if spec.cuda_capability is not None:
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if capability is None or capability < spec.cuda_capability:
            here = f"a GPU of compute capability {capability}" if capability else device.type
            runs_here = sorted(m for m, s in METHODS.items() if s.cuda_capability is None)
            raise ConfigError(
                f"{key}={method} needs a CUDA GPU of compute capability "
                f"{'.'.join(map(str, spec.cuda_capability))} or newer and this run is on {here}; "
                f"methods that run here: {runs_here}"
            )
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"{key}={method} needs torchao: pip install torchao (the project's [deploy] extra)")
    return spec


def quantize_net(net: nn.Module, method: str) -> nn.Module:
    """Quantize `net` in place (its Linear layers, and its embeddings for the int8 methods); weights
    tied before (the GPT's embedding and output head) are one quantized tensor after."""
    from torchao.quantization import quantize_

    spec = METHODS[method]
    tied = tied_parameters(net)
    kinds = (nn.Linear, nn.Embedding) if spec.embeddings else (nn.Linear,)
    quantize_(net, torchao_config(method), filter_fn=lambda module, fqn: isinstance(module, kinds))
    retie(net, tied)  # each tied name was quantized on its own: keep the first copy for all of them
    return net


def prepare_qat(net: nn.Module, method: str) -> nn.Module:
    """Quantization-aware training: fake-quantize `net`'s Linear layers as `method` will quantize
    them (int8 per-channel symmetric weights; for int8_dynamic also int8 per-token activations,
    asymmetric: torchao 0.18 fake-quantizes per-token activations only that way), so training
    adapts the weights to the rounding. The parameter names do not change: the checkpoint
    loads into a plain network, and quantize.py then converts it like any other."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    if method not in ("int8_weight_only", "int8_dynamic"):
        raise ConfigError(f"model.qat={method!r}: expected null, int8_weight_only or int8_dynamic")
    weights = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    activations = None
    if method == "int8_dynamic":
        activations = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    quantize_(net, QATConfig(activation_config=activations, weight_config=weights, step="prepare"))
    return net


def state_bytes(net: nn.Module) -> int:
    """Size of the network's weights as torch.save writes them (tied tensors once)."""
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    return buffer.tell()


# --- quantize.py -------------------------------------------------------------------------------------


NETWORKS = "{% if cookiecutter.gpt %}GPT{% endif %}{% if cookiecutter.gpt and cookiecutter.clip %} or {% endif %}{% if cookiecutter.clip %}CLIP{% endif %}"  # what this project can quantize


def network_kind(checkpoint: Any, path: str) -> str:
    """The network's kind ("gpt" or "clip") from the checkpoint's hyper-parameters, or one clear error."""
    if not isinstance(checkpoint, dict):
        checkpoint = {}
    if checkpoint.get("quantization"):
        method = checkpoint["quantization"]["method"]
        raise ConfigError(f"ckpt_path: {path} is already quantized ({method}); pass the float checkpoint")
    net = checkpoint.get("hyper_parameters", {}).get("net")
{%- if cookiecutter.clip %}
    if isinstance(net, dict) and "image_model" in net:
        return "clip"
{%- endif %}
{%- if cookiecutter.gpt %}
    if isinstance(net, dict) and "num_layers" in net:
        return "gpt"
{%- endif %}
    found = sorted(checkpoint.get("hyper_parameters", {}))
    raise ConfigError(
        f"ckpt_path: {path} holds no {NETWORKS} network written by train.py "
        f"(expected hyper_parameters.net; the file has {found})"
    )


def build_module(kind: str, checkpoint: dict[str, Any]) -> Any:
    """The LightningModule that validates this network, with the checkpoint's float weights in it."""
    hparams = checkpoint["hyper_parameters"]
{%- if cookiecutter.gpt %}
    if kind == "gpt":  # a GPT run, or a distillation run whose `net` is the student
        from .modules.gpt import GPTModule

        module = GPTModule(**{**hparams, "qat": None})  # fake quantization is for training only
        module.net = load_net(build_causal_lm(hparams["net"], "ckpt_path: hyper_parameters.net"), checkpoint)
        return module
{%- endif %}
{%- if cookiecutter.clip %}
    from .modules.clip import CLIPModule

    net = {**hparams["net"], "image_checkpoint": None}  # the tower's weights are in the state dict
    module = CLIPModule(**{**hparams, "net": net})
    module.net = load_net(build(net, "ckpt_path: hyper_parameters.net"), checkpoint)
    return module
{%- else %}
    raise AssertionError(kind)
{%- endif %}


def decode_tokens_per_sec(net: nn.Module, device: torch.device, settings: DictConfig) -> float:
    """Greedy decoding at batch 1 through the KV cache: new tokens / median seconds per call."""
    from .generation import generate

    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, net.config.vocab_size, (1, settings.prompt_tokens), generator=generator).to(device)
    generate(net, prompt, settings.new_tokens, temperature=0)  # warm-up
    ms = median_step_ms(lambda: generate(net, prompt, settings.new_tokens, temperature=0), settings.repeats, device)
    return settings.new_tokens / (ms / 1e3)


def measure(name: str, module: Any, kind: str, cfg: DictConfig, datamodule: Any, device: torch.device) -> dict:
    trainer = build_trainer(
        cfg, accelerator=device.type, devices=1, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = metrics_of(trainer)
    module.net.to(device).eval()
    row = {"weights": name, "size_MB": state_bytes(module.net) / 1e6}
    if kind == "gpt":
        row["val/loss"], row["val/ppl"] = metrics["val/loss"], metrics["val/ppl"]
        row["decode_tok_s"] = decode_tokens_per_sec(module.net, device, cfg.quantize.decode)
    else:
        row["val/i2t_R@1"], row["val/t2i_R@1"] = metrics["val/i2t_R@1"], metrics["val/t2i_R@1"]
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    cells = [[f"{r[c]:.5g}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)), "-|-".join("-" * w for w in widths)]
    return "\n".join(lines + [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells])


def save_quantized(checkpoint: dict[str, Any], net: nn.Module, method: str, out: Path) -> Path:
    """The checkpoint without training state, its network weights replaced by the quantized ones;
    written to a temporary file and renamed, so no half-written file is left behind."""
    import torchao

    training_state = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks")
    kept = {k: v for k, v in checkpoint.items() if k not in training_state}
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    quantized = {**kept, "state_dict": state, "quantization": {"method": method, "torchao": torchao.__version__}}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}-", dir=out.parent)
    os.close(fd)
    try:
        torch.save(quantized, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """quantize.py: measure the float network, quantize it, measure again, save, print the table."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    method = cfg.quantize.method
    check_method(method, device)
    path = Path(cfg.ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r} is not a file (expected a .ckpt written by train.py)")
    checkpoint = read_checkpoint(path)
    kind = network_kind(checkpoint, cfg.ckpt_path)
    out = Path(cfg.output) if cfg.output else path.with_name(f"{path.stem}-{method}.ckpt")
    datamodule = instantiate(cfg.data, _convert_="all")
    rows = [measure("float32", build_module(kind, checkpoint), kind, cfg, datamodule, device)]
    if kind == "gpt":  # (a CLIP image tower in bfloat16 would need bfloat16 images: no such row)
        bf16 = build_module(kind, checkpoint)
        bf16.net.to(torch.bfloat16)
        rows.append(measure("bfloat16", bf16, kind, cfg, datamodule, device))
    module = build_module(kind, checkpoint)
    quantize_net(module.net.to(device), method)
    rows.append(measure(method, module, kind, cfg, datamodule, device))
    save_quantized(checkpoint, module.net.cpu(), method, out)
    print(format_table(rows), flush=True)
    print(f"quantized checkpoint: {out} ({out.stat().st_size / 1e6:.3g} MB)", flush=True)
    return rows
