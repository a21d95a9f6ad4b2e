"""A GPT language model: token + position embeddings, pre-LN blocks, tied output head.

Imports only torch. Training, sharding and precision live elsewhere (modules/, parallel.py, configs/).
"""

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .transformer import Block, Embedding, KVCache, Linear


@dataclass
class GPTConfig:
    """The GPT's architecture, validated. No defaults here: the presets are configs/model/net/*.yaml."""

    vocab_size: int  # the tokenizer's size; the embedding is padded (padded_vocab_size)
    max_length: int  # block size: the longest sequence the position table covers
    num_layers: int
    d_model: int
    num_heads: int
    dropout: float
    bias: bool  # false: no biases in Linear/LayerNorm, a bit faster, no worse (nanoGPT); GPT-2 has them
    gradient_checkpointing: bool  # recompute each block in backward: less memory, ~30% more compute

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_length", "num_layers", "d_model", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"GPTConfig.d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def padded_vocab_size(self) -> int:
        # A multiple of 64 keeps the (d_model x vocab) matmuls on fast tensor-core tile sizes.
        return -(-self.vocab_size // 64) * 64

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GPT(nn.Module):
    """Follows the causal-LM protocol (networks.CausalLM). Built from its config fields as keyword
    arguments, as a `_target_` node in configs/model/net/ builds it; a subclass adds its own
    keywords and passes the rest on: `def __init__(self, *, window: int, **fields): super().__init__(**fields)`.
    """

    # The units that sharding wraps and compilation compiles one by one, and the methods compiled
    # whole besides them (see parallel.py).
    shard_units = (Block,)
    compile_methods = ("head_loss",)

    def __init__(
        self,
        *,
        vocab_size: int,
        max_length: int,
        num_layers: int,
        d_model: int,
        num_heads: int,
        dropout: float,
        bias: bool,
        gradient_checkpointing: bool,
    ) -> None:
        super().__init__()
        self.config = config = GPTConfig(
            vocab_size, max_length, num_layers, d_model, num_heads, dropout, bias, gradient_checkpointing
        )
        # Every layer initialises itself as it is built (transformer.py), so the weights come out the
        # same whether the strategy builds them whole, partitioned (DeepSpeed ZeRO-3) or on meta.
        self.tok_emb = Embedding(config.padded_vocab_size, config.d_model)
        self.pos_emb = Embedding(config.max_length, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config.d_model, config.num_heads, config.dropout, config.bias, causal=True, depth=config.num_layers)
            for _ in range(config.num_layers)
        )
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.lm_head = Linear(config.d_model, config.padded_vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): the output head reuses the token embedding.
        self.lm_head.weight = self.tok_emb.weight

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position table is left out by default (as in the scaling-law papers)."""
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        return n - self.pos_emb.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6N for the matmuls forward and backward, plus 12*L*d*T for the
        attention scores (PaLM appendix B; N excludes the position table)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.num_layers * c.d_model * seq_len

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
        """idx: (B, T) token ids -> logits (B, T, padded_vocab_size); with targets (B, T), the mean
        next-token cross-entropy instead (ignore_index masks padding). One entry point for both, so
        wrappers that hook the forward (FSDP2 gathering the embeddings and head) see every use."""
        B, T = idx.shape
        if self.config.max_length < T:
            raise ValueError(f"sequence length {T} exceeds max_length={self.config.max_length}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for block in self.blocks:
            if self.config.gradient_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if targets is None:
            return self.lm_head(self.ln_f(x))  # (B, T, V_padded)
        return self.head_loss(x, targets, ignore_index)

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Final LayerNorm, output head and cross-entropy in one function, so torch.compile can fuse
        them: the (B*T, V) logits then never exist in float32 in memory. The loss is Hugging Face's
        GPT-2 loss on the same weights (the padding columns are left out)."""
        logits = self.lm_head(self.ln_f(x))  # (B, T, V_padded)
        if self.config.padded_vocab_size != self.config.vocab_size:
            # Over the real vocabulary only: the padding columns are no tokens, so they take no probability.
            logits = logits[..., : self.config.vocab_size]  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy; targets are idx shifted by one, ignore_index masks padding."""
        return self(idx, targets, ignore_index)

    # Incremental decoding (generation.py uses these when a network offers them; a network without
    # them is decoded by recomputing the whole context for every token).

    def init_cache(self, batch_size: int, length: int | None = None) -> KVCache:
        """Empty key/value buffers for `batch_size` rows of up to `length` slots (max_length by
        default), on the model's device, in the dtype its activations have."""
        length = self.config.max_length if length is None else length
        if not 0 < length <= self.config.max_length:
            raise ValueError(f"cache length {length} must be in [1, max_length={self.config.max_length}]")
        c = self.config
        dtype = self.ln_f.weight.dtype
        return KVCache(c.num_layers, batch_size, c.num_heads, length, c.head_dim, self.ln_f.weight.device, dtype)

    def decode(self, idx: torch.Tensor, slots: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """idx: (B, T) new tokens, written at cache `slots` (T,) (the prefill passes the whole prompt,
        each later step one token) -> (B, padded_vocab_size) logits of the last one. Left-padded
        rows get their positions and padding mask from `cache.pad`."""
        pos = cache.positions(slots)  # (B, T)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        mask = cache.mask(slots)  # (B, 1, T, S)
        for block, k, v in zip(self.blocks, cache.k, cache.v):
            x = block(x, mask, (k, v), slots)
        return self.lm_head(self.ln_f(x[:, -1]))  # (B, V_padded): only the last token is sampled from
