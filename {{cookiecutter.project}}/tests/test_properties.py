"""Property tests (hypothesis): any input loads correctly or fails with the documented error, never
a raw traceback. Data readers, the token cache, the sampling filters."""

import json
import tempfile
from pathlib import Path
{% if cookiecutter.gpt %}
import numpy as np
{%- endif %}
import pytest
{%- if cookiecutter.gpt %}
import torch
from hypothesis import HealthCheck, assume, given, settings
{%- else %}
from hypothesis import HealthCheck, given, settings
{%- endif %}
from hypothesis import strategies as st
{%- if cookiecutter.gpt %}
from hypothesis.extra.numpy import arrays
{%- endif %}
{% if cookiecutter.clip %}
from {{cookiecutter.package}}.data.image_text import read_coco, read_jsonl
{%- endif %}
{%- if cookiecutter.gpt %}
from {{cookiecutter.package}}.data.text import TextDataModule, read_documents
from {{cookiecutter.package}}.data.tokenizer import EOT
{%- endif %}
from {{cookiecutter.package}}.errors import {% if cookiecutter.gpt %}ConfigError, {% endif %}DataFormatError, DataPathError, UserInputError
{%- if cookiecutter.gpt %}
from {{cookiecutter.package}}.generation import filter_logits
{%- endif %}

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
{%- if cookiecutter.gpt %}

# One JSONL line and whether read_documents must accept it: (bytes, text or None when it is bad).
GOOD_LINE = st.text(max_size=30).map(lambda t: (json.dumps({"text": t, "id": 1}).encode(), t))
BLANK_LINE = st.sampled_from([b"", b"   ", b"\t"]).map(lambda b: (b, ""))
BAD_LINE = st.one_of(
    JSON.filter(lambda v: not (isinstance(v, dict) and isinstance(v.get("text"), str))).map(
        lambda v: (json.dumps(v).encode(), None)
    ),
    st.text(alphabet="abc{}[]:, ", max_size=10).map(lambda t: (b"{oops" + t.encode(), None)),
    st.binary(min_size=1, max_size=5).map(lambda b: (b"\xff" + b.replace(b"\n", b""), None)),
)


