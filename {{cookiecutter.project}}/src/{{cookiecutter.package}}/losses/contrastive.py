"""Contrastive image-text losses that are correct across ranks.

Each rank holds B pairs. Features are gathered from every rank *with* gradients, and each rank
computes the loss of its own B rows against all W*B columns, with its labels offset by rank*B
("local loss"). The mean of the W local losses is the loss of the global batch, and once the
data-parallel strategy averages gradients over ranks (DDP, FSDP), so are the gradients: the
gather's backward sums, onto each rank's features, what every rank's loss sent them.

Both losses need the same B on every rank (drop_last=True in training).
"""

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def gather_with_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """(B, E) on each of W ranks -> (W*B, E), rows in rank order; backward sends each rank the
    sum over ranks of the gradient on its rows. A no-op in a single process."""
    _, world = _world(group)
    if world == 1:
        return x
    return torch.cat(dist_fn.all_gather(x, group=group), dim=0)


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE (CLIP): cross-entropy of image->text logits and of text->image logits,
    averaged. Logits are computed in float32 (float64 stays float64) even under autocast: scale * cos
    is up to 100, where bf16 resolves only steps of 0.5."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.group = group

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """image_features, text_features: (B, E) unit vectors of matching pairs; logit_scale: ()."""
        rank, _ = _world(self.group)
        B = image_features.shape[0]
        with torch.autocast(image_features.device.type, enabled=False):
            img, txt = _at_least_float32(image_features), _at_least_float32(text_features)
            scale = _at_least_float32(logit_scale)
            all_img, all_txt = gather_with_grad(img, self.group), gather_with_grad(txt, self.group)  # (W*B, E)
            logits_per_image = scale * img @ all_txt.T  # (B, W*B): my images against every caption
            logits_per_text = scale * txt @ all_img.T  # (B, W*B): my captions against every image
            if logit_bias is not None:
                logits_per_image = logits_per_image + _at_least_float32(logit_bias)
                logits_per_text = logits_per_text + _at_least_float32(logit_bias)
            labels = torch.arange(B, device=img.device) + rank * B  # my pair i is global column rank*B + i
            image_to_text = F.cross_entropy(logits_per_image, labels)
            text_to_image = F.cross_entropy(logits_per_text, labels)
        return {
            "loss": (image_to_text + text_to_image) / 2,
            "image_to_text": image_to_text,
            "text_to_image": text_to_image,
        }


class SigmoidLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP, Zhai et al. 2023): every (image, caption) pair is a binary
    problem, +1 on the diagonal, -1 elsewhere, summed and divided by the batch size. Needs a
    learnable bias (CLIPConfig.logit_bias_init; -10 in the paper) so the many negatives start out
    near probability 0."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.group = group

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if logit_bias is None:
            raise ValueError("the sigmoid loss needs a logit bias: set model.net.logit_bias_init (e.g. -10)")
        rank, _ = _world(self.group)
        B = image_features.shape[0]
        with torch.autocast(image_features.device.type, enabled=False):
            img, txt = _at_least_float32(image_features), _at_least_float32(text_features)
            all_txt = gather_with_grad(txt, self.group)  # (W*B, E); every pair is counted once, by its image's rank
            logits = _at_least_float32(logit_scale) * img @ all_txt.T + _at_least_float32(logit_bias)  # (B, W*B)
            signs = -torch.ones_like(logits)
            signs[torch.arange(B, device=img.device), torch.arange(B, device=img.device) + rank * B] = 1.0
            # Divided by the local B: the mean over ranks is then the global sum / (W*B), as in the paper.
            loss = -F.logsigmoid(signs * logits).sum() / B
        return {"loss": loss}


LOSSES: dict[str, type[nn.Module]] = {"infonce": InfoNCELoss, "sigmoid": SigmoidLoss}


def build_contrastive_loss(name: str) -> nn.Module:
    if name not in LOSSES:
        raise ValueError(f"model.loss={name!r} is not a contrastive loss; choose one of {sorted(LOSSES)}")
    return LOSSES[name]()
