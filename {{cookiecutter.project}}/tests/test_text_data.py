import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from {{cookiecutter.package}}.data.text import (
    RandomWindows,
    SequentialWindows,
    TextDataModule,
    list_files,
    read_documents,
    unigram_loss,
)
from {{cookiecutter.package}}.data.tokenizer import EOT, decode_utf8, train_tokenizer
from {{cookiecutter.package}}.errors import ConfigError, DataFormatError, DataPathError


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reads_text_markdown_folders_and_jsonl(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub" / "b.md").write_text("# beta")
    (tmp_path / "ignored.csv").write_text("x,y")
    write_jsonl(tmp_path / "c.jsonl", ['{"body": "gamma"}', "", '{"body": "delta"}'])
    files = list_files([str(tmp_path)])
    assert [f.name for f in files] == ["a.txt", "c.jsonl", "b.md"]
    assert list(read_documents(files, text_key="body")) == ["alpha", "gamma", "delta", "# beta"]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "ok"}', '{"text": "unterminated'])
    with pytest.raises(DataFormatError, match=rf"{path}:2: invalid JSON"):
        list(read_documents([path]))


def test_jsonl_without_the_text_key_names_the_key(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"text": "ok"}', '{"content": "x"}'])
    with pytest.raises(DataFormatError, match=rf"{path}:2: expected an object with a string field 'text'.*content"):
        list(read_documents([path]))


def test_missing_path_and_unsupported_file(tmp_path):
    with pytest.raises(DataPathError, match="data path 'nowhere.txt' does not exist"):
        list_files(["nowhere.txt"])
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DataFormatError, match="unsupported type '.csv'"):
        list_files([str(tmp_path / "x.csv")])


def test_tokenizer_round_trips_any_text():
    tok = train_tokenizer(["the cat sat on the mat " * 50], vocab_size=300)
    text = "the cat — Ünïcödé 🐈 sat\n"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: nothing is out of vocabulary
    assert tok.token_to_id(EOT) is not None
    assert tok.get_vocab_size() <= 300
    with pytest.raises(ConfigError, match="vocab_size must be >= 257"):
        train_tokenizer(["x"], vocab_size=100)


def test_decoding_emits_whole_characters_only():
    """An emoji is 4 bytes, several byte-level tokens: a sequence cut inside it (a sample that stopped
    there) or starting with a stray continuation byte decodes without U+FFFD."""
    tok = train_tokenizer(["the cat sat on the mat " * 50], vocab_size=300)
    ids = tok.encode("cat 🐈 sat 🎉").ids
    assert decode_utf8(tok, ids) == "cat 🐈 sat 🎉"
    cut = tok.encode("cat 🐈 sat ").ids + tok.encode("🎉").ids[:-1]  # the last emoji without its last byte
    assert tok.decode(cut).endswith("\ufffd")  # what Tokenizer.decode shows
    assert decode_utf8(tok, cut) == "cat 🐈 sat "
    stray = tok.encode("🐈").ids[-1:] + tok.encode("ok").ids  # a continuation byte first
    assert decode_utf8(tok, stray) == "ok"
    assert decode_utf8(tok, [tok.token_to_id(EOT), *tok.encode("a").ids]) == "a"  # EOT skipped, as decode does


def test_unigram_loss_matches_hand_computation():
    train = np.array([0, 0, 1, 2])
    val = np.array([0, 2])
    # add-one counts over a vocabulary of 4: [3, 2, 2, 1] / 8
    expected = -(math.log(3 / 8) + math.log(2 / 8)) / 2
    assert unigram_loss(train, val, 4) == pytest.approx(expected)


def test_windows_are_shifted_by_one_and_reproducible():
    tokens = np.arange(1000, dtype=np.uint16)
    ds = RandomWindows(tokens, block_size=16, seed=3)
    x, y = ds[5]
    assert x.shape == (16,) and x.dtype == torch.int64
    torch.testing.assert_close(y[:-1], x[1:])
    torch.testing.assert_close(RandomWindows(tokens, 16, seed=3)[5][0], x)
    val = SequentialWindows(tokens, block_size=16, max_windows=4)
    assert len(val) == 4 and val[1][0][0] == 16


def test_datamodule_caches_tokens_once_and_atomically(tmp_path, corpus):
    dm = TextDataModule(
        paths=[str(corpus)],
        block_size=32,
        batch_size=4,
        tokenizer={"vocab_size": 512},
        cache_dir=str(tmp_path / "cache"),
    )
    dm.prepare_data()
    cache = dm.cache_path
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] <= 512
    assert (cache / "tokens.bin").stat().st_size == 2 * meta["n_tokens"]
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temporary folders left
    mtime = (cache / "tokens.bin").stat().st_mtime_ns
    dm2 = TextDataModule(
        paths=[str(corpus)],
        block_size=32,
        batch_size=4,
        tokenizer={"vocab_size": 512},
        cache_dir=str(tmp_path / "cache"),
    )
    dm2.prepare_data()
    dm2.setup()
    assert (cache / "tokens.bin").stat().st_mtime_ns == mtime  # reused, not rebuilt
    x, y = next(iter(dm2.train_dataloader()))
    assert x.shape == (4, 32) and int(x.max()) < 512
    assert 0 < dm2.unigram_loss < math.log(512)
    assert dm2.tokenizer.decode(dm2.val_tokens[:50].tolist())  # real text decodes


def test_a_failed_build_leaves_no_cache(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "fine"}', "not json"])
    dm = TextDataModule(paths=[str(bad)], tokenizer={"vocab_size": 300}, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataFormatError, match="bad.jsonl:2"):
        dm.prepare_data()
    assert list((tmp_path / "cache").iterdir()) == []


def test_existing_tokenizer_larger_than_configured_vocab_is_rejected(tmp_path, corpus):
    tok = train_tokenizer([p.read_text() for p in corpus.iterdir()], vocab_size=600)
    tok.save(str(tmp_path / "tok.json"))
    dm = TextDataModule(
        paths=[str(corpus)],
        tokenizer={"vocab_size": 300, "path": str(tmp_path / "tok.json")},
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(ConfigError, match="set data.tokenizer.vocab_size=600"):
        dm.prepare_data()
