"""Autoregressive sampling from a causal language model (temperature, top-k, nucleus top-p) through
its KV cache when it offers one, and loading one from a checkpoint (train.py's, quantize.py's or an
HF import). Uses only the causal-LM protocol (networks.CausalLM): `net(idx)` gives the logits,
`net.config.vocab_size` / `max_length` bound what is sampled and read."""

import sys
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from .checkpoints import load_net, read_checkpoint
from .data.tokenizer import decode_utf8, eot_id
from .errors import ConfigError, DataFormatError, DataPathError
from .networks import CausalLM, build_causal_lm


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


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits: (B, V) float -> (B, 1) next ids. temperature=0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)  # (B, 1)


class _Recompute:
    """Next-token logits without a cache: the whole context (its last max_length tokens) runs through
    the network's forward for every token. Works for any network; every row must be unpadded."""

    def __init__(self, model: nn.Module, idx: torch.Tensor) -> None:
        self.model, self.seq = model, idx  # (B, T)

    def __call__(self, new: torch.Tensor | None) -> torch.Tensor:
        if new is not None:
            self.seq = torch.cat([self.seq, new], dim=1)
        return self.model(self.seq[:, -self.model.config.max_length :])[:, -1]  # (B, V_padded)


class _Cached:
    """Next-token logits through the network's key/value cache (init_cache + decode): the prompt is
    prefilled once, then each step runs one token. Rows are left-padded by `pad` (B,) slots.

    Past max_length every position of the sliding window shifts by one each step, so no cached key
    stays valid: each step then recomputes the window (the last max_length tokens), exactly as the
    path without a cache does."""

    def __init__(
        self, model: nn.Module, idx: torch.Tensor, pad: torch.Tensor, max_new_tokens: int, step: Any, span: int | None
    ) -> None:
        limit = model.config.max_length
        self.model, self.step, self.limit = model, step, limit
        self.seq, self.pad = idx, pad  # (B, C) all tokens so far, left-padded; (B,)
        window = min(idx.size(1), limit)
        # Slots for the prompt and every new token but the last (it is sampled, never run), up to the limit.
        length = min(max(window + max_new_tokens - 1, span or 0), limit)
        if step is model.decode:
            self.cache = model.init_cache(idx.size(0), length)
        else:  # compiled: one cache per shape, reused, so a CUDA graph replays on the same addresses
            self.cache = static_cache(model, idx.size(0), length)
        self.next_slot = window

    def _prefill(self) -> torch.Tensor:
        window = min(self.seq.size(1), self.limit)
        dropped = self.seq.size(1) - window  # columns left of the window
        self.cache.pad.copy_((self.pad - dropped).clamp(min=0))
        slots = torch.arange(window, device=self.seq.device)
        return self.model.decode(self.seq[:, -window:], slots, self.cache)

    def __call__(self, new: torch.Tensor | None) -> torch.Tensor:
        if new is None:
            return self._prefill()
        self.seq = torch.cat([self.seq, new], dim=1)
        if self.next_slot >= self.cache.length:
            return self._prefill()  # past max_length: recompute the sliding window
        slot = torch.tensor([self.next_slot], device=new.device)  # a tensor: one compiled graph for all slots
        self.next_slot += 1
        return self.step(new, slot, self.cache)


# Per model: its compiled decode step per torch.compile mode, and its static caches per shape.
_COMPILED: "weakref.WeakKeyDictionary[nn.Module, dict[Any, Any]]" = weakref.WeakKeyDictionary()


def static_cache(model: nn.Module, batch_size: int, length: int) -> Any:
    """The model's cache for this shape, made once and reused by every compiled call: its buffers
    never move (marked static for torch.compile). Stale values in it are never read: the prefill
    rewrites the slots it uses, and the mask hides the slots not written yet."""
    caches = _COMPILED.setdefault(model, {}).setdefault("caches", {})
    if (batch_size, length) not in caches:
        cache = model.init_cache(batch_size, length)
        for t in cache.tensors():
            torch._dynamo.mark_static_address(t)
        caches[batch_size, length] = cache
    return caches[batch_size, length]


