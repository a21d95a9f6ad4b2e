"""At the end of each validation, log to TensorBoard the cosine-similarity matrix of the first items
of the (fixed) first validation batch, drawn with their images and captions.

Rows are captions, columns images; a well-trained model lights up the diagonal. The best image
for each caption (text->image retrieval) is outlined in white. Acts only on batches that are dicts
with "image", "text" and "caption" (the image-text DataModules), so it can stay in the default
callbacks next to callbacks meant for other modules.
"""

import textwrap
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image, ImageDraw, ImageFont

# A perceptually ordered dark-blue -> teal -> yellow ramp (viridis-like), for values in [0, 1].
RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32)


def colour(value: float) -> tuple[int, int, int]:
    x = min(max(value, 0.0), 1.0) * (len(RAMP) - 1)
    i = min(int(x), len(RAMP) - 2)
    rgb = RAMP[i] + (x - i) * (RAMP[i + 1] - RAMP[i])
    return tuple(int(c) for c in rgb)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable default font: Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def render_similarity(images: np.ndarray, captions: list[str], similarity: np.ndarray, cell: int = 72) -> np.ndarray:
    """images (N, H, W, 3) uint8, N captions, similarity (N captions, N images) -> (H', W', 3) uint8."""
    n = len(captions)
    text_width, header = 240, cell
    canvas = Image.new("RGB", (text_width + n * cell, header + n * cell), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), _font(11)
    for j in range(n):  # image thumbnails across the top
        thumb = Image.fromarray(images[j]).resize((cell - 4, cell - 4), Image.Resampling.BICUBIC)
        canvas.paste(thumb, (text_width + j * cell + 2, 2))
    lo, hi = float(similarity.min()), float(similarity.max())
    for i in range(n):
        y = header + i * cell
        lines = textwrap.wrap(captions[i], width=36)[:5]
        draw.multiline_text((4, y + 4), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=2)
        best = int(similarity[i].argmax())
        for j in range(n):
            value = float(similarity[i, j])
            x = text_width + j * cell
            scaled = (value - lo) / (hi - lo) if hi > lo else 0.5  # colour spans this batch's range
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=colour(scaled))
            ink = (0, 0, 0) if scaled > 0.6 else (255, 255, 255)
            draw.text((x + cell // 2, y + cell // 2), f"{value:.2f}", fill=ink, font=font, anchor="mm")
            if j == best:
                draw.rectangle((x + 1, y + 1, x + cell - 2, y + cell - 2), outline=(255, 255, 255), width=3)
    return np.asarray(canvas)


class SimilarityMatrix(L.Callback):
    """Every rank runs the forward (sharded weights need all ranks); rank 0 draws and logs."""

    def __init__(self, num_items: int = 8) -> None:
        self.num_items = num_items
        self._batch: dict[str, Any] | None = None

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking:
            return
        if not (isinstance(batch, dict) and {"image", "text", "caption"} <= set(batch)):
            return
        n = self.num_items
        self._batch = {"image": batch["image"][:n], "text": batch["text"][:n], "caption": list(batch["caption"][:n])}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._batch is None:
            return
        batch, self._batch = self._batch, None
        with torch.no_grad():
            out = pl_module(batch["image"], batch["text"])
        similarity = (out.text_features.float() @ out.image_features.float().T).cpu().numpy()  # (captions, images)
        if not trainer.is_global_zero:
            return
        figure = render_similarity(self._to_uint8(trainer, batch["image"]), batch["caption"], similarity)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(
                    "val/similarity", figure, global_step=trainer.global_step, dataformats="HWC"
                )

    @staticmethod
    def _to_uint8(trainer: L.Trainer, images: torch.Tensor) -> np.ndarray:
        """(N, 3, H, W) normalised -> (N, H, W, 3) uint8, undoing the data's normalisation."""
        images = images.detach().float().cpu()
        norm = getattr(trainer.datamodule, "normalization", None)
        if norm is not None:
            mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in norm)
            images = images * std + mean
        else:  # unknown normalisation: stretch each image to [0, 1]
            lo = images.amin(dim=(1, 2, 3), keepdim=True)
            images = (images - lo) / (images.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-6)
        return (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
