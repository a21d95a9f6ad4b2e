"""POST /embed and POST /similarity: the checkpoint's CLIP on texts and base64-encoded images.

/embed {"text": str | [str], "image": base64 | [base64]} (either or both) -> unit vectors per item;
/similarity {"text": [...], "image": [...]} -> cosine similarities (images x texts) and, per image,
the softmax over the texts at the model's learned logit scale (zero-shot classification). Images
are decoded in the request, so an undecodable one is a 422 naming it; the texts and images of all
requests in a batch go through the towers together.
"""

import base64
import binascii
import io
import warnings
from typing import Any

import torch
from fastapi import FastAPI, Request
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from ..pipeline import MultiModalPipeline
from .app import Serving
from .validation import BadRequest, parse_body


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | list[str] | None = None
    image: str | list[str] | None = None  # base64 of an image file (PNG, JPEG, ...), or a data: URL


def _as_list(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else value


def decode_image(data: str, field: str) -> Image.Image:
    """Base64 (plain or a data: URL) -> an RGB PIL image, or a BadRequest naming the field."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(field, "not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # huge images are refused, not decoded
            with Image.open(io.BytesIO(raw)) as image:
                return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadRequest(field, f"cannot be decoded as an image ({type(e).__name__}: {e})"[:300]) from None


class Embedder:
    kind = "clip"
    batch_route = "/embed"  # /similarity shares its batches

    def __init__(self, pipeline: MultiModalPipeline, max_items: int) -> None:
        self.pipeline, self.max_items = pipeline, max_items

    def read(self, body: EmbedRequest, need_both: bool) -> tuple[list[str], list[Image.Image]]:
        texts, images = _as_list(body.text), _as_list(body.image)
        if need_both:
            for field, items in (("text", texts), ("image", images)):
                if not items:
                    raise BadRequest(field, "required: give at least one")
        elif not texts and not images:
            raise BadRequest("text", "give a text or an image (or both)")
        for field, items in (("text", texts), ("image", images)):
            if len(items) > self.max_items:
                raise BadRequest(field, f"{len(items)} items, over the limit of {self.max_items} per request")
        return texts, [decode_image(data, f"image[{i}]") for i, data in enumerate(images)]

    @torch.no_grad()
    def run_batch(self, items: list[tuple[list[str], list[Image.Image]]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per item: (texts (n, E), images (m, E)) unit vectors on the CPU, from one pass per tower."""
        texts = [t for item_texts, _ in items for t in item_texts]
        images = [im for _, item_images in items for im in item_images]
        dim = self.pipeline.net.config.embed_dim
        text_features = self.pipeline.encode_text(texts).cpu() if texts else torch.empty(0, dim)
        image_features = self.pipeline.encode_images(images).cpu() if images else torch.empty(0, dim)
        out, t, i = [], 0, 0
        for item_texts, item_images in items:
            out.append((text_features[t : t + len(item_texts)], image_features[i : i + len(item_images)]))
            t, i = t + len(item_texts), i + len(item_images)
        return out

    def warmup(self) -> None:
        self.run_batch([(["a"], [Image.new("RGB", (32, 32))])])

    def describe(self) -> dict[str, Any]:
        return {"model": "clip", "embed_dim": self.pipeline.net.config.embed_dim}

    def add_routes(self, app: FastAPI, serving: Serving) -> None:
        async def parse(request: Request, need_both: bool) -> tuple[EmbedRequest, list[str], list[Image.Image]]:
            body = parse_body(await request.body(), EmbedRequest)
            texts, images = await run_in_threadpool(self.read, body, need_both)  # decoding is CPU work
            return body, texts, images

        @app.post("/embed")
        async def embed(request: Request) -> dict[str, Any]:
            body, texts, images = await parse(request, need_both=False)

            async def compute() -> dict[str, Any]:
                text_features, image_features = await serving.batcher.submit((texts, images))
                return {
                    "text_embeddings": text_features.tolist(),
                    "image_embeddings": image_features.tolist(),
                    "dim": text_features.size(1),
                }

            return await serving.cached("/embed", body.model_dump(), compute)

        @app.post("/similarity")
        async def similarity(request: Request) -> dict[str, Any]:
            body, texts, images = await parse(request, need_both=True)

            async def compute() -> dict[str, Any]:
                text_features, image_features = await serving.batcher.submit((texts, images))
                cosine = image_features @ text_features.T  # (images, texts)
                scale = self.pipeline.net.scale().float().cpu()
                return {"similarity": cosine.tolist(), "probabilities": (scale * cosine).softmax(1).tolist()}

            return await serving.cached("/similarity", body.model_dump(), compute)
