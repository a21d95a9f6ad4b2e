"""Image-caption pairs for contrastive training: annotation readers, transforms, tokens, DataModule.

Sources (each a path, or `{path: ..., image_root: ..., caption_template: ...}`):
  - COCO captions JSON: `{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`
  - JSONL: one `{"image": "<path>", "caption": "<text>"}` per line
  - an image folder of class subfolders: `root/<class>/*.jpg`, captioned `caption_template.format(class)`
Relative image paths resolve against `image_root`, by default the annotation file's folder.

A batch is a dict: image (B, 3, S, S) float, text (B, T) int64 token ids padded with EOT, image_id
and text_id (B,) int64 (equal ids = the same image / the same caption, for retrieval metrics),
label (B,) int64 (class index, -1 without classes) and caption (list of B strings).
"""

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_data_config
from timm.models import get_pretrained_cfg
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, DataFormatError, DataPathError
from .sampling import EpochSampler, world_of
from .tokenizer import EOT, eot_id, load_tokenizer, train_tokenizer

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
JSON_SUFFIXES = (".json",)
JSONL_SUFFIXES = (".jsonl",)


@dataclass(frozen=True)
class Record:
    image: Path
    caption: str
    label: int = -1  # class index for image folders (zero-shot classes), -1 otherwise


# ----------------------------------------------------------------------------------------------
# Reading annotations


def _source(spec: str | dict[str, Any], key: str) -> dict[str, Any]:
    if isinstance(spec, (str, Path)):
        return {"path": str(spec)}
    if isinstance(spec, dict) and isinstance(spec.get("path"), str):
        unknown = sorted(set(spec) - {"path", "image_root", "caption_template"})
        if unknown:
            raise ConfigError(f"{key}: unknown keys {unknown}; expected path, image_root, caption_template")
        return dict(spec)
    raise ConfigError(f"{key}: expected a path or a dict with `path`, got {spec!r}")


