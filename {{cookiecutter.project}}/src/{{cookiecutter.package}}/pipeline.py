"""Use a trained CLIP checkpoint on new images and text, without Hydra or Lightning:

    from {{cookiecutter.package}}.pipeline import MultiModalPipeline
    pipe = MultiModalPipeline.from_checkpoint("logs/train/runs/.../checkpoints/last.ckpt")
    pipe(["a red circle", "a blue star"], ["cat.jpg", pil_image, numpy_array])  # (3 images, 2 texts)
    pipe.classify("photo.jpg", ["cat", "dog"], template="a photo of a {}")    # [{"cat": 0.9, "dog": 0.1}]

The checkpoint holds everything needed: the network's config and weights, the tokenizer, the
caption length and the image transform settings (written by the image-text DataModules).
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from .checkpoints import load_net, read_checkpoint
from .data.image_text import image_transform, load_rgb, tokenize_captions
from .errors import ConfigError, DataPathError
from .models.clip import CLIP
from .networks import build


def _as_list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


class MultiModalPipeline:
    def __init__(
        self,
        net: CLIP,
        tokenizer: Tokenizer,
        context_length: int,
        image_model: str,
        image_size: int,
        crop_pct: float | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = net.to(self.device).eval()
        self.tokenizer, self.context_length, self.batch_size = tokenizer, context_length, batch_size
        self.transform = image_transform(image_model, image_size, train=False, crop_pct=crop_pct)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None) -> "MultiModalPipeline":
        """A .ckpt written by train.py with model=clip; loads with weights_only=True (no pickled code)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise DataPathError(f"checkpoint {path} does not exist")
        ckpt = read_checkpoint(path, key="checkpoint")  # train.py's, or its quantize.py version
        hparams = ckpt.get("hyper_parameters", {})
        data = next((v for v in ckpt.values() if isinstance(v, dict) and "tokenizer" in v and "image_model" in v), None)
        if "net" not in hparams or data is None or not data.get("tokenizer"):
            raise ConfigError(
                f"{path} is not a CLIP checkpoint with its data settings (train.py model=clip writes one)"
            )
        # The image tower's initial weights are in the state dict: do not look for the original file.
        net: CLIP = build({**hparams["net"], "image_checkpoint": None}, f"{path}: hyper_parameters.net")
        load_net(net, ckpt)  # train.py's weights, or quantize.py's int8 ones
        return cls(
            net,
            Tokenizer.from_str(data["tokenizer"]),
            data["context_length"],
            data["image_model"],
            data["image_size"],
            data.get("crop_pct"),
            device=device,
        )

    @torch.no_grad()
    def encode_images(self, images: Any) -> torch.Tensor:
        """One image or a list (paths, PIL images, numpy arrays) -> (N, E) unit vectors."""
        items = _as_list(images)
        if not items:
            raise ValueError("no images given")
        pixels = torch.stack([self.transform(load_rgb(x, name=f"images[{i}]")) for i, x in enumerate(items)])
        return torch.cat(
            [self.net(images=chunk.to(self.device)).image_features.float() for chunk in pixels.split(self.batch_size)]
        )

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """One string or a list -> (N, E) unit vectors."""
        items = _as_list(texts)
        if not items or not all(isinstance(t, str) for t in items):
            raise ValueError(f"expected a string or a non-empty list of strings, got {texts!r}")
        tokens = tokenize_captions(self.tokenizer, items, self.context_length)
        return torch.cat(
            [self.net(tokens=chunk.to(self.device)).text_features.float() for chunk in tokens.split(self.batch_size)]
        )

    def __call__(self, text: str | Sequence[str], images: Any) -> torch.Tensor:
        """Cosine similarities (N images, M texts), each in [-1, 1]."""
        return (self.encode_images(images) @ self.encode_text(text).T).cpu()

    @torch.no_grad()
    def classify(self, images: Any, labels: Sequence[str], template: str = "{}") -> list[dict[str, float]]:
        """Zero-shot classification: per image, {label: probability} over `labels`, most likely first.
        Each label is embedded as template.format(label); probabilities are a softmax over the
        similarities times the learned logit scale."""
        if not labels:
            raise ValueError("classify needs at least one label")
        if "{}" not in template:
            raise ValueError(f"template {template!r} needs a " + "'{}' placeholder for the label")
        similarity = self(list(template.format(label) for label in labels), images)  # (N, C)
        scale = self.net.scale().float().cpu()
        probabilities = (scale * similarity).softmax(dim=1)
        return [dict(sorted(zip(labels, row.tolist()), key=lambda kv: kv[1], reverse=True)) for row in probabilities]