def compiled_decode(model: nn.Module, mode: str) -> Any:
    """model.decode under torch.compile (one per model and mode, reused across calls). Shapes are
    static (one token, a fixed cache), so it is traced once; mode="reduce-overhead" adds CUDA graphs."""
    per_model = _COMPILED.setdefault(model, {})
    if mode not in per_model:
        if any(type(p) not in (nn.Parameter, torch.Tensor) for p in model.parameters()):
            # torchao's quantized weights are tensor subclasses; as plain tensors behind a
            # parametrization (the same values) Inductor compiles a faster step: 16 tokens at batch 1
            # from gpt2-124m with int8 weights, 43 -> 30 ms on an H200 (docs/inference.md). This
            # renames the weights in state_dict(): save a quantized network before compiling it.
            from torchao.utils import unwrap_tensor_subclass

            unwrap_tensor_subclass(model)
        per_model[mode] = torch.compile(model.decode, mode=mode, fullgraph=True, dynamic=False)
    return per_model[mode]


def check_prompt(idx: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """The number of left-padding columns of each row, (B,); a clear error for a malformed batch."""
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"idx must be (batch, length) with length >= 1, got shape {tuple(idx.shape)}")
    B, T = idx.shape
    if lengths is None:
        return torch.zeros(B, dtype=torch.long, device=idx.device)
    lengths = torch.as_tensor(lengths, device=idx.device)
    if lengths.shape != (B,) or not bool(((lengths >= 1) & (lengths <= T)).all()):
        raise ValueError(f"lengths must hold {B} prompt lengths in [1, {T}], got {lengths.tolist()}")
    return T - lengths.long()


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
    lengths: torch.Tensor | None = None,
    use_cache: bool = True,
    compile: str | None = None,
    cache_length: int | None = None,
) -> torch.Tensor:
    """idx: (B, T) prompt ids -> (B, T + n) ids: the prompts, then n new tokens per row in columns T:
    (n = max_new_tokens, fewer only when every row has produced `stop_token`; a row that stopped
    repeats stop_token). temperature=0 is greedy decoding.

    Prompts of different lengths are left-padded: row b's prompt is idx[b, T - lengths[b]:]; the
    padding values are never read. Networks that offer a cache (init_cache and decode, as the GPT
    does) prefill each prompt once and then run one token per step; `use_cache=False`, or a network
    without them, recomputes the whole context for every token (padded rows then run one by one).
    `compile`: a torch.compile mode ("default", "reduce-overhead", ...) for the one-token step; its
    cache is reused across calls (one compiled call at a time per model: not thread-safe).
    `cache_length`: make the cache at least this long (up to max_length), so that calls of other
    prompt lengths share one compiled graph (the server passes max_length); None: what the call needs.
    Past max_length the context is the last max_length tokens (a sliding window) either way."""
    check_sampling(temperature, top_k, top_p)
    pad = check_prompt(idx, lengths)
    if max_new_tokens < 0 or temperature < 0:
        raise ValueError(f"max_new_tokens and temperature must be >= 0, got {max_new_tokens}, {temperature}")
    if max_new_tokens == 0:
        return idx
    if use_cache and hasattr(model, "init_cache"):
        step = model.decode if compile is None else compiled_decode(model, compile)
        logits_of = _Cached(model, idx, pad, max_new_tokens, step, cache_length)
    elif bool(pad.any()):  # no cache and ragged rows: each row on its own, unpadded
        rows = [
            generate(model, idx[b : b + 1, int(pad[b]) :], max_new_tokens, temperature, top_k, top_p, generator,
                     stop_token, use_cache=False)[:, idx.size(1) - int(pad[b]) :]
            for b in range(idx.size(0))
        ]  # fmt: skip
        n = max(r.size(1) for r in rows)  # rows that stopped early are filled with stop_token
        new = torch.cat([F.pad(r, (0, n - r.size(1)), value=stop_token or 0) for r in rows])
        return torch.cat([idx, new], dim=1)
    else:
        logits_of = _Recompute(model, idx)
    vocab_size = model.config.vocab_size
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    new, logits = [], logits_of(None)
    for i in range(max_new_tokens):
        next_id = sample_next(logits[:, :vocab_size].float(), temperature, top_k, top_p, generator)  # padding ids never
        if stop_token is not None:
            next_id = next_id.masked_fill(done[:, None], stop_token)
            done |= next_id[:, 0] == stop_token
        new.append(next_id)
        if i + 1 == max_new_tokens or (stop_token is not None and bool(done.all())):
            break
        logits = logits_of(next_id)
    return torch.cat([idx, *new], dim=1)


