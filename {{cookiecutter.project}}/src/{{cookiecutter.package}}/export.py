"""Export a trained GPT for use outside this project: `python export.py ckpt_path=... export.format=onnx`.

safetensors  <out>/model.safetensors (the float weights, the tied embedding/head stored once),
             <out>/config.json ({"architecture": "GPT", "config": GPTConfig fields}) and
             <out>/tokenizer.json; `load_safetensors(<out>)` rebuilds the GPT from them.
onnx         <out>/model.onnx (weights inside the file: models under 2 GB) and <out>/tokenizer.json.
             The graph is the forward: input "idx" int64 (batch, sequence) -> output "logits"
             float32 (batch, sequence, padded_vocab_size), with batch and sequence dynamic axes
             (sequence 1..max_length); opset 18 by default (export.opset). The export is checked by
             running the file with onnxruntime against the PyTorch logits (export.tolerance).
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig

from .errors import ConfigError
from .generation import load_network_checkpoint
from .models.gpt import GPT

FORMATS = ("safetensors", "onnx")


def export_safetensors(model: GPT, folder: Path, tokenizer_json: str | None = None) -> list[Path]:
    from safetensors.torch import save_model

    save_model(model, str(folder / "model.safetensors"))  # shared tensors are written once
    config = {"architecture": "GPT", "config": model.config.to_dict()}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    written = [folder / "model.safetensors", folder / "config.json"]
    if tokenizer_json is not None:
        (folder / "tokenizer.json").write_text(tokenizer_json)
        written.append(folder / "tokenizer.json")
    return written


def load_safetensors(folder: str | Path) -> GPT:
    """The GPT of a folder export_safetensors wrote, in eval mode on the CPU."""
    from safetensors.torch import load_model

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if config.get("architecture") != "GPT":
        raise ConfigError(f"{folder / 'config.json'}: architecture {config.get('architecture')!r}, expected 'GPT'")
    model = GPT(**config["config"])
    load_model(model, str(folder / "model.safetensors"))
    return model.eval()


def export_onnx(model: GPT, path: Path, opset: int) -> Path:
    example = torch.zeros(2, min(16, model.config.max_length), dtype=torch.long)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=model.config.max_length)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=True,
        input_names=["idx"],
        output_names=["logits"],
        dynamic_shapes={"idx": {0: batch, 1: sequence}},
        opset_version=opset,
        external_data=False,  # one self-contained file (ONNX's protobuf limit: models under 2 GB)
        verbose=False,
    )
    return path


def onnx_max_error(model: GPT, path: Path, shapes: list[tuple[int, int]]) -> float:
    """Largest |onnxruntime - PyTorch| logit over random batches of the given (batch, sequence) shapes."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape in shapes:
        idx = torch.randint(0, model.config.vocab_size, shape, generator=generator)
        (logits,) = session.run(None, {"idx": idx.numpy()})
        with torch.no_grad():
            worst = max(worst, (torch.from_numpy(logits) - model(idx)).abs().max().item())
    return worst


def run(cfg: DictConfig) -> list[Path]:
    """export.py: write the export folder (atomically: a temporary folder renamed at the end)."""
    fmt = cfg.export.format
    if fmt not in FORMATS:
        raise ConfigError(f"export.format={fmt!r}: expected one of {list(FORMATS)}")
    model, tokenizer = load_network_checkpoint(cfg.ckpt_path)
    model.eval()
    if any(type(p) is not torch.nn.Parameter for p in model.parameters()):
        raise ConfigError(f"ckpt_path: {cfg.ckpt_path} is quantized; export the float checkpoint it came from")
    path = Path(cfg.ckpt_path)
    out = Path(cfg.output) if cfg.output else path.with_name(f"{path.stem}-{fmt}")
    if out.exists():
        raise ConfigError(f"output={str(out)!r} already exists; remove it or choose another output=")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if fmt == "safetensors":
            export_safetensors(model, tmp, tokenizer.to_str())
        else:
            export_onnx(model, tmp / "model.onnx", cfg.export.opset)
            L = model.config.max_length
            error = onnx_max_error(model, tmp / "model.onnx", [(1, 1), (2, min(16, L)), (3, L)])
            print(f"onnxruntime vs PyTorch: max |logit difference| {error:.2e} (tolerance {cfg.export.tolerance})")
            if error > cfg.export.tolerance:
                raise RuntimeError(f"the ONNX export differs from PyTorch by {error:.2e} > {cfg.export.tolerance}")
            (tmp / "tokenizer.json").write_text(tokenizer.to_str())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    written = sorted(out.iterdir())
    for p in written:
        print(f"{p} ({p.stat().st_size / 1e6:.3g} MB)")
    return written
