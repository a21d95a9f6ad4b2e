"""Byte-level BPE tokenizer (Hugging Face `tokenizers`): trained on the corpus, or loaded from a file."""

import codecs
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


def _byte_symbols() -> dict[str, int]:
    """The byte-level alphabet: each of the 256 bytes is one printable character in a token's text.
    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are shifted to
    the characters from U+0100 on, in byte order (so a leading space shows as 'Ġ', U+0120)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    symbols = {chr(b): b for b in printable}
    symbols.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return symbols


BYTE_OF_SYMBOL = _byte_symbols()


def decode_utf8(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    """The text of `ids` with only whole UTF-8 characters.

    One character can span several byte-level tokens (an emoji is 4 bytes, often 2-4 tokens), and a
    sampled sequence can stop inside one or hold a stray continuation byte. `Tokenizer.decode` turns
    each such fragment into U+FFFD; here the token bytes are joined first and decoded as one stream,
    an unfinished last character is left out and stray bytes are dropped. Special tokens (EOT) are
    skipped, as `Tokenizer.decode` skips them.
    """
    special = set(tokenizer.get_added_tokens_decoder())
    data = bytearray()
    for i in ids:
        if i not in special:
            data.extend(BYTE_OF_SYMBOL[c] for c in tokenizer.id_to_token(i))
    # final=False: the bytes of an unfinished character at the end are held back, not replaced.
    return codecs.getincrementaldecoder("utf-8")(errors="ignore").decode(bytes(data), final=False)