def _caption(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(f"{where}: missing caption (expected a non-empty string under 'caption', got {value!r})")
    return " ".join(value.split())  # one line, single spaces


def _image(root: Path, value: Any, where: str, key: str) -> Path:
    path = _image_path(root, value, where, key)
    if not path.is_file():
        raise DataPathError(f"{where}: image file {path} not found")
    return path


def _image_path(root: Path, value: Any, where: str, key: str) -> Path:
    """`value` as a path (relative ones under `root`); a string that cannot be one is a format error."""
    if not isinstance(value, str) or not value:
        raise DataFormatError(f"{where}: missing image path (expected a string under {key!r}, got {value!r})")
    try:
        path = Path(value).expanduser()
        path = path if path.is_absolute() else root / path
        path.is_file()  # a NUL byte or an over-long name raises here
    except (ValueError, OSError) as e:
        raise DataFormatError(f"{where}: {key} {value!r} is not a usable path ({e})") from None
    return path


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None


def read_coco(path: Path, image_root: Path) -> list[Record]:
    """COCO captions JSON: one record per annotation (an image with 5 captions gives 5 records).
    Every image it names must exist: the error counts the missing ones and names the first."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise DataFormatError(f"{path}: invalid JSON (nested too deeply)") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise DataFormatError(f"{path}: expected a COCO captions object with 'images' and 'annotations' lists")
    files: dict[Any, Path] = {}
    for j, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not isinstance(image.get("id"), (int, str)) or isinstance(image["id"], bool):
            raise DataFormatError(
                f"{path}: images[{j}]: expected an object with an integer or string 'id' and 'file_name'"
            )
        files[image["id"]] = _image_path(
            image_root, image.get("file_name"), f"{path}: images[{j}] (id {image['id']!r})", "file_name"
        )
    records = []
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DataFormatError(f"{path}: annotations[{i}]: expected an object, got {type(ann).__name__}")
        image_id = ann.get("image_id")
        where = f"{path}: annotations[{i}] (id {ann.get('id')!r}, image_id {image_id!r})"
        if not isinstance(image_id, (int, str)) or isinstance(image_id, bool) or image_id not in files:
            raise DataFormatError(f"{where}: image_id is not the id of any entry of 'images'")
        records.append(Record(files[image_id], _caption(ann.get("caption"), where)))
    used = sorted({r.image for r in records})
    missing = [p for p in used if not p.is_file()]
    if missing:
        raise DataPathError(
            f"{path}: {len(missing)} of the {len(used)} images its annotations name are missing under "
            f"{image_root}, e.g. {', '.join(str(p) for p in missing[:3])}; fix the file_name entries or set "
            "image_root (data.train: [{path: ..., image_root: ...}])"
        )
    return records


def read_jsonl(path: Path, image_root: Path) -> list[Record]:
    records = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(f"{where}: not UTF-8 text (invalid byte at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{where}: invalid JSON ({e.msg})") from None
            except RecursionError:
                raise DataFormatError(f"{where}: invalid JSON (nested too deeply)") from None
            if not isinstance(record, dict):
                raise DataFormatError(f"{where}: expected an object with 'image' and 'caption', got {record!r}")
            caption = _caption(record.get("caption"), where)
            records.append(Record(_image(image_root, record.get("image"), where, "image"), caption))
    return records


def read_folder(path: Path, template: str, classes: list[str]) -> list[Record]:
    """`path/<class>/<image>`: each image captioned with the template filled by its class name
    (underscores read as spaces). `classes` is the global class list; labels index into it."""
    records = []
    for folder in sorted(p for p in path.iterdir() if p.is_dir()):
        name = folder.name.replace("_", " ")
        caption = template.format(name)
        for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            records.append(Record(image, caption, classes.index(name)))
    if records:
        return records
    loose = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        raise DataFormatError(
            f"image folder {path} holds {len(loose)} images but no captions: a folder is captioned by its class "
            f"subfolders ({path}/<class>/*.jpg); for captions of your own, list the images in a .jsonl of "
            '{"image": ..., "caption": ...} lines or a COCO captions .json'
        )
    raise DataPathError(f"image folder {path} holds no class subfolders with images ({', '.join(IMAGE_SUFFIXES)})")


def folder_classes(path: Path) -> list[str]:
    return sorted(p.name.replace("_", " ") for p in path.iterdir() if p.is_dir())


def read_sources(
    specs: list[str | dict[str, Any]], key: str, caption_template: str, classes: list[str]
) -> list[Record]:
    """All records of a list of sources (data.train or data.val), in order."""
    records: list[Record] = []
    for n, spec in enumerate(specs):
        source = _source(spec, f"{key}[{n}]")
        path = Path(source["path"]).expanduser()
        root = Path(source.get("image_root") or (path if path.is_dir() else path.parent)).expanduser()
        if not path.exists():
            raise DataPathError(f"data path {source['path']!r} does not exist ({key})")
        if path.is_dir():
            records.extend(read_folder(path, source.get("caption_template") or caption_template, classes))
        elif path.suffix in JSON_SUFFIXES:
            records.extend(read_coco(path, root))
        elif path.suffix in JSONL_SUFFIXES:
            records.extend(read_jsonl(path, root))
        else:
            raise DataFormatError(
                f"data file {source['path']!r} ({key}): unsupported type {path.suffix!r}; expected a COCO "
                ".json, a .jsonl of {image, caption} or a folder of class subfolders"
            )
    if not records:
        raise DataPathError(f"{key} is empty: name at least one annotation file or image folder")
    return records


# ----------------------------------------------------------------------------------------------
# Images, transforms, tokens


def load_rgb(image: Any, name: str = "image") -> Image.Image:
    """A path, PIL image or numpy array (H, W), (H, W, 1|3|4), uint8 or float in [0, 1] -> RGB PIL."""
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise DataPathError(f"{name}: image file {path} not found")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise DataFormatError(f"{name}: cannot decode {path} as an image ({e})") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise DataFormatError(
                f"{name}: expected an array of shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}"
            )
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating):
                raise DataFormatError(f"{name}: expected a uint8 or float array, got {array.dtype}")
            array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)  # floats are taken as [0, 1]
        return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    raise DataFormatError(f"{name}: expected a path, PIL image or numpy array, got {type(image).__name__}")


def model_data_config(image_model: str) -> dict[str, Any]:
    """Mean, std, interpolation and crop_pct of a timm architecture's pretrained config, without
    building it (ImageNet defaults for architectures that have none)."""
    pretrained = get_pretrained_cfg(image_model, allow_unregistered=True)
    return resolve_data_config({}, pretrained_cfg=pretrained.to_dict() if pretrained is not None else None)


def image_transform(
    image_model: str,
    image_size: int,
    train: bool,
    augment: dict[str, Any] | None = None,
    crop_pct: float | None = None,
) -> Callable[[Image.Image], torch.Tensor]:
    """timm's transforms for `image_model`, resized to image_size: PIL RGB -> (3, S, S) float.

    Train: timm's training pipeline with `augment` as its arguments (scale, ratio, hflip,
    color_jitter, auto_augment, ...); `augment=None` uses the eval transform in training too.
    Eval: resize to S / crop_pct, centre crop S (crop_pct=1: the whole image)."""
    cfg = model_data_config(image_model)
    common = dict(
        input_size=(3, image_size, image_size), interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"]
    )
    if train and augment is not None:
        return create_transform(is_training=True, **common, **augment)
    return create_transform(
        is_training=False, crop_pct=crop_pct or cfg["crop_pct"], crop_mode=cfg.get("crop_mode"), **common
    )


def tokenize_captions(tokenizer: Tokenizer, captions: list[str], context_length: int) -> torch.Tensor:
    """(N, context_length) int64: each caption's tokens, cut to leave room for one EOT, then EOT
    padding. The text tower pools at the first EOT, so padding never changes a caption's features."""
    eot = eot_id(tokenizer)
    out = torch.full((len(captions), context_length), eot, dtype=torch.int64)
    for i, encoding in enumerate(tokenizer.encode_batch(captions)):
        # Cut to leave room for the EOT; a literal EOT inside the text would end the caption early.
        ids = [t for t in encoding.ids[: context_length - 1] if t != eot]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out


