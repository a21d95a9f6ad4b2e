"""Autoregressive sampling from a causal language model (temperature, top-k, nucleus top-p), and
loading one from a checkpoint. Uses only the causal-LM protocol (networks.CausalLM): `net(idx)`
gives the logits, `net.config.vocab_size` / `max_length` bound what is sampled and read."""

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from .data.tokenizer import eot_id
from .errors import ConfigError, DataPathError
from .networks import CausalLM, build_causal_lm


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits: (B, V). Returns a copy with everything outside the top-k / top-p set at -inf."""
    logits = logits.clone()
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits[logits < kth] = float("-inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already cover top_p; the top token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits[drop_sorted.scatter(1, order, drop_sorted)] = float("-inf")
    return logits


@torch.no_grad()
def generate(
    model: CausalLM,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop_token: int | None = None,
) -> torch.Tensor:
    """idx: (B, T) prompt ids -> (B, T + n) ids. temperature=0 is greedy decoding."""
    vocab_size = model.config.vocab_size
    for _ in range(max_new_tokens):
        context = idx[:, -model.config.max_length :]
        logits = model(context)[:, -1, :vocab_size].float()  # padding ids are never sampled
        if temperature == 0:
            next_id = logits.argmax(-1, keepdim=True)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            next_id = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        idx = torch.cat([idx, next_id], dim=1)
        if stop_token is not None and bool((next_id == stop_token).all()):
            break
    return idx


def complete(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> str:
    """The text the model appends to `prompt` (the prompt itself is not repeated)."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt).ids or [eot_id(tokenizer)]  # an empty prompt starts a new document
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = generate(model, idx, max_new_tokens, temperature, top_k, top_p, generator)
    return tokenizer.decode(out[0, len(ids) :].tolist())


def load_network_checkpoint(ckpt_path: str, key: str = "ckpt_path") -> tuple[CausalLM, Tokenizer]:
    """The network `net` of a checkpoint train.py wrote (a GPT run, or a distillation run, whose
    `net` is the student) or `python -m <package>.hf import` wrote, and the tokenizer saved in it,
    on the CPU in train mode. `key` is the config key that named the file, for the error messages.
    Under a meta-device context (a module counting FLOPs before it builds) no weights are copied."""
    path = Path(ckpt_path)
    if path.is_dir():
        raise DataPathError(
            f"{key}={ckpt_path!r} is a sharded checkpoint folder; consolidate it into one file first: "
            f"python -m {__package__}.checkpoints {ckpt_path} full.ckpt"
        )
    if not path.is_file():
        raise DataPathError(f"{key}={ckpt_path!r} is not a file (expected a .ckpt written by train.py)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # read as used
    tokenizer_json = next(
        (v["tokenizer"] for v in checkpoint.values() if isinstance(v, dict) and v.get("tokenizer")), None
    )
    if tokenizer_json is None:
        raise ConfigError(f"{key}: checkpoint {ckpt_path} holds no tokenizer: was it written by train.py on text data?")
    hparams = checkpoint.get("hyper_parameters", {})
    if not isinstance(hparams.get("net"), dict) or "_target_" not in hparams["net"]:
        raise ConfigError(
            f"{key}: checkpoint {ckpt_path} holds no network node with a _target_ (hyper_parameters has "
            f"{sorted(hparams)}): was it written by train.py of this project?"
        )
    state = {k[len("net.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    model = build_causal_lm(hparams["net"], f"{key}={ckpt_path}: hyper_parameters.net")
    if not any(p.is_meta for p in model.parameters()):
        model.load_state_dict(state)
    return model, Tokenizer.from_str(tokenizer_json)


def pretrained(ckpt_path: str) -> CausalLM:
    """The network of a checkpoint, weights included: the `_target_` of configs/model/net/pretrained.yaml,
    to fine-tune a trained or imported model. A checkpoint of that run rebuilds the network from
    `ckpt_path` again, then loads its own weights over it: keep the file where it is."""
    return load_network_checkpoint(ckpt_path, key="model.net.ckpt_path")[0]


def load_checkpoint_for_generation(ckpt_path: str, device: str = "cpu") -> tuple[CausalLM, Tokenizer]:
    """The network (the student, for a distillation checkpoint) and its tokenizer, ready to sample."""
    model, tokenizer = load_network_checkpoint(ckpt_path)
    return model.to(device).eval(), tokenizer


def sample_from_checkpoint(cfg: Any) -> list[str]:
    """generate.py: cfg has ckpt_path, prompt, num_samples, max_new_tokens, temperature, top_k, top_p, seed, device."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_checkpoint_for_generation(cfg.ckpt_path, device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    return [
        complete(model, tokenizer, cfg.prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, generator)
        for _ in range(cfg.num_samples)
    ]
