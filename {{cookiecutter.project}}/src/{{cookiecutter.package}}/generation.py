"""Autoregressive sampling from a GPT (temperature, top-k, nucleus top-p), and loading one from a checkpoint."""

import sys
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from .checkpoints import read_checkpoint
from .data.tokenizer import decode_utf8, eot_id
from .errors import ConfigError, DataFormatError, DataPathError
from .models.gpt import GPT, GPTConfig


def check_sampling(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """Sampling options inside their range, or a ConfigError naming the option and the range."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ConfigError(f"temperature={temperature!r} is out of range: expected a number >= 0 (0: greedy decoding)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k={top_k!r} is out of range: expected an integer >= 1, or null for no top-k filter")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ConfigError(f"top_p={top_p!r} is out of range: expected 0 < top_p <= 1, or null for no nucleus filter")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits: (B, V). Returns a copy with everything outside the top-k / top-p set at -inf; the
    most likely token always stays, so the result never samples NaN."""
    check_sampling(top_k=top_k, top_p=top_p)
    logits = logits.clone()
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits[logits < kth] = float("-inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already cover top_p; the top token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop_sorted[:, 0] = False  # explicitly: a top_p below float32's smallest value compares as 0
        logits[drop_sorted.scatter(1, order, drop_sorted)] = float("-inf")
    return logits


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop_token: int | None = None,
) -> torch.Tensor:
    """idx: (B, T) prompt ids -> (B, T + n) ids. temperature=0 is greedy decoding."""
    check_sampling(temperature, top_k, top_p)
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
    model: GPT,
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
    if len(ids) > model.config.max_length:
        raise ConfigError(
            f"prompt is {len(ids)} tokens but the model's context is {model.config.max_length} tokens "
            f"(model.net.max_length): shorten the prompt (it starts {prompt[:40]!r})"
        )
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = generate(model, idx, max_new_tokens, temperature, top_k, top_p, generator)
    return decode_utf8(tokenizer, out[0, len(ids) :].tolist())  # whole characters only


def load_gpt_checkpoint(ckpt_path: str, key: str = "ckpt_path") -> tuple[GPT, Tokenizer]:
    """The GPT `net` of a checkpoint train.py wrote (a GPT run, or a distillation run, whose `net` is
    the student) and the tokenizer saved in it, on the CPU in train mode. `key` is the config key
    that named the file, for the error messages."""
    checkpoint = read_checkpoint(ckpt_path, key)
    if checkpoint is None:
        raise DataPathError(
            f"{key}={ckpt_path!r} is a sharded checkpoint folder; consolidate it into one file first: "
            f"python -m {__package__}.checkpoints {ckpt_path} full.ckpt"
        )
    tokenizer_json = next(
        (v["tokenizer"] for v in checkpoint.values() if isinstance(v, dict) and v.get("tokenizer")), None
    )
    if tokenizer_json is None:
        raise ConfigError(f"{key}: checkpoint {ckpt_path} holds no tokenizer: was it written by train.py on text data?")
    hparams = checkpoint.get("hyper_parameters", {})
    if not isinstance(hparams.get("net"), dict):
        raise ConfigError(f"{key}: checkpoint {ckpt_path} holds no GPT (hyper_parameters has {sorted(hparams)})")
    state = {k[len("net.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    model = GPT(GPTConfig.from_dict(hparams["net"]))
    model.load_state_dict(state)
    tokenizer = Tokenizer.from_str(tokenizer_json)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise ConfigError(
            f"{key}: checkpoint {ckpt_path} holds a tokenizer of {tokenizer.get_vocab_size()} tokens for a model of "
            f"{model.config.vocab_size}: they were not trained together"
        )
    return model, tokenizer


def load_checkpoint_for_generation(ckpt_path: str, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """The GPT (the student, for a distillation checkpoint) and its tokenizer, ready to sample."""
    model, tokenizer = load_gpt_checkpoint(ckpt_path)
    return model.to(device).eval(), tokenizer


def read_prompt(cfg: Any) -> str:
    """cfg.prompt, or the text of cfg.prompt_file ("-": standard input), for prompts that are long or
    awkward to quote on a command line."""
    if not cfg.get("prompt_file"):
        return cfg.prompt
    if cfg.prompt:
        raise ConfigError("set prompt or prompt_file, not both")
    if cfg.prompt_file == "-":
        return sys.stdin.read()
    path = Path(cfg.prompt_file)
    if not path.is_file():
        raise DataPathError(f"prompt_file={cfg.prompt_file!r} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"prompt_file={cfg.prompt_file!r} is not UTF-8 text (byte {e.start})") from None


def sample_from_checkpoint(cfg: Any, prompt: str) -> list[str]:
    """generate.py: cfg has ckpt_path, num_samples, max_new_tokens, temperature, top_k, top_p, seed, device.
    Returns the continuations of `prompt` (see read_prompt)."""
    check_sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    if cfg.num_samples < 1 or cfg.max_new_tokens < 0:
        raise ConfigError(
            f"num_samples={cfg.num_samples} and max_new_tokens={cfg.max_new_tokens}: expected num_samples >= 1 "
            "and max_new_tokens >= 0"
        )
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_checkpoint_for_generation(cfg.ckpt_path, device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    return [
        complete(model, tokenizer, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, generator)
        for _ in range(cfg.num_samples)
    ]