# ----------------------------------------------------------------------------------------------
# Datasets


class ImageTextDataset(Dataset):
    """Records -> batch items. Captions are tokenized once (unique captions only); images are
    decoded when read, so a corrupt file fails naming it, in the step that reads it."""

    def __init__(self, records: list[Record], transform: Callable, tokenizer: Tokenizer, context_length: int) -> None:
        self.records, self.transform = records, transform
        captions = sorted({r.caption for r in records})
        self.text_ids = {c: i for i, c in enumerate(captions)}  # equal captions: one id
        self.tokens = tokenize_captions(tokenizer, captions, context_length)  # (U, T)
        self.image_ids: dict[Path, int] = {}
        for r in records:
            self.image_ids.setdefault(r.image, len(self.image_ids))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        text_id = self.text_ids[r.caption]
        return {
            "image": self.transform(load_rgb(r.image, name=str(r.image))),
            "text": self.tokens[text_id],
            "image_id": self.image_ids[r.image],
            "text_id": text_id,
            "label": r.label,
            "caption": r.caption,
        }


class EpochItems(Dataset):
    """Training items by global id g = epoch * N + i (data/sampling.py): item i, its random
    augmentation drawn from (seed, g) alone. Every epoch augments anew, yet a resumed run (or
    another worker count) sees exactly the images an uninterrupted run would; the caller's random
    state is left as it was."""

    def __init__(self, items: Dataset, seed: int) -> None:
        self.items, self.seed = items, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, g: int) -> dict[str, Any]:
        seed = int(np.random.SeedSequence((self.seed, g)).generate_state(1)[0])
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):  # timm's transforms draw from torch and `random`
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return self.items[g % len(self.items)]
            finally:
                random.setstate(python_state)


