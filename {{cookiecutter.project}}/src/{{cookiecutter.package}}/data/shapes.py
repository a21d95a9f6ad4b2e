"""A learnable image-text data set drawn on the fly: coloured shapes with captions that describe them.

Each image holds one shape of one of 6 kinds, 8 colours, 3 sizes and 9 positions (1296 captions),
with jitter in exact size and place and a noisy dark background. Item i of a split depends only on
(seed, split, i), so every rank and every run sees the same images, and nothing is downloaded.
The caption names every attribute, so retrieval can in principle be perfect; the shape kinds are
the classes of the zero-shot task.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ConfigError
from .image_text import Encoded, ImageTextDataModule, Record, tokenize_captions

KINDS = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "cyan": (40, 210, 220),
}
SIZES = {"small": 0.11, "medium": 0.16, "large": 0.22}  # radius as a fraction of the image side
# 3 x 3 grid: (row, column) -> phrase
POSITIONS = {
    (0, 0): "at the top left",
    (0, 1): "at the top",
    (0, 2): "at the top right",
    (1, 0): "on the left",
    (1, 1): "in the centre",
    (1, 2): "on the right",
    (2, 0): "at the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "at the bottom right",
}
SPLITS = {"train": 0, "val": 1}
SUPERSAMPLE = 4  # drawn at 4x and downsampled: anti-aliased edges at any image size


@dataclass(frozen=True)
class ShapeSpec:
    kind: str
    colour: str
    size: str
    position: tuple[int, int]

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.kind} {POSITIONS[self.position]}"


def all_specs() -> list[ShapeSpec]:
    """Every combination, in a fixed order: index = text id of the caption."""
    return [ShapeSpec(k, c, s, p) for k, c, s, p in product(KINDS, COLOURS, SIZES, POSITIONS)]


SPECS = all_specs()
SPEC_INDEX = {spec: i for i, spec in enumerate(SPECS)}


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        return [
            (cx + radius * math.cos(phase + 2 * math.pi * i / n), cy + radius * math.sin(phase + 2 * math.pi * i / n))
            for i in range(n)
        ]

    if kind == "square":
        return ring(4, r * 1.25, math.pi / 4)  # a bit larger: same visual weight as the circle
    if kind == "diamond":
        return ring(4, r * 1.25, 0.0)
    if kind == "triangle":
        return ring(3, r * 1.3, -math.pi / 2)
    if kind == "star":  # 5 points, alternating outer and inner radius
        outer, inner = ring(5, r * 1.35, -math.pi / 2), ring(5, r * 0.55, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if kind == "cross":  # a plus sign of arm width r/1.5
        w = r / 3
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
            (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
            (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"unknown shape kind {kind!r}")


def render(spec: ShapeSpec, size: int, rng: np.random.Generator) -> Image.Image:
    """An RGB image of `size` x `size` pixels; rng draws the jitter and the background noise."""
    S = size * SUPERSAMPLE
    background = int(rng.integers(10, 70))
    image = Image.new("RGB", (S, S), (background,) * 3)
    draw = ImageDraw.Draw(image)
    cell = S / 3
    row, col = spec.position
    # Centre within the middle half of its grid cell; radius +-10% around the size's nominal value.
    cx = (col + 0.5 + rng.uniform(-0.2, 0.2)) * cell
    cy = (row + 0.5 + rng.uniform(-0.2, 0.2)) * cell
    r = SIZES[spec.size] * S * rng.uniform(0.9, 1.1)
    fill = COLOURS[spec.colour]
    if spec.kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(spec.kind, cx, cy, r), fill=fill)
    image = image.resize((size, size), Image.Resampling.BOX)
    noise = 6.0 * rng.standard_normal((size, size, 3), dtype=np.float32)  # no two images are identical
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def _draw(rng: np.random.Generator) -> ShapeSpec:
    return ShapeSpec(
        kind=KINDS[rng.integers(len(KINDS))],
        colour=list(COLOURS)[rng.integers(len(COLOURS))],
        size=list(SIZES)[rng.integers(len(SIZES))],
        position=list(POSITIONS)[rng.integers(len(POSITIONS))],
    )


class ShapesDataset:
    """`length` items of one split; item i is a dict of the PIL image, caption, ids and class label.

    kind_group: consecutive groups of this many items show one colour, size and position in
    different kinds (each with its own jitter and noise). In a batch that keeps a group together,
    their captions differ only in the kind: hard negatives. With independent items (kind_group=1)
    a batch rarely holds two shapes that differ only in kind, so the loss is nearly satisfied by
    colour, size and position, and the kinds, the zero-shot classes, are learnt last."""

    def __init__(self, split: str, length: int, image_size: int, seed: int, kind_group: int = 1) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if not 1 <= kind_group <= len(KINDS):
            raise ValueError(f"kind_group must be in [1, {len(KINDS)}], got {kind_group}")
        self.split, self.length, self.image_size, self.seed = split, length, image_size, seed
        self.kind_group = kind_group

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = np.random.default_rng((self.seed, SPLITS[self.split], i))
        spec = _draw(rng)
        if self.kind_group > 1:
            first = i - i % self.kind_group  # the group's first item draws colour, size and position
            base = _draw(np.random.default_rng((self.seed, SPLITS[self.split], first)))
            kinds = np.random.default_rng((self.seed, SPLITS[self.split], first, 1)).permutation(len(KINDS))
            spec = ShapeSpec(KINDS[kinds[i % self.kind_group]], base.colour, base.size, base.position)
        return {
            "image": render(spec, self.image_size, rng),
            "caption": spec.caption,
            "image_id": i,  # every image is distinct
            "text_id": SPEC_INDEX[spec],  # equal captions share an id (retrieval counts either as a hit)
            "label": KINDS.index(spec.kind),
        }


class ShapesDataModule(ImageTextDataModule):
    """The shapes data set as a DataModule: same batches, metrics and checkpoint state as
    ImageTextDataModule, nothing to download. The tokenizer is trained on the 1296 captions.

    zero_shot: how a class (shape kind) is described to the text tower: "ensemble" averages the
    embeddings of every caption of that kind (216: all colours, sizes and positions; prompt
    ensembling as in the CLIP paper), "name" uses the single prompt "a <kind>". kind_group: train
    on groups of shapes that differ only in kind (see ShapesDataset)."""

    def __init__(
        self,
        train_size: int = 50_000,
        val_size: int = 1000,
        image_model: str = "resnet18",
        image_size: int = 64,
        augment: dict[str, Any] | None = None,
        crop_pct: float | None = 1.0,
        context_length: int = 16,
        tokenizer: dict[str, Any] | None = None,
        batch_size: int = 128,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 1337,
        zero_shot: str = "ensemble",
        kind_group: int = 4,
    ) -> None:
        super().__init__(
            train=[],
            image_model=image_model,
            image_size=image_size,
            augment=augment,
            crop_pct=crop_pct,
            context_length=context_length,
            tokenizer={"vocab_size": 512, **(tokenizer or {})},
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            seed=seed,
        )
        if train_size <= 0 or val_size <= 0:
            raise ConfigError(f"data.train_size and data.val_size must be positive, got {train_size}, {val_size}")
        if zero_shot not in ("ensemble", "name"):
            raise ConfigError(f"data.zero_shot must be 'ensemble' or 'name', got {zero_shot!r}")
        if not 1 <= kind_group <= len(KINDS) or batch_size % kind_group:
            raise ConfigError(
                f"data.kind_group={kind_group} must be in [1, {len(KINDS)}] and divide data.batch_size={batch_size}"
            )
        self.sizes = {"train": train_size, "val": val_size}
        self.zero_shot, self.kind_group = zero_shot, kind_group
        # Items are random already; in order, a group stays in one batch (under DDP the sampler deals
        # neighbours to different ranks, but into the same global batch, which the loss gathers).
        self.shuffle_train = kind_group == 1

    def read(self) -> tuple[list[Record], list[Record], list[str]]:
        return [], [], list(KINDS)

    def tokenizer_corpus(self) -> list[str]:
        return [spec.caption for spec in SPECS]

    def dataset(self, split: str, transform: Callable) -> Encoded:
        captions = self.tokenizer_corpus()
        tokens = dict(zip(captions, tokenize_captions(self.tokenizer, captions, self.context_length)))  # 1296 x (T,)
        group = self.kind_group if split == "train" else 1  # validation: independent items
        items = ShapesDataset(split, self.sizes[split], self.image_size, self.seed, kind_group=group)
        return Encoded(items, transform, tokens.__getitem__)

    def zero_shot_prompts(self) -> dict[str, list[str]]:
        if self.zero_shot == "name":
            return {kind: [f"a {kind}"] for kind in KINDS}
        return {kind: [spec.caption for spec in SPECS if spec.kind == kind] for kind in KINDS}
