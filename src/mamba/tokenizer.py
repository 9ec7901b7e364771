"""Byte-level BPE tokenizer of the Mamba model, trained on the training documents.

Built with the ``tokenizers`` library. Byte-level means every string can be encoded (no
unknown characters) and decoding gives back the exact text. It is saved as one
self-contained JSON file (``checkpoints/mamba/vocab.json``, the ``tokenizers`` format) that
loads on its own::

    tok = MambaTokenizer.from_file("checkpoints/mamba/vocab.json")
    tok.decode(tok.encode("def f(x): ..."))       # -> "def f(x): ..."

(``transformers.PreTrainedTokenizerFast(tokenizer_file=...)`` loads the same file.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from src.core.errors import CheckpointError, ConfigError

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3 in this order
BYTE_SYMBOLS = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + BYTE_SYMBOLS


class MambaTokenizer:
    """A trained ``tokenizers.Tokenizer`` with MARK's special tokens.

    ``pad_id``, ``bos_id``, ``eos_id``, ``unk_id`` are 0..3; ``vocab_size`` is the real size
    (it can be below the requested size when the corpus has too few distinct merges).
    """

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if ids != list(range(len(SPECIAL_TOKENS))):
            raise CheckpointError(f"tokenizer: special tokens {SPECIAL_TOKENS} must have ids 0..3, found {ids}")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = ids

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> "MambaTokenizer":
        """Train a byte-level BPE on ``texts`` with at most ``vocab_size`` entries."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(
                f"model.vocab_size: {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE} "
                f"({len(SPECIAL_TOKENS)} special tokens + {BYTE_SYMBOLS} byte symbols)"
            )
        tokenizer = Tokenizer(models.BPE(unk_token=UNK))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def from_str(cls, json_text: str, source: str = "tokenizer") -> "MambaTokenizer":
        """Load from the JSON text written by :meth:`to_str`."""
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_str(json_text)
        except Exception as err:  # the library raises a bare Exception on bad JSON
            raise CheckpointError(f"{source}: not a valid tokenizer file: {str(err).splitlines()[0][:200]}") from None
        return cls(tokenizer)

    @classmethod
    def from_file(cls, path: str | Path) -> "MambaTokenizer":
        """Load ``vocab.json``."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: tokenizer file not found")
        return cls.from_str(path.read_text(encoding="utf-8"), str(path))

    def to_str(self) -> str:
        """The self-contained JSON of the tokenizer."""
        return self._tok.to_str()

    def save(self, path: str | Path) -> Path:
        """Write the JSON to ``path`` atomically."""
        from src.core.checkpoint import atomic_write_text

        return atomic_write_text(path, self.to_str())

    def fingerprint(self) -> str:
        """SHA-256 of the JSON: two tokenizers with the same fingerprint encode identically."""
        return hashlib.sha256(self.to_str().encode("utf-8")).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts (parallel inside ``tokenizers``)."""
        return [enc.ids for enc in self._tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are left out unless ``skip_special_tokens=False``."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)
