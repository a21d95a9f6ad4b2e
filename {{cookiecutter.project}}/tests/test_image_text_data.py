"""Image-text data: COCO / JSONL / folder readers, RGB decoding, timm transforms, caption tokens,
the shapes generator, and one clear error for each kind of malformed annotation."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from {{cookiecutter.package}}.cli import exit_on_user_error
from {{cookiecutter.package}}.data.image_text import (
    ImageTextDataModule,
    image_transform,
    load_rgb,
    read_coco,
    read_folder,
    read_jsonl,
    tokenize_captions,
)
from {{cookiecutter.package}}.data.shapes import COLOURS, KINDS, SPECS, ShapesDataModule, ShapesDataset
from {{cookiecutter.package}}.data.tokenizer import train_tokenizer
from {{cookiecutter.package}}.errors import ConfigError, DataFormatError, DataPathError

from .conftest import run_script

pytestmark = pytest.mark.usefixtures("single_thread")


def module(**kwargs) -> ImageTextDataModule:
    defaults = dict(
        image_model="vit_tiny_patch16_224",
        image_size=32,
        context_length=16,
        tokenizer={"vocab_size": 300},
        batch_size=4,
        num_workers=0,
    )
    return ImageTextDataModule(**{**defaults, **kwargs})


def test_readers_agree_on_the_same_pairs(image_pairs):
    jsonl = read_jsonl(image_pairs / "pairs.jsonl", image_pairs)
    coco = read_coco(image_pairs / "coco.json", image_pairs)
    assert len(jsonl) == 24 and len(coco) == 48  # COCO: two captions per image
    assert [r.image for r in coco[::2]] == [r.image for r in jsonl]
    assert [r.caption for r in coco[::2]] == [r.caption for r in jsonl]
    classes = sorted(p.name for p in (image_pairs / "folders").iterdir())
    folder = read_folder(image_pairs / "folders", "a photo of a {}", classes)
    assert len(folder) == 24 and all(r.caption == f"a photo of a {classes[r.label]}" for r in folder)


def test_batches_hold_rgb_images_of_the_configured_size_and_eot_padded_tokens(image_pairs):
    dm = module(train=str(image_pairs / "coco.json"), val_fraction=0.25)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (4, 16) and batch["text"].dtype == torch.int64
    eot = dm.eot_id
    assert all((row == eot).any() for row in batch["text"])
    val = [item for b in dm.val_dataloader() for item in b["image_id"].tolist()]
    assert len(val) == 2 * 6  # 6 of 24 images held out, with both of their captions
    held_out = {r.image for r in dm._records["val"]}
    assert not held_out & {r.image for r in dm._records["train"]}


def test_grayscale_rgba_and_arrays_decode_to_rgb(image_pairs):
    for name in ("images/001.png", "images/002.png"):  # L and RGBA files
        assert Image.open(image_pairs / name).mode in ("L", "RGBA")
        assert load_rgb(image_pairs / name).mode == "RGB"
    assert load_rgb(np.zeros((5, 7), dtype=np.uint8)).size == (7, 5)
    assert load_rgb(np.ones((5, 7, 4), dtype=np.float32)).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(DataFormatError, match=r"expected an array of shape .* got \(5, 7, 2\)"):
        load_rgb(np.zeros((5, 7, 2), dtype=np.uint8))
    bad = image_pairs / "not-an-image.png"
    bad.write_text("hello")
    with pytest.raises(DataFormatError, match="cannot decode .*not-an-image.png"):
        load_rgb(bad)


def test_train_transform_augments_and_eval_transform_is_deterministic():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    augment = {"scale": [0.5, 1.0], "hflip": 0.0, "color_jitter": None}
    train = image_transform("vit_tiny_patch16_224", 32, train=True, augment=augment)
    val = image_transform("vit_tiny_patch16_224", 32, train=False)
    torch.manual_seed(0)
    assert train(image).shape == val(image).shape == (3, 32, 32)
    assert not torch.equal(train(image), train(image))  # random resized crops
    assert torch.equal(val(image), val(image))
    # The model's normalisation: ViTs from timm use mean = std = 0.5, so white is exactly 1.
    white = val(Image.new("RGB", (40, 40), (255, 255, 255)))
    torch.testing.assert_close(white, torch.ones_like(white))


def test_tokenize_pads_with_eot_and_truncates_keeping_it():
    tok = train_tokenizer(["a red circle", "a blue square at the top"], vocab_size=300)
    tokens = tokenize_captions(tok, ["a red circle", "a blue square at the top " * 10], context_length=8)
    eot = tok.token_to_id("<|endoftext|>")
    assert tokens.shape == (2, 8)
    assert (tokens[0] == eot).sum() >= 1 and tokens[1, -1] == eot and (tokens[1, :-1] != eot).all()


def test_shapes_are_deterministic_and_match_their_captions():
    a, b = ShapesDataset("val", 10, 32, seed=3), ShapesDataset("val", 10, 32, seed=3)
    assert all(np.array_equal(np.asarray(a[i]["image"]), np.asarray(b[i]["image"])) for i in range(10))
    train, other_seed = ShapesDataset("train", 10, 32, seed=3), ShapesDataset("val", 10, 32, seed=4)
    assert [a[i]["caption"] for i in range(10)] != [train[i]["caption"] for i in range(10)]
    assert [a[i]["caption"] for i in range(10)] != [other_seed[i]["caption"] for i in range(10)]
    for i in range(10):
        item = a[i]
        spec = SPECS[item["text_id"]]
        assert spec.caption == item["caption"] and KINDS[item["label"]] == spec.kind
        # The shape's colour is in the image: the pixels closest to it are far from the background.
        pixels = np.asarray(item["image"], dtype=np.float32).reshape(-1, 3)
        assert np.abs(pixels - np.array(COLOURS[spec.colour])).sum(axis=1).min() < 60, item["caption"]
    assert len(SPECS) == len({s.caption for s in SPECS}) == 1296


def test_shapes_training_groups_differ_only_in_kind():
    groups = ShapesDataset("train", 24, 32, seed=0, kind_group=4)
    for first in range(0, 24, 4):
        specs = [SPECS[groups[first + j]["text_id"]] for j in range(4)]
        assert len({s.kind for s in specs}) == 4
        assert len({(s.colour, s.size, s.position) for s in specs}) == 1
    dm = ShapesDataModule(image_size=32, train_size=16, val_size=8, batch_size=8)
    dm.setup("fit")
    captions = next(iter(dm.train_dataloader()))["caption"]
    assert len({c.split()[3] for c in captions[:4]}) == 4 and len({c.split()[2] for c in captions[:4]}) == 1
    with pytest.raises(ConfigError, match="data.kind_group=4 must be in .* and divide data.batch_size=6"):
        ShapesDataModule(batch_size=6)


def test_a_resumed_epoch_sees_the_same_augmented_batches(image_pairs):
    augment = {"scale": [0.5, 1.0], "hflip": 0.5}  # random crops and flips: the images differ each draw
    dm = module(train=str(image_pairs / "pairs.jsonl"), val_fraction=0.25, augment=augment)
    dm.setup("fit")

    def batches(epoch: int, skip: int = 0) -> list[dict]:
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        loader.sampler.resume_epoch, loader.sampler.skip = epoch, skip
        return list(loader)

    full, resumed = batches(1), batches(1, skip=1)
    assert len(resumed) == len(full) - 1 >= 1
    for a, b in zip(full[1:], resumed):
        assert a["caption"] == b["caption"] and torch.equal(a["image"], b["image"])
    again = batches(2)  # the next epoch: another order, and the same item is augmented anew
    first = {c: img for batch in full for c, img in zip(batch["caption"], batch["image"])}
    later = {c: img for batch in again for c, img in zip(batch["caption"], batch["image"])}
    assert any(not torch.equal(first[c], later[c]) for c in first.keys() & later.keys())
    items, rng = dm.train_dataloader().dataset, torch.get_rng_state()
    assert torch.equal(items[25]["image"], items[25]["image"])  # a pure function of the global id ...
    assert torch.equal(torch.get_rng_state(), rng)  # ... that leaves the caller's random state alone


def test_shapes_datamodule_tokenizer_is_the_same_every_time():
    one, two = ShapesDataModule(image_size=32, train_size=8, val_size=8), ShapesDataModule(image_size=32)
    one.setup("fit")
    two.setup("fit")
    assert one.tokenizer.to_str() == two.tokenizer.to_str()
    names, prompts = one.zero_shot_tokens()
    assert names == list(KINDS) and prompts.shape == (6, 216, 16)


@pytest.mark.parametrize(
    "fmt, record, expected",
    [
        ("jsonl", {"image": "images/nope.png", "caption": "a cat"}, r"bad.jsonl:2: image file .*nope.png not found"),
        ("jsonl", {"image": "images/000.png"}, r"bad.jsonl:2: missing caption \(expected a non-empty string"),
        ("jsonl", {"image": "images/000.png", "caption": "  "}, r"bad.jsonl:2: missing caption"),
        ("jsonl", {"caption": "a cat"}, r"bad.jsonl:2: missing image path \(expected a string under 'image'"),
        ("coco", {"id": 7, "image_id": 100}, r"coco-bad.json: annotations\[1\] \(id 7, image_id 100\): missing cap"),
        ("coco", {"id": 7, "image_id": 5, "caption": "x"}, r"annotations\[1\] \(id 7, image_id 5\): image_id is not"),
        (
            "coco",
            {"id": 7, "image_id": 101, "caption": "x"},
            r"coco-bad.json: 1 of the 2 images its annotations .*gone",
        ),
        ("coco", {"id": 7, "image_id": [100], "caption": "x"}, r"annotations\[1\] .*image_id is not the id of any"),
    ],
)
def test_malformed_annotations_raise_one_error_naming_the_record(image_pairs, tmp_path, fmt, record, expected):
    if fmt == "jsonl":
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps({"image": "images/000.png", "caption": "fine"}) + "\n" + json.dumps(record) + "\n")
    else:
        path = tmp_path / "coco-bad.json"
        images = [{"id": 100, "file_name": "images/000.png"}, {"id": 101, "file_name": "images/gone.png"}]
        annotations = [{"id": 6, "image_id": 100, "caption": "fine"}, record]
        path.write_text(json.dumps({"images": images, "annotations": annotations}))
    dm = module(train=[{"path": str(path), "image_root": str(image_pairs)}])
    with pytest.raises((DataFormatError, DataPathError), match=expected):
        dm.setup("fit")


@pytest.mark.slow
def test_train_py_reports_a_bad_record_in_one_line(image_pairs, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"image": str(image_pairs / "images/000.png"), "caption": "fine"})
        + "\n"
        + json.dumps({"image": str(image_pairs / "images/000.png")})
        + "\n"
    )
    proc = run_script(
        "train.py",
        "model=clip",
        "model/clip_net=tiny",
        "data=image_text",
        f"data.train=[{bad}]",
        "data.image_size=32",
        "trainer=cpu",
        f"hydra.run.dir={tmp_path / 'run'}",
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {bad}:2: missing caption (expected a non-empty string under 'caption', got None)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_coco_file_naming_missing_images_counts_them_and_names_the_first(image_pairs, tmp_path):
    data = json.loads((image_pairs / "coco.json").read_text())
    for image in data["images"][3:6]:
        image["file_name"] = image["file_name"].replace(".png", "-gone.png")
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataPathError) as e:
        read_coco(path, image_pairs)
    assert str(e.value).startswith(f"{path}: 3 of the 24 images its annotations name are missing under {image_pairs}")
    assert "003-gone.png" in str(e.value) and "set image_root" in str(e.value)


def test_a_folder_of_images_without_captions_says_how_to_caption_them(image_pairs, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("000.png", "001.png"):
        (flat / name).write_bytes((image_pairs / "images" / name).read_bytes())
    with pytest.raises(DataFormatError, match=r"image folder .*flat holds 2 images but no captions: .*<class>/\*\.jpg"):
        module(train=[str(flat)]).setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataPathError, match="holds no class subfolders with images"):
        read_folder(tmp_path / "empty", "a photo of a {}", [])


def test_a_corrupt_image_read_in_a_dataloader_worker_is_one_line_naming_the_file(image_pairs, tmp_path, capsys):
    """The worker re-raises with its traceback as the message; the entry point prints the error's own line."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes((image_pairs / "images" / "000.png").read_bytes()[:60])
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "images/broken.png", "caption": "a red square"}) + "\n")
    dm = module(train=[str(tmp_path / "pairs.jsonl")], val=[str(image_pairs / "pairs.jsonl")], num_workers=1)
    dm.setup("fit")

    @exit_on_user_error
    def first_batch() -> None:
        next(iter(dm._loader(dm.dataset("train", dm.transform(train=False)), 1)))

    with pytest.raises(SystemExit) as e:
        first_batch()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert f"cannot decode {tmp_path / 'images' / 'broken.png'} as an image" in err
