"""Byte-level BPE tokenizer (Hugging Face `tokenizers`): trained on the corpus, or loaded from a file."""

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..errors import ConfigError, DataPathError

EOT = "<|endoftext|>"  # separates documents; also pads and ends captions
MIN_VOCAB = 257  # 256 byte symbols + EOT


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Learn merges until `vocab_size` tokens (fewer if the corpus runs out of pairs).

    Byte-level: every string encodes, nothing is ever out of vocabulary. For real corpora 32K-64K is
    the usual size; the Shakespeare demo uses 2048 so the tiny model trains in minutes on a CPU.
    """
    if vocab_size < MIN_VOCAB:
        raise ConfigError(f"data.tokenizer.vocab_size must be >= {MIN_VOCAB} (256 bytes + {EOT}), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise DataPathError(
            f"tokenizer file (data.tokenizer.path) {path} does not exist (expected a tokenizers JSON file)"
        )
    tokenizer = Tokenizer.from_file(str(path))
    if tokenizer.token_to_id(EOT) is None:
        raise ConfigError(f"tokenizer {path} has no {EOT} token; add it as a special token")
    return tokenizer


def eot_id(tokenizer: Tokenizer) -> int:
    return tokenizer.token_to_id(EOT)
