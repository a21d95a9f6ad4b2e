"""Hugging Face GPT-2 weights in and out of this project's GPT (models/gpt.py).

    python -m {{cookiecutter.package}}.hf import SRC OUT.ckpt    # SRC: a save_pretrained folder, or a .safetensors file
    python -m {{cookiecutter.package}}.hf export CKPT OUT_DIR    # OUT_DIR loads with GPT2LMHeadModel.from_pretrained

SRC needs its config.json and tokenizer.json beside the weights. The imported checkpoint holds the
network node (`_target_` the GPT, bias on, as GPT-2 has), its weights and the tokenizer, like a
checkpoint train.py writes: generate.py samples from it, `model.teacher.ckpt_path=` distils from it
and `model/net=pretrained model.net.ckpt_path=` fine-tunes it. The export writes config.json,
model.safetensors and the checkpoint's tokenizer.json. Reading needs `safetensors`, exporting
`transformers` (pip install -e ".[hf]"); nothing is ever downloaded.

GPT-2 keeps its linear layers as Conv1D, weights (in, out): they are transposed to nn.Linear's
(out, in) both ways. The vocabulary is padded to a multiple of 64 here (zero rows, never sampled
and left out of the loss) and cut back on export, so export -> import is bitwise the same.
"""

import argparse
import json
import os
import shutil
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from .checkpoints import save_atomically
from .cli import exit_on_user_error
from .errors import ConfigError, DataPathError
from .models.gpt import GPT, GPTConfig

GPT_TARGET = f"{GPT.__module__}.{GPT.__qualname__}"
# GPT-2 settings this GPT reproduces; any other value cannot be converted (the key names what differs).
REQUIRED = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # both GELU's tanh approximation
    "layer_norm_epsilon": (1e-5,),  # nn.LayerNorm's eps
    "scale_attn_weights": (True,),  # 1/sqrt(head_dim)
    "scale_attn_by_inverse_layer_idx": (False,),
    "reorder_and_upcast_attn": (False,),
    "add_cross_attention": (False,),
    "tie_word_embeddings": (True,),
}
# Our name -> GPT-2's, per block; the "*.weight" of Conv1D layers are transposed.
BLOCK_KEYS = {
    "ln_1": "ln_1",
    "attn.qkv": "attn.c_attn",
    "attn.proj": "attn.c_proj",
    "ln_2": "ln_2",
    "mlp.fc": "mlp.c_fc",
    "mlp.proj": "mlp.c_proj",
}
CONV1D = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