def generate_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop_token: int | None = None,
    compile: str | None = None,
    cache_length: int | None = None,
) -> list[list[int]]:
    """Prompts of any lengths (token id lists, each non-empty) decoded together in one batch; per
    prompt, the new ids (up to and including stop_token when it appears)."""
    if not prompts or not all(len(p) for p in prompts):
        raise ValueError("generate_batch needs at least one prompt, and no empty prompt")
    device = next(model.parameters()).device
    T = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), T, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        idx[b, T - len(p) :] = torch.tensor(p, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    out = generate(model, idx, max_new_tokens, temperature, top_k, top_p, generator, stop_token, lengths,
                   compile=compile, cache_length=cache_length)  # fmt: skip
    rows = out[:, T:].tolist()
    return [r[: r.index(stop_token) + 1] if stop_token in r else r for r in rows]


def complete(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    num_samples: int | None = None,
    use_cache: bool = True,
    compile: str | None = None,
) -> str | list[str]:
    """The text the model appends to `prompt` (the prompt itself is not repeated); with
    `num_samples`, a list of that many continuations decoded as one batch."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt).ids or [eot_id(tokenizer)]  # an empty prompt starts a new document
    if len(ids) > model.config.max_length:
        raise ConfigError(
            f"prompt is {len(ids)} tokens but the model's context is {model.config.max_length} tokens "
            f"(model.net.max_length): shorten the prompt (it starts {prompt[:40]!r})"
        )
    idx = torch.tensor([ids] * (num_samples or 1), dtype=torch.long, device=device)
    out = generate(model, idx, max_new_tokens, temperature, top_k, top_p, generator, None, None, use_cache, compile)
    texts = [decode_utf8(tokenizer, row) for row in out[:, len(ids) :].tolist()]  # whole characters only
    return texts if num_samples is not None else texts[0]


def load_network_checkpoint(ckpt_path: str, key: str = "ckpt_path") -> tuple[CausalLM, Tokenizer]:
    """The network `net` of a checkpoint train.py wrote (a GPT run, or a distillation run, whose
    `net` is the student), quantize.py wrote or `python -m <package>.hf import` wrote, and the
    tokenizer saved in it, on the CPU in train mode. `key` is the config key that named the file,
    for the error messages. Under a meta-device context (a module counting FLOPs before it builds)
    no weights are copied."""
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
    if not isinstance(hparams.get("net"), dict) or "_target_" not in hparams["net"]:
        raise ConfigError(
            f"{key}: checkpoint {ckpt_path} holds no network node with a _target_ (hyper_parameters has "
            f"{sorted(hparams)}): was it written by train.py of this project?"
        )
    if "image_model" in hparams["net"]:
        raise ConfigError(f"{key}: checkpoint {ckpt_path} holds a CLIP model, not a GPT: use the pipeline for it")
    model = build_causal_lm(hparams["net"], f"{key}={ckpt_path}: hyper_parameters.net")
    if not any(p.is_meta for p in model.parameters()):
        load_net(model, checkpoint)
    tokenizer = Tokenizer.from_str(tokenizer_json)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise ConfigError(
            f"{key}: checkpoint {ckpt_path} holds a tokenizer of {tokenizer.get_vocab_size()} tokens for a model of "
            f"{model.config.vocab_size}: they were not trained together"
        )
    return model, tokenizer


def pretrained(ckpt_path: str) -> CausalLM:
    """The network of a checkpoint, weights included: the `_target_` of configs/model/net/pretrained.yaml,
    to fine-tune a trained or imported model. A checkpoint of that run rebuilds the network from
    `ckpt_path` again, then loads its own weights over it: keep the file where it is."""
    return load_network_checkpoint(ckpt_path, key="model.net.ckpt_path")[0]


def load_checkpoint_for_generation(ckpt_path: str, device: str = "cpu") -> tuple[CausalLM, Tokenizer]:
    """The network (the student, for a distillation checkpoint) and its tokenizer, ready to sample."""
    model, tokenizer = load_network_checkpoint(ckpt_path)
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
    """generate.py: cfg has ckpt_path, num_samples, max_new_tokens, temperature, top_k, top_p, seed,
    device, compile. Returns the continuations of `prompt` (see read_prompt), decoded as one batch.
    The checkpoint may be one train.py wrote or its quantize.py version."""
    check_sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    if cfg.num_samples < 1 or cfg.max_new_tokens < 0:
        raise ConfigError(
            f"num_samples={cfg.num_samples} and max_new_tokens={cfg.max_new_tokens}: expected num_samples >= 1 "
            "and max_new_tokens >= 0"
        )
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_checkpoint_for_generation(cfg.ckpt_path, device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    return complete(
        model, tokenizer, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, generator,
        num_samples=cfg.num_samples, compile=cfg.compile,
    )  # fmt: skip
