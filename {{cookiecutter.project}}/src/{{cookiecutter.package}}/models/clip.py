"""A CLIP-style dual encoder: a timm image tower and a transformer text tower, projected to one
normalised embedding space, plus a learnable temperature.

The model returns features and the logit scale; the loss lives in losses/contrastive.py. Imports
torch, and timm for the image tower (any timm architecture, built without a classifier head).
Weights come from a local checkpoint file or from a random initialisation, never from a hub.
"""

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .transformer import Block, Embedding, Linear


@dataclass
class CLIPConfig:
    """The CLIP's architecture, validated. No defaults here: the presets are configs/model/clip_net/*.yaml."""

    # Image tower: any timm model name; `image_kwargs` go to timm.create_model (e.g. img_size,
    # patch_size, depth for a small ViT). `image_checkpoint`: a local .pth/.safetensors file, or None.
    image_model: str
    image_kwargs: dict[str, Any]
    image_checkpoint: str | None
    # Text tower: pre-LN transformer blocks shared with the GPT, pooled at the end-of-text token.
    vocab_size: int  # the tokenizer's size; the embedding is padded to a multiple of 64
    context_length: int  # caption tokens, EOT included
    eot_id: int  # the end-of-text token id: trained tokenizers give it id 0
    text_layers: int
    text_width: int
    text_heads: int
    # Causal attention (as OpenAI's CLIP): the first EOT sees exactly the caption, never the padding
    # after it, so no padding mask is needed. False: bidirectional with a key-padding mask.
    text_causal: bool
    dropout: float
    bias: bool
    # Shared embedding.
    embed_dim: int
    logit_scale_init: float  # log(1 / 0.07): temperature 0.07 (Radford et al. 2021)
    logit_scale_max: float  # log(100): the scale is clamped here, larger makes training unstable
    logit_bias_init: float | None  # a learnable logit bias, needed by the sigmoid loss (SigLIP: -10)
    gradient_checkpointing: bool

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "text_layers", "text_width", "text_heads", "embed_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"CLIPConfig.{name} must be a positive integer, got {value!r}")
        if self.text_width % self.text_heads:
            raise ValueError(
                f"CLIPConfig.text_width={self.text_width} must be divisible by text_heads={self.text_heads}"
            )
        if not 0 <= self.eot_id < self.vocab_size:
            raise ValueError(f"CLIPConfig.eot_id={self.eot_id} must be a token id below vocab_size={self.vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"CLIPConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.logit_scale_init > self.logit_scale_max:
            raise ValueError(
                f"CLIPConfig.logit_scale_init={self.logit_scale_init} is above logit_scale_max={self.logit_scale_max}"
            )
        if self.image_model.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
            raise ValueError(
                f"CLIPConfig.image_model={self.image_model!r}: name a timm architecture (e.g. vit_base_patch16_224) "
                "and give its weights as a local file in image_checkpoint; nothing is downloaded"
            )
        if not timm.is_model(self.image_model):
            raise ValueError(
                f"CLIPConfig.image_model={self.image_model!r} is not a timm model; see timm.list_models('vit_*')"
            )
        if self.image_checkpoint is not None and not Path(self.image_checkpoint).is_file():
            raise ValueError(f"CLIPConfig.image_checkpoint={self.image_checkpoint!r} is not a file")
        self.image_kwargs = dict(self.image_kwargs)

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // 64) * 64  # tensor-core friendly, as in the GPT

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CLIPConfig":
        """Build from a plain dict (a Hydra node, saved hparams); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown CLIPConfig keys {unknown}; expected some of {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CLIPOutput(NamedTuple):
    image_features: torch.Tensor | None  # (B, E), unit L2 norm
    text_features: torch.Tensor | None  # (B, E), unit L2 norm
    logit_scale: torch.Tensor  # (), exp of the clamped learnable log-scale
    logit_bias: torch.Tensor | None  # (), or None without a bias


def build_image_tower(config: CLIPConfig) -> nn.Module:
    """A timm model without its classifier (num_classes=0): images (B, 3, H, W) -> (B, num_features).

    With `image_checkpoint`, timm loads that file (`pretrained_cfg_overlay.file`), drops the
    classifier weights and adapts position embeddings to img_size; without, random weights."""
    if config.image_checkpoint is None:
        return timm.create_model(config.image_model, pretrained=False, num_classes=0, **config.image_kwargs)
    return timm.create_model(
        config.image_model,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(config.image_checkpoint)),
        num_classes=0,
        **config.image_kwargs,
    )


class TextTower(nn.Module):
    """Token + position embeddings, pre-LN blocks, final LayerNorm; the hidden state at the first
    end-of-text token summarises the caption (it has attended to every caption token)."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        # Layers initialise themselves as they are built (GPT-2 scheme, see transformer.py).
        self.tok_emb = Embedding(config.padded_vocab_size, config.text_width)
        self.pos_emb = Embedding(config.context_length, config.text_width)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(
                config.text_width,
                config.text_heads,
                config.dropout,
                config.bias,
                causal=config.text_causal,
                depth=config.text_layers,
            )
            for _ in range(config.text_layers)
        )
        self.ln_f = nn.LayerNorm(config.text_width, bias=config.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T) ids, padded with EOT after the caption's own EOT -> (B, text_width)."""
        B, T = tokens.shape
        if self.config.context_length < T:
            raise ValueError(f"caption length {T} exceeds context_length={self.config.context_length}")
        # (B,) the first EOT (argmax returns the first maximum). Tokenization guarantees one per
        # caption; it is not re-checked here because that would cost a host-device sync per step.
        eot_pos = (tokens == self.config.eot_id).int().argmax(dim=1)
        mask = None
        if not self.config.text_causal:
            # (B, 1, 1, T) True where attention is allowed: the caption and its EOT, not the padding.
            keep = torch.arange(T, device=tokens.device)[None, :] <= eot_pos[:, None]
            mask = keep[:, None, None, :]
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(torch.arange(T, device=tokens.device)))  # (B, T, C)
        for block in self.blocks:
            if self.config.gradient_checkpointing and self.training:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        x = self.ln_f(x)
        return x[torch.arange(B, device=x.device), eot_pos]  # (B, C)


