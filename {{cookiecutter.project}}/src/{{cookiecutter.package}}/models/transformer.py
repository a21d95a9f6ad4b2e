"""Pre-LN transformer blocks shared by the GPT and the CLIP text tower. Imports only torch."""

import math

import torch
import torch.nn.functional as F
from torch import nn

STD = 0.02  # GPT-2's initialisation scale


class Linear(nn.Linear):
    """nn.Linear initialised N(0, std) with zero bias inside `reset_parameters`, i.e. while the layer
    itself is being built: strategies that partition each layer as soon as it exists (DeepSpeed's
    zero.Init) or materialise it later from the meta device then initialise it the same way."""

    def __init__(self, in_features: int, out_features: int, bias: bool, std: float = STD) -> None:
        self.std = std  # read by reset_parameters, which nn.Linear.__init__ calls
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding initialised N(0, 0.02) (torch's default is N(0, 1)), at construction as Linear."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=STD)


class SelfAttention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention` (flash / memory-efficient
    kernels on GPU). `causal=True` masks future positions; otherwise an optional padding mask."""

    def __init__(
        self, d_model: int, num_heads: int, dropout: float, bias: bool, causal: bool, proj_std: float = STD
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = Linear(d_model, 3 * d_model, bias)
        self.proj = Linear(d_model, d_model, bias, std=proj_std)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C). With `kv` (a layer's key/value buffers, (B, nh, S, hs) each) the new keys and
        values are written at cache `slots` (T,) and the queries attend over all S slots under
        `attn_mask` (B, 1, T, S), which hides the slots not written yet."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
        k = k.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
        v = v.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
        if kv is not None:
            k_cache, v_cache = kv
            k_cache.index_copy_(2, slots, k.to(k_cache.dtype))  # in place: the buffers keep their address
            v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
            k, v = k_cache, v_cache  # (B, nh, S, hs)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and attn_mask is None,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, d_model: int, dropout: float, bias: bool, proj_std: float = STD) -> None:
        super().__init__()
        self.fc = Linear(d_model, 4 * d_model, bias)
        self.proj = Linear(4 * d_model, d_model, bias, std=proj_std)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x)). The unit that FSDP shards and checkpointing recomputes.

    `depth` is the number of blocks in the stack: the two residual projections start at
    N(0, 0.02 / sqrt(2 * depth)) so the residual stream's variance does not grow with depth (GPT-2).
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float, bias: bool, causal: bool, depth: int = 1) -> None:
        super().__init__()
        proj_std = STD / math.sqrt(2 * depth)
        self.ln_1 = nn.LayerNorm(d_model, bias=bias)
        self.attn = SelfAttention(d_model, num_heads, dropout, bias, causal, proj_std)
        self.ln_2 = nn.LayerNorm(d_model, bias=bias)
        self.mlp = MLP(d_model, dropout, bias, proj_std)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, kv, slots)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys and values of the tokens decoded so far, so each new token costs one position, not the
    whole context. Static shapes: one (B, nh, S, hs) buffer pair per layer, written in place at
    given slots, so a compiled decode step is traced once and its buffers never move (CUDA graphs).

    Rows of a batch may hold prompts of different lengths, left-padded: `pad` (B,) is the number of
    padding slots at the start of each row. A token in slot s of row b sits at position
    s - pad[b] of its own sequence, and never attends to that row's padding."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        length: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, num_heads, length, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = length

    def tensors(self) -> list[torch.Tensor]:
        return [*self.k, *self.v, self.pad]

    def positions(self, slots: torch.Tensor) -> torch.Tensor:
        """slots (T,) -> (B, T) position of each new token in its own row (0 for padding slots)."""
        return (slots[None, :] - self.pad[:, None]).clamp(min=0)

    def mask(self, slots: torch.Tensor) -> torch.Tensor:
        """slots (T,) -> (B, 1, T, S) bool, True where a query may attend: slots written so far
        (causal) that are not the row's padding. A padding query sees itself, so no row of the
        softmax is empty (an all-masked row would give NaN, and NaN times a zero weight is NaN)."""
        keys = torch.arange(self.length, device=slots.device)  # (S,)
        causal = keys[None, :] <= slots[:, None]  # (T, S)
        real = keys[None, None, :] >= self.pad[:, None, None]  # (B, 1, S)
        itself = keys[None, :] == slots[:, None]  # (T, S)
        return (causal & (real | itself))[:, None]  # (B, 1, T, S)