def net_node(config: dict[str, Any], source: str) -> dict[str, Any]:
    """The GPT `_target_` node for a GPT-2 config.json; a setting the GPT cannot reproduce is a ConfigError."""
    if config.get("model_type") != "gpt2":
        raise ConfigError(
            f"{source}: model_type={config.get('model_type')!r}; only GPT-2 (model_type 'gpt2') converts to this GPT"
        )
    for key, allowed in REQUIRED.items():
        if key in config and config[key] not in allowed:
            raise ConfigError(f"{source}: {key}={config[key]!r} cannot be converted (this GPT has {allowed[0]!r})")
    if config.get("n_inner") not in (None, 4 * config["n_embd"]):
        raise ConfigError(f"{source}: n_inner={config['n_inner']} cannot be converted (this GPT's MLP is 4 * n_embd)")
    dropouts = {config.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(dropouts) > 1:
        raise ConfigError(f"{source}: resid_pdrop, embd_pdrop and attn_pdrop differ; this GPT has one dropout")
    return {
        "_target_": GPT_TARGET,
        "vocab_size": config["vocab_size"],
        "max_length": config["n_positions"],
        "num_layers": config["n_layer"],
        "d_model": config["n_embd"],
        "num_heads": config["n_head"],
        "dropout": dropouts.pop(),
        "bias": True,
        "gradient_checkpointing": False,
    }


def from_hf_state(hf: dict[str, torch.Tensor], node: dict[str, Any]) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict -> GPT's (padded vocabulary, Linear layout)."""
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    wte = hf["wte.weight"]  # (V, d)
    padded = GPTConfig(**{k: v for k, v in node.items() if k != "_target_"}).padded_vocab_size
    tok = torch.zeros(padded, wte.shape[1], dtype=wte.dtype)
    tok[: wte.shape[0]] = wte  # padding rows are zeros: never sampled, never in the loss
    state = {"tok_emb.weight": tok, "lm_head.weight": tok, "pos_emb.weight": hf["wpe.weight"]}
    for name in ("weight", "bias"):
        state[f"ln_f.{name}"] = hf[f"ln_f.{name}"]
    for i in range(node["num_layers"]):
        for ours, theirs in BLOCK_KEYS.items():
            for name in ("weight", "bias"):
                value = hf[f"h.{i}.{theirs}.{name}"]
                state[f"blocks.{i}.{ours}.{name}"] = value.t() if ours in CONV1D and name == "weight" else value
    return {k: v.contiguous() for k, v in state.items()}


def to_hf_state(state: dict[str, torch.Tensor], vocab_size: int, num_layers: int) -> dict[str, torch.Tensor]:
    """GPT's state dict -> GPT2LMHeadModel's (vocabulary cut to vocab_size, Conv1D layout)."""
    wte = state["tok_emb.weight"][:vocab_size]
    out = {"transformer.wte.weight": wte, "lm_head.weight": wte, "transformer.wpe.weight": state["pos_emb.weight"]}
    for name in ("weight", "bias"):
        out[f"transformer.ln_f.{name}"] = state[f"ln_f.{name}"]
    for i in range(num_layers):
        for ours, theirs in BLOCK_KEYS.items():
            for name in ("weight", "bias"):
                value = state[f"blocks.{i}.{ours}.{name}"]
                out[f"transformer.h.{i}.{theirs}.{name}"] = value.t() if ours in CONV1D and name == "weight" else value
    return {k: v.contiguous() for k, v in out.items()}


def read_hf(src: str | Path, key: str = "SRC") -> tuple[dict[str, Any], dict[str, torch.Tensor], Tokenizer, Path]:
    """(config.json, weights, tokenizer, folder) of a save_pretrained folder or of a .safetensors file
    with config.json and tokenizer.json beside it."""
    src = Path(src)
    if src.is_dir():
        folder = src
        weights = next((p for p in (src / "model.safetensors", src / "pytorch_model.bin") if p.is_file()), None)
        if weights is None:
            raise DataPathError(f"{key}={src}: no model.safetensors or pytorch_model.bin in the folder")
    elif src.is_file() and src.suffix == ".safetensors":
        folder, weights = src.parent, src
    else:
        raise DataPathError(f"{key}={src}: expected a save_pretrained folder or a .safetensors file")
    for name in ("config.json", "tokenizer.json"):
        if not (folder / name).is_file():
            raise DataPathError(f"{key}={src}: no {name} in {folder} (the weights need their {name} beside them)")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    return config, state, Tokenizer.from_file(str(folder / "tokenizer.json")), folder


def convert(src: str | Path, key: str = "SRC") -> tuple[dict[str, Any], dict[str, torch.Tensor], Tokenizer]:
    """(GPT node, GPT state dict in fp32, tokenizer) of a Hugging Face GPT-2, checked."""
    config, hf_state, tokenizer, _ = read_hf(src, key)
    node = net_node(config, f"{key}={src}: config.json")
    n_tokens = tokenizer.get_vocab_size()
    if n_tokens > node["vocab_size"]:
        raise ConfigError(
            f"{key}={src}: tokenizer.json has {n_tokens} tokens but the model's vocab_size is {node['vocab_size']}: "
            "the tokenizer does not belong to these weights"
        )
    hf_state = {k: v.float() for k, v in hf_state.items()}
    try:
        state = from_hf_state(hf_state, node)
    except KeyError as e:
        raise ConfigError(f"{key}={src}: the weights lack {e.args[0]!r}: not a GPT2LMHeadModel state dict") from None
    return node, state, tokenizer


def load_pretrained(src: str | Path, key: str = "model.teacher.hf") -> tuple[GPT, Tokenizer]:
    """A Hugging Face GPT-2 as this project's GPT (fp32, train mode) and its tokenizer."""
    node, state, tokenizer = convert(src, key)
    model = GPT(**{k: v for k, v in node.items() if k != "_target_"})
    model.load_state_dict(state)
    return model, tokenizer


def gpt_module_settings() -> dict[str, Any]:
    """model=gpt's optimizer, scheduler and compile, composed from configs/ (the one place they are
    written), so GPTModule.load_from_checkpoint and eval.py read an import like a checkpoint of train.py."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from .networks import CONFIGS

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        model = compose("train", overrides=["model=gpt"]).model
    GlobalHydra.instance().clear()
    return {
        "optimizer": OmegaConf.to_container(model.optimizer, resolve=True),
        "scheduler": OmegaConf.to_container(model.scheduler, resolve=True),
        "compile": model.compile,
    }


def import_checkpoint(src: str | Path, out: str | Path) -> Path:
    """Write a Hugging Face GPT-2 as a checkpoint of this project (GPTModule's layout, no training state)."""
    node, state, tokenizer = convert(src)
    checkpoint = {
        "state_dict": {f"net.{k}": v for k, v in state.items()},
        # Plain containers: torch.load(weights_only=True) reads them.
        "hyper_parameters": {"net": node, **gpt_module_settings()},
        "TextDataModule": {"tokenizer": tokenizer.to_str()},  # where train.py's checkpoints keep it
        "pytorch-lightning_version": version("lightning"),  # what load_from_checkpoint migrates from
        "imported_from": str(Path(src).resolve()),
    }
    return save_atomically(checkpoint, out)


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Write the GPT of a checkpoint (train.py's, a distillation's student, an import) as a folder
    GPT2LMHeadModel.from_pretrained loads: config.json, model.safetensors and tokenizer.json."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from .generation import load_network_checkpoint

    model, tokenizer = load_network_checkpoint(str(ckpt_path), key="CKPT")
    if type(model) is not GPT:
        raise ConfigError(
            f"CKPT={ckpt_path} holds a {type(model).__module__}.{type(model).__qualname__}, not {GPT_TARGET}: "
            "only this project's GPT has GPT-2's layout"
        )
    c = model.config
    if not c.bias:
        raise ConfigError(
            f"CKPT={ckpt_path}: the GPT was trained with bias=false; GPT-2 has biases in every Linear and "
            "LayerNorm (train with model.net.bias=true to export)"
        )
    hf_config = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.max_length,
        n_embd=c.d_model,
        n_layer=c.num_layers,
        n_head=c.num_heads,
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        bos_token_id=tokenizer.token_to_id("<|endoftext|>"),
        eos_token_id=tokenizer.token_to_id("<|endoftext|>"),
    )
    hf_model = GPT2LMHeadModel(hf_config)
    missing, unexpected = hf_model.load_state_dict(
        to_hf_state(model.state_dict(), c.vocab_size, c.num_layers), strict=False
    )
    if [k for k in missing if not k.endswith("attn.bias")] or unexpected:
        raise RuntimeError(f"GPT-2 layout mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataPathError(f"OUT_DIR={out_dir} exists and is not empty; choose a new folder")
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    try:
        hf_model.save_pretrained(tmp)
        tokenizer.save(str(tmp / "tokenizer.json"))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__name__}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="a Hugging Face GPT-2 -> a checkpoint of this project")
    imp.add_argument("src", metavar="SRC", help="a save_pretrained folder, or a .safetensors file with config.json")
    imp.add_argument("out", metavar="OUT.ckpt")
    exp = commands.add_parser("export", help="a checkpoint of this project -> a Hugging Face GPT-2 folder")
    exp.add_argument("ckpt", metavar="CKPT")
    exp.add_argument("out", metavar="OUT_DIR")
    args = parser.parse_args(argv)
    if args.command == "import":
        print(import_checkpoint(args.src, args.out))
    else:
        print(export_checkpoint(args.ckpt, args.out))


if __name__ == "__main__":
    main()