@SETTINGS
@given(st.lists(st.one_of(GOOD_LINE, BLANK_LINE, BAD_LINE), max_size=8))
def test_jsonl_documents_load_or_fail_naming_the_first_bad_line(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "docs.jsonl"
        path.write_bytes(b"\n".join(raw for raw, _ in lines) + b"\n")
        first_bad = next((i for i, (raw, text) in enumerate(lines, start=1) if text is None), None)
        if first_bad is None:
            assert list(read_documents([path])) == [t for raw, t in lines if raw.strip()]
        else:
            with pytest.raises(DataFormatError) as e:
                list(read_documents([path]))
            assert str(e.value).startswith(f"{path}:{first_bad}: ")


@SETTINGS
@given(st.binary(max_size=64))
def test_text_files_are_utf8_or_one_error_naming_the_file(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.txt"
        path.write_bytes(data)
        try:
            expected = data.decode("utf-8")
        except UnicodeDecodeError:
            with pytest.raises(DataFormatError, match=f"^{path}: not UTF-8 text"):
                list(read_documents([path]))
        else:
            assert list(read_documents([path])) == [expected]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    docs=st.lists(st.text(max_size=200).filter(lambda t: EOT not in t), min_size=1, max_size=5),
    vocab_size=st.integers(257, 400),
    val_fraction=st.floats(0.05, 0.5),
)
def test_the_token_cache_decodes_back_to_the_documents_and_is_reused(docs, vocab_size, val_fraction):
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, doc in enumerate(docs):
            files.append(Path(tmp) / f"{i}.txt")
            files[-1].write_text(doc, encoding="utf-8")
        kwargs = dict(paths=[str(f) for f in files], block_size=4, tokenizer={"vocab_size": vocab_size})
        dm = TextDataModule(**kwargs, val_fraction=val_fraction, cache_dir=str(Path(tmp) / "cache"))
        dm.prepare_data()
        dm.setup("fit")
        tokens = np.concatenate([dm.train_tokens, dm.val_tokens]).tolist()
        eot = dm.tokenizer.token_to_id(EOT)
        assert tokens.count(eot) == len(docs) and tokens[-1] == eot
        decoded, start = [], 0
        for end in (i for i, t in enumerate(tokens) if t == eot):
            decoded.append(dm.tokenizer.decode(tokens[start:end]))
            start = end + 1
        assert decoded == docs  # byte-level BPE: every string round-trips
        assert dm.meta["n_tokens"] == len(tokens) and dm.meta["vocab_size"] <= vocab_size
        built = (dm.cache_path / "meta.json").stat().st_mtime_ns
        again = TextDataModule(**kwargs, val_fraction=val_fraction, cache_dir=str(Path(tmp) / "cache"))
        again.prepare_data()
        again.setup("fit")
        assert (again.cache_path / "meta.json").stat().st_mtime_ns == built  # reused, not rebuilt
        assert list(Path(tmp, "cache").iterdir()) == [dm.cache_path]  # no half-built folder left beside it
        try:
            dm.train_dataloader()
        except ConfigError as e:  # too few tokens for one batch: the documented error
            assert "data.batch_size" in str(e) or "data.block_size" in str(e)


LOGITS = arrays(
    np.float32,
    st.tuples(st.integers(1, 3), st.integers(1, 12)),
    elements=st.one_of(st.floats(-1e4, 1e4, width=32), st.just(-np.inf)),
)


@SETTINGS
@given(
    logits=LOGITS,
    top_k=st.none() | st.integers(-2, 15),
    top_p=st.none() | st.floats(-0.5, 1.5, allow_nan=False),
)
def test_sampling_filters_keep_a_valid_distribution_or_reject_the_option(logits, top_k, top_p):
    assume(np.isfinite(logits).any(axis=1).all())  # a model's logits always have a finite maximum
    x = torch.from_numpy(logits)
    if (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        with pytest.raises(ConfigError, match=r"^top_[kp]=.* is out of range"):
            filter_logits(x, top_k=top_k, top_p=top_p)
        return
    out = filter_logits(x, top_k=top_k, top_p=top_p)
    kept = out.isfinite()
    assert not out.isnan().any() and kept.any(dim=1).all()
    assert torch.equal(out[kept], x[kept])  # kept logits are unchanged
    assert kept.gather(1, x.argmax(1, keepdim=True)).all()  # the most likely token always stays
    probs = out.softmax(-1)
    assert not probs.isnan().any()
    for row, keep, p in zip(x, kept, x.softmax(-1)):
        dropped = row[~keep & row.isfinite()]
        if dropped.numel():  # a filter drops only tokens less likely than every kept one
            assert dropped.max() <= row[keep].min()
        if top_k is not None and top_p is None:
            assert keep.sum() >= min(top_k, int(row.isfinite().sum()))
        if top_p is not None and top_k is None and top_p < 1:
            mass = float(p[keep].sum())
            assert mass >= top_p - 1e-5 or keep.sum() == row.isfinite().sum()
            assert mass - float(p[keep].min()) < top_p + 1e-5  # and no more than needed
{%- endif %}
{%- if cookiecutter.clip %}


IMAGE_ID = st.one_of(
    st.integers(0, 3), st.text(max_size=2), st.none(), st.lists(st.integers(), max_size=1), st.booleans()
)
FILE_NAME = st.one_of(st.sampled_from(["images/000.png", "images/001.png", "images/gone.png", "a\x00b"]), JSON)
COCO = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {
            "images": st.lists(st.fixed_dictionaries({"id": IMAGE_ID, "file_name": FILE_NAME}) | JSON, max_size=4),
            "annotations": st.lists(
                st.fixed_dictionaries({"image_id": IMAGE_ID, "caption": st.text(max_size=10) | JSON}) | JSON,
                max_size=4,
            ),
        }
    ),
)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    for name in ("000.png", "001.png"):
        Image.new("RGB", (4, 4)).save(root / "images" / name)
    return root


def check_records(records: list, root: Path) -> None:
    for r in records:
        assert r.image.is_file() and r.image.is_relative_to(root)
        assert r.caption and r.caption == " ".join(r.caption.split())


@SETTINGS
@given(data=COCO)
def test_coco_files_load_or_fail_naming_the_file(images, data):
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=images, delete=False) as f:
        json.dump(data, f)
    path = Path(f.name)
    try:
        check_records(read_coco(path, images), images)
    except (DataFormatError, DataPathError) as e:
        assert str(e).startswith(f"{path}")
    finally:
        path.unlink()


@SETTINGS
@given(
    lines=st.lists(
        st.fixed_dictionaries({"image": FILE_NAME, "caption": st.text(max_size=10) | JSON}) | JSON, max_size=4
    )
)
def test_jsonl_pairs_load_or_fail_naming_the_line(images, lines):
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", dir=images, delete=False) as f:
        f.write("\n".join(json.dumps(line) for line in lines) + "\n")
    path = Path(f.name)
    try:
        check_records(read_jsonl(path, images), images)
    except (DataFormatError, DataPathError) as e:
        assert str(e).startswith(f"{path}:")
    finally:
        path.unlink()
{%- endif %}


def test_user_errors_are_the_documented_classes():
    assert issubclass(DataFormatError, UserInputError) and issubclass(DataPathError, UserInputError)
