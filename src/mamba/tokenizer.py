"""Byte-level BPE tokenizer of the Mamba model, trained on the training documents.

Built with the ``tokenizers`` library. Byte-level means every string can be encoded (no
unknown characters) and decoding gives back the exact text. It is saved as one
self-contained JSON file (``checkpoints/mamba/vocab.json``, the ``tokenizers`` format) that
loads on its own::

    tok = MambaTokenizer.from_file("checkpoints/mamba/vocab.json")
    tok.decode(tok.encode("def f(x): ..."))       # -> "def f(x): ..."

(``transformers.PreTrainedTokenizerFast(tokenizer_file=...)`` loads the same file.)

The same class wraps any Hugging Face *fast* tokenizer of a pretrained model
(:meth:`MambaTokenizer.from_pretrained`, e.g. GPT-NeoX's for state-spaces/mamba2-*): its
special tokens are then the checkpoint's own (``bos_token``/``eos_token``/``pad_token``
of ``tokenizer_config.json``) instead of MARK's ids 0..3, and :meth:`to_str` writes a small
JSON wrapper ``{"mark_tokenizer": 1, "special_tokens": {...}, "tokenizer": {...}}`` so the
checkpoint keeps them. Everything downstream uses only ``encode``/``decode``/``*_id``/
``vocab_size``/``to_str``/``fingerprint``, so it works with either.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from src.core.errors import CheckpointError, ConfigError

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3 in this order
BYTE_SYMBOLS = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + BYTE_SYMBOLS
WRAPPER_KEY = "mark_tokenizer"  # marks the JSON of a pretrained tokenizer with its own special tokens
SPECIAL_ROLES = ("bos", "eos", "pad", "unk")


class MambaTokenizer:
    """A trained ``tokenizers.Tokenizer`` with MARK's special tokens.

    ``pad_id``, ``bos_id``, ``eos_id``, ``unk_id`` are 0..3; ``vocab_size`` is the real size
    (it can be below the requested size when the corpus has too few distinct merges).
    """

    def __init__(self, tokenizer, special_tokens: dict[str, str | None] | None = None) -> None:
        self._tok = tokenizer
        self.special_tokens = dict(special_tokens) if special_tokens is not None else None
        if special_tokens is None:  # MARK's own BPE: the four special tokens at ids 0..3
            ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
            if ids != list(range(len(SPECIAL_TOKENS))):
                raise CheckpointError(f"tokenizer: special tokens {SPECIAL_TOKENS} must have ids 0..3, found {ids}")
            self.pad_id, self.bos_id, self.eos_id, self.unk_id = ids
            return
        unknown = set(special_tokens) - set(SPECIAL_ROLES)
        if unknown:
            raise CheckpointError(f"tokenizer: unknown special token roles {sorted(unknown)} (known: {', '.join(SPECIAL_ROLES)})")
        ids: dict[str, int | None] = {}
        for role in SPECIAL_ROLES:
            token = special_tokens.get(role)
            ids[role] = None if token is None else tokenizer.token_to_id(token)
            if token is not None and ids[role] is None:
                raise CheckpointError(f"tokenizer: its {role} token {token!r} is not in its vocabulary")
        # A pretrained LM needs a document separator; GPT-NeoX-style tokenizers have one
        # token for both ends, some have only an eos. Padding only fills masked positions.
        if ids["eos"] is None and ids["bos"] is None:
            raise CheckpointError("tokenizer: it has neither a bos nor an eos token; MARK separates documents with them")
        self.eos_id = ids["eos"] if ids["eos"] is not None else ids["bos"]
        self.bos_id = ids["bos"] if ids["bos"] is not None else self.eos_id
        self.pad_id = ids["pad"] if ids["pad"] is not None else self.eos_id
        self.unk_id = ids["unk"]

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
        """Load from the JSON text written by :meth:`to_str` (MARK's BPE or a wrapped pretrained one)."""
        from tokenizers import Tokenizer

        special_tokens = None
        try:
            parsed = json.loads(json_text)
            if isinstance(parsed, dict) and WRAPPER_KEY in parsed:
                special_tokens = parsed["special_tokens"]
                json_text = json.dumps(parsed["tokenizer"])
            tokenizer = Tokenizer.from_str(json_text)
        except Exception as err:  # the library raises a bare Exception on bad JSON
            raise CheckpointError(f"{source}: not a valid tokenizer file: {str(err).splitlines()[0][:200]}") from None
        return cls(tokenizer, special_tokens)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, key: str = "model.tokenizer") -> "MambaTokenizer":
        """The fast tokenizer of a Hugging Face folder (``tokenizer.json`` + ``tokenizer_config.json``)
        or hub id, with its bos/eos/pad/unk tokens. ``key`` names the config key in errors."""
        from transformers import AutoTokenizer

        from src.core.hub import hub_error

        source = Path(name_or_path).expanduser()
        if not source.exists() and _looks_local(str(name_or_path)):
            raise ConfigError(f"{key}: {name_or_path}: no such folder")
        try:
            hf = AutoTokenizer.from_pretrained(str(source) if source.exists() else str(name_or_path))
        except Exception as err:
            raise hub_error(str(name_or_path), key, err) from None
        return cls.from_hf(hf, f"{key}: {name_or_path}")

    @classmethod
    def from_hf(cls, hf_tokenizer, source: str = "tokenizer") -> "MambaTokenizer":
        """Wrap a ``transformers`` fast tokenizer (its backend ``tokenizers.Tokenizer`` and special tokens)."""
        if not getattr(hf_tokenizer, "is_fast", False):
            raise ConfigError(f"{source}: not a fast (tokenizers-backed) tokenizer; MARK needs a tokenizer.json")
        special = {
            role: (str(getattr(hf_tokenizer, f"{role}_token")) if getattr(hf_tokenizer, f"{role}_token", None) is not None else None)
            for role in SPECIAL_ROLES
        }
        backend = hf_tokenizer.backend_tokenizer
        from tokenizers import Tokenizer

        # A copy without padding/truncation settings: MARK pads and cuts itself.
        tokenizer = Tokenizer.from_str(backend.to_str())
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return cls(tokenizer, special)

    @classmethod
    def from_file(cls, path: str | Path) -> "MambaTokenizer":
        """Load ``vocab.json``."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: tokenizer file not found")
        return cls.from_str(path.read_text(encoding="utf-8"), str(path))

    def to_str(self) -> str:
        """The self-contained JSON of the tokenizer (wrapped with its special tokens when pretrained)."""
        if self.special_tokens is None:
            return self._tok.to_str()
        return json.dumps({WRAPPER_KEY: 1, "special_tokens": self.special_tokens, "tokenizer": json.loads(self._tok.to_str())})

    @property
    def backend(self):
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def is_pretrained(self) -> bool:
        """True for a pretrained model's tokenizer, False for MARK's own BPE."""
        return self.special_tokens is not None

    def token_names(self) -> dict[str, str | None]:
        """The bos/eos/pad/unk token strings (MARK's or the checkpoint's)."""
        return {role: self.id_to_token(getattr(self, f"{role}_id")) if getattr(self, f"{role}_id") is not None else None
                for role in SPECIAL_ROLES}

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
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts (parallel inside ``tokenizers``)."""
        return [enc.ids for enc in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are left out unless ``skip_special_tokens=False``."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


def _looks_local(name: str) -> bool:
    """A name that can only be a path (a hub id is ``owner/name`` or ``name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