class CLIP(nn.Module):
    """Built from its config fields as keyword arguments, as the `_target_` nodes of
    configs/model/clip_net/ build it; unknown or invalid fields are a ValueError naming them."""

    def __init__(self, **fields: Any) -> None:
        super().__init__()
        self.config = config = CLIPConfig.from_dict(fields)
        self.image_tower = build_image_tower(config)
        if config.gradient_checkpointing:
            self.image_tower.set_grad_checkpointing(True)
        self.text_tower = TextTower(config)
        # Linear maps into the shared space, no bias (CLIP), std = width^-0.5 keeps unit scale.
        num_features = self.image_tower.num_features
        self.image_proj = Linear(num_features, config.embed_dim, bias=False, std=num_features**-0.5)
        self.text_proj = Linear(config.text_width, config.embed_dim, bias=False, std=config.text_width**-0.5)
        # Shape (1,), not (): FSDP2 shards every parameter along dim 0 and rejects scalars.
        self.logit_scale = nn.Parameter(torch.full((1,), float(config.logit_scale_init)))
        bias = config.logit_bias_init
        self.logit_bias = nn.Parameter(torch.full((1,), float(bias))) if bias is not None else None

    @property
    def shard_units(self) -> tuple[type[nn.Module], ...]:
        """What FSDP shards and compilation compiles one by one (parallel.py): the text tower's
        blocks, and the image tower's repeated blocks where timm keeps them in `blocks` (ViTs)."""
        units: set[type[nn.Module]] = {Block}
        blocks = getattr(self.image_tower, "blocks", None)
        if isinstance(blocks, nn.Sequential | nn.ModuleList):
            units |= {type(b) for b in blocks}
        return tuple(units)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W), normalised as the data pipeline does -> (B, E) unit vectors."""
        return F.normalize(self.image_proj(self.image_tower(images)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T) -> (B, E) unit vectors."""
        return F.normalize(self.text_proj(self.text_tower(tokens)), dim=-1)

    def scale(self) -> torch.Tensor:
        """(), exp of the learnable log-scale clamped at logit_scale_max: 1 / temperature. Clamped
        where it is read rather than in place after each optimizer step: works the same on sharded
        parameters, and the scale the loss sees never exceeds exp(logit_scale_max)."""
        return self.logit_scale.clamp(max=self.config.logit_scale_max).exp().squeeze(0)

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> CLIPOutput:
        """Either input may be None (its features are then None): callers that need only one side
        (zero-shot prompts, a pipeline) still go through forward, which sharding wrappers (FSDP)
        and torch.compile hook; calling encode_* directly would bypass them."""
        return CLIPOutput(
            self.encode_image(images) if images is not None else None,
            self.encode_text(tokens) if tokens is not None else None,
            self.scale(),
            self.logit_bias.squeeze(0) if self.logit_bias is not None else None,
        )