class Encoded(Dataset):
    """Items of a dataset that yields PIL images and captions (data/shapes.py), as batch items."""

    def __init__(self, items: Any, transform: Callable, tokens_of: Callable[[str], torch.Tensor]) -> None:
        self.items, self.transform, self.tokens_of = items, transform, tokens_of

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.items[i])
        item["image"] = self.transform(item["image"])
        item["text"] = self.tokens_of(item["caption"])
        return item


# ----------------------------------------------------------------------------------------------
# DataModule


class ImageTextDataModule(L.LightningDataModule):
    """Image-caption pairs from annotation files and image folders.

    train / val: sources (see the module docstring); without `val`, `val_fraction` of the train
    images (all captions of an image together) are held out. The tokenizer is a byte-level BPE
    trained on the train captions (or `tokenizer.path`), and travels in every checkpoint with the
    transform settings, so a checkpoint alone can encode new images and text (pipeline.py).
    """

    def __init__(
        self,
        train: list[str | dict[str, Any]] | str,
        val: list[str | dict[str, Any]] | str | None = None,
        val_fraction: float = 0.05,
        caption_template: str = "a photo of a {}",
        image_model: str = "vit_base_patch16_224",
        image_size: int = 224,
        augment: dict[str, Any] | None = None,
        crop_pct: float | None = None,
        context_length: int = 77,
        tokenizer: dict[str, Any] | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        seed: int = 1337,
    ) -> None:
        super().__init__()
        self.train_sources = [train] if isinstance(train, (str, dict)) else list(train or [])
        self.val_sources = [val] if isinstance(val, (str, dict)) else list(val) if val else []
        if not self.val_sources and not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1) when data.val is not set, got {val_fraction}")
        if "{}" not in caption_template:
            raise ConfigError(
                f"data.caption_template={caption_template!r} needs a " + "'{}' placeholder for the class name"
            )
        if image_size <= 0 or context_length < 2:
            raise ConfigError(
                f"data.image_size must be positive and data.context_length at least 2, got {image_size}, "
                f"{context_length}"
            )
        tokenizer = {"vocab_size": 32768, "path": None, **(tokenizer or {})}
        self.vocab_size: int = tokenizer["vocab_size"]
        self.tokenizer_path: str | None = tokenizer["path"]
        self.val_fraction, self.caption_template = val_fraction, caption_template
        self.image_model, self.image_size, self.crop_pct = image_model, image_size, crop_pct
        self.augment = dict(augment) if augment is not None else None
        self.context_length = context_length
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.tokenizer: Tokenizer | None = None
        self.shuffle_train = True
        self.classes: list[str] = []
        self._records: dict[str, list[Record]] = {}

    # -- what subclasses (data/shapes.py) replace ------------------------------------------------

    def read(self) -> tuple[list[Record], list[Record], list[str]]:
        """(train records, val records, class names)."""
        classes: set[str] = set()  # image folders anywhere: their subfolder names are the classes
        for key, specs in (("data.train", self.train_sources), ("data.val", self.val_sources)):
            for n, spec in enumerate(specs):
                path = Path(_source(spec, f"{key}[{n}]")["path"]).expanduser()
                if path.is_dir():
                    classes.update(folder_classes(path))
        classes = sorted(classes)
        train = read_sources(self.train_sources, "data.train", self.caption_template, classes)
        if self.val_sources:
            return train, read_sources(self.val_sources, "data.val", self.caption_template, classes), classes
        # Hold out whole images (every caption of an image on the same side), chosen by the seed.
        images = sorted({r.image for r in train})
        n_val = max(1, int(len(images) * self.val_fraction))
        if n_val >= len(images):
            raise ConfigError(f"{len(images)} images are too few to hold out data.val_fraction={self.val_fraction}")
        held_out = {images[i] for i in np.random.default_rng(self.seed).permutation(len(images))[:n_val]}
        return [r for r in train if r.image not in held_out], [r for r in train if r.image in held_out], classes

    def tokenizer_corpus(self) -> Iterable[str]:
        return sorted({r.caption for r in self._records["train"]})

    def dataset(self, split: str, transform: Callable) -> Dataset:
        return ImageTextDataset(self._records[split], transform, self.tokenizer, self.context_length)

    def zero_shot_prompts(self) -> dict[str, list[str]] | None:
        """Class name -> prompts whose mean embedding stands for the class; None: no classes."""
        if not self.classes:
            return None
        return {name: [self.caption_template.format(name)] for name in self.classes}

    # -- Lightning hooks -------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self._records:
            return
        train, val, self.classes = self.read()
        self._records = {"train": train, "val": val}
        if self.tokenizer is None:  # not restored from a checkpoint
            if self.tokenizer_path:
                self.tokenizer = load_tokenizer(self.tokenizer_path)
            else:  # deterministic: every rank trains the same tokenizer from the same captions
                self.tokenizer = train_tokenizer(self.tokenizer_corpus(), self.vocab_size)
        n_vocab = self.tokenizer.get_vocab_size()
        if n_vocab > self.vocab_size:
            raise ConfigError(
                f"tokenizer {self.tokenizer_path} has {n_vocab} tokens but data.tokenizer.vocab_size is "
                f"{self.vocab_size}; set data.tokenizer.vocab_size={n_vocab} or more"
            )

    @property
    def eot_id(self) -> int:
        return eot_id(self.tokenizer)

    def transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        return image_transform(self.image_model, self.image_size, train, self.augment, self.crop_pct)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the images are normalised with: to show them again (callbacks/similarity.py)."""
        cfg = model_data_config(self.image_model)
        return tuple(cfg["mean"]), tuple(cfg["std"])

    def zero_shot_tokens(self) -> tuple[list[str], torch.Tensor] | None:
        """(class names, (C, P, T) prompt tokens), P prompts per class; None without classes."""
        prompts = self.zero_shot_prompts()
        if not prompts:
            return None
        names = list(prompts)
        counts = {len(p) for p in prompts.values()}
        if len(counts) != 1:
            raise ConfigError("every zero-shot class needs the same number of prompts")
        flat = [p for name in names for p in prompts[name]]
        tokens = tokenize_captions(self.tokenizer, flat, self.context_length)
        return names, tokens.view(len(names), counts.pop(), self.context_length)

    def train_dataloader(self) -> DataLoader:
        dataset = EpochItems(self.dataset("train", self.transform(train=True)), self.seed)
        world, rank = world_of(self.trainer)
        if len(dataset) < self.batch_size * world:
            raise ConfigError(
                f"{len(dataset)} training pairs cannot fill one batch of {self.batch_size} on {world} device(s): "
                "lower data.batch_size or add data"
            )
        # Whole batches only (the contrastive loss gathers equal-sized batches from every rank), in an
        # order that a resumed run continues exactly.
        sampler = EpochSampler(dataset, world, rank, self.batch_size, shuffle=self.shuffle_train, seed=self.seed)
        return self._loader(dataset, self.batch_size, sampler=sampler.resume_from(self.trainer))

    def val_dataloader(self) -> DataLoader:
        # Fixed order: the first batch is the same every validation (the similarity-matrix figure).
        return self._loader(self.dataset("val", self.transform(train=False)), self.val_batch_size)

    def _loader(self, dataset: Dataset, batch_size: int, sampler: EpochSampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=sampler is not None,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    # -- checkpoint state: everything pipeline.py needs to encode new inputs ---------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "tokenizer": self.tokenizer.to_str() if self.tokenizer is not None else None,
            "context_length": self.context_length,
            "image_model": self.image_model,
            "image_size": self.image_size,
            "crop_pct": self.crop_pct,
            "classes": list(self.classes),
            "zero_shot_prompts": self.zero_shot_prompts() if self.tokenizer is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # On resume: the checkpoint's tokenizer, so token ids mean what the weights learned.
        if state.get("tokenizer"):
            self.tokenizer = Tokenizer.from_str(state["tokenizer"])
            if self.tokenizer.token_to_id(EOT) is None:
                raise ConfigError(f"the checkpoint's tokenizer has no {EOT} token")
