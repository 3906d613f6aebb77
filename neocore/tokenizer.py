"""GPT-2's byte-level BPE, as GPT-Neo uses it, giving the ids Hugging Face's tokenizer gives.

Text is split by GPT-2's pre-tokenisation pattern; each piece's UTF-8 bytes are mapped to
printable characters (bytes_to_unicode) and merged pair by pair, lowest merge rank first.
Pieces repeat a lot in real text, so each short piece's ids are cached."""
from __future__ import annotations

import codecs
import heapq
import operator
import os
from collections.abc import Iterable, Sequence
from functools import cached_property, lru_cache
from itertools import filterfalse
from pathlib import Path
from typing import Any

import regex

from .errors import TokenizerError, shown
from .jsonfile import json_object, read_small_text

# the sets of files a tokenizer is read from, in the order from_dir prefers them
TOKENIZER_SETS = (("vocab.json", "merges.txt"), ("tokenizer.json",), ("tokenizer/tokens.map", "tokenizer/merges.bpe"))
TOKENIZER_PATHS = tuple(name for names in TOKENIZER_SETS for name in names)
HF_TOKENIZER_FILES = TOKENIZER_SETS[0] + TOKENIZER_SETS[1]  # Hugging Face's names (the hub's, convert's)

# GPT-2's pattern: contractions, letters, numbers, other symbols, and its whitespace rules
# (a run of spaces leaves its last space to prefix the next word).
PRETOKENIZE = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
ENDOFTEXT = "<|endoftext|>"
_CACHE_LIMIT = 200_000  # pieces remembered; the cache is emptied past it
# Longer pieces are not remembered: rare in real text (a run of indentation, a hash), they would
# let a client fill the cache with megabyte-long words, one per request. So it holds ~250 MiB at
# worst (32 four-byte characters a piece, a token per byte), ~35 MiB of ordinary text's pieces.
_CACHED_PIECE = 32
# GPT-2's vocab.json + merges.txt, which every GPT-Neo model uses, shipped with the package so
# that a weight folder without tokenizer files can still be run (provenance in SOURCE.md).
BUNDLED_GPT2 = Path(__file__).resolve().parent / "data" / "gpt2"
GPT2_VOCAB_SIZE = 50257


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (no whitespace or controls)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class Tokenizer:
    """encode(text) -> ids and decode(ids) -> text, exactly as GPT2TokenizerFast does."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[str],
                 special_tokens: Iterable[str] = (ENDOFTEXT,), added_tokens: Iterable[str] = (),
                 add_prefix_space: bool = False):
        """special_tokens and added_tokens (not special) are matched whole in the text before
        it is split into pieces; allow_special=False leaves only the added ones, as Hugging Face
        does with split_special_tokens. add_prefix_space: each run of text between them that
        does not start with a space is encoded as if it did (a ByteLevel pre-tokenizer's option)."""
        self.encoder = dict(vocab)
        self.add_prefix_space = add_prefix_space
        # merge "a b" (symbols a and b, which never hold a space: the byte alphabet maps it to
        # "Ġ") -> its rank; a later duplicate's rank wins
        self.ranks = dict(zip(merges, range(len(merges))))
        self.special = {tok: self.encoder[tok] for tok in special_tokens if tok in self.encoder}
        added = [tok for tok in added_tokens if tok in self.encoder]
        self._splitters = {True: _splitter([*self.special, *added]), False: _splitter(added)}  # by allow_special
        self.vocab_size = max(self.encoder.values()) + 1 if self.encoder else 0
        self._to_unicode = str.maketrans({b: ch for b, ch in bytes_to_unicode().items()})
        self._cache: dict[str, list[int]] = {}
        self.source: Path | None = None  # the folder or file it was read from

    @cached_property
    def id_to_bytes(self) -> list[bytes]:
        """Each id's bytes, made on the first decode: a model that only encodes (scoring) or
        has not decoded yet does not pay for it at load. An id the vocabulary skips (a file
        whose added token sits past a gap) has none, as Hugging Face decodes it to nothing."""
        table = [b""] * self.vocab_size
        # each character of the byte alphabet back to its byte, as a latin-1 character: a
        # translate and an encode per token (character by character took most of a load)
        alphabet = frozenset(bytes_to_unicode().values())
        to_latin1 = str.maketrans({ch: chr(b) for b, ch in bytes_to_unicode().items()})
        for token, i in self.encoder.items():
            if alphabet.issuperset(token):
                table[i] = token.translate(to_latin1).encode("latin-1")
            else:  # a token outside the byte alphabet (an added token): its text
                table[i] = token.encode("utf-8")
        return table

    @cached_property
    def longest_token(self) -> int:
        """The most bytes one token stands for."""
        return max(map(len, self.id_to_bytes), default=1)

    @property
    def bundled(self) -> bool:
        """Whether this is neocore's own copy of the GPT-2 vocabulary."""
        return self.source == BUNDLED_GPT2

    # ---- loading ----------------------------------------------------------------------------
    @staticmethod
    def source_files(folder: Path) -> list[Path]:
        """The files from_dir reads: vocab.json + merges.txt, else tokenizer.json (as transformers
        prefers it to a vocab.json without merges), else the Java port's tokenizer/tokens.map +
        merges.bpe; [] where there are none."""
        folder = Path(folder)
        for names in TOKENIZER_SETS:
            files = [folder / name for name in names]
            if all(path.is_file() for path in files):
                return files
        return []

    @staticmethod
    def files_present(folder: Path) -> bool:
        """Whether the folder has a tokenizer of its own; a TokenizerError where it holds some
        of the files but no whole set (vocab.json without merges.txt, a vocab.json that is a
        folder or a dangling link): a tokenizer that does not load must not pass for none,
        which would have GPT-2's bundled one read in its place."""
        if Tokenizer.source_files(folder):
            return True
        stray = [name for name in TOKENIZER_PATHS if os.path.lexists(Path(folder) / name)]
        if stray:
            raise TokenizerError(f"{folder}: holds {', '.join(stray)} but no whole tokenizer (vocab.json + "
                                 f"merges.txt, or tokenizer.json, as regular files)")
        return False

    @classmethod
    def gpt2(cls) -> "Tokenizer":
        """The GPT-2 tokenizer bundled with neocore (the one every GPT-Neo model uses)."""
        return cls.from_dir(BUNDLED_GPT2)

    @classmethod
    def from_dir(cls, folder: str | Path) -> "Tokenizer":
        """vocab.json + merges.txt, else tokenizer.json, else the Java port's tokenizer/."""
        folder = Path(folder)
        tokenizer = cls._read_dir(folder)
        tokenizer.source = folder
        return tokenizer

    @classmethod
    def _read_dir(cls, folder: Path) -> "Tokenizer":
        files = cls.source_files(folder)
        if len(files) == 2:
            vocab_path, merges_path = files
            text = _read_text(vocab_path).strip()
            if vocab_path.suffix == ".map":  # the vocab JSON without its outer braces
                text = "{" + text + "}"
            vocab = _read_json(vocab_path, text)
            vocab = _check_vocab(vocab, vocab_path)
            return cls(vocab, _parse_merges(merges_path, _read_text(merges_path).splitlines()))
        if files:
            return cls.from_tokenizer_json(files[0])
        raise TokenizerError(f"{folder}: no tokenizer files (looked for vocab.json + merges.txt, "
                             f"tokenizer.json, tokenizer/tokens.map + merges.bpe)")

    @classmethod
    def from_tokenizer_json(cls, path: Path) -> "Tokenizer":
        data = _read_json(path)
        try:
            model = data["model"]
            if model.get("type", "BPE") != "BPE":
                raise TokenizerError(f"{path}: model type {model.get('type')!r} is not BPE")
            vocab = dict(model["vocab"])
            raw_merges = model["merges"]
            lines = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]
            added = data.get("added_tokens", [])
            special = [t["content"] for t in added if t.get("special")]
            plain = [t["content"] for t in added if not t.get("special")]
            for t in added:
                vocab.setdefault(t["content"], t["id"])
            add_prefix_space = _byte_level_prefix_space(path, data.get("pre_tokenizer"))
            if data.get("normalizer") is not None:  # GPT-2's tokenizers have none; others would change ids silently
                raise TokenizerError(f"{path}: has a normalizer ({data['normalizer'].get('type')!r}), "
                                     "which neocore does not apply; GPT-2's byte-level BPE has none")
        except (KeyError, TypeError, AttributeError):
            raise TokenizerError(f"{path}: not a BPE tokenizer.json") from None
        vocab = _check_vocab(vocab, path)
        tokenizer = cls(vocab, _parse_merges(path, lines), special or (ENDOFTEXT,), plain, add_prefix_space)
        tokenizer.source = path
        return tokenizer

    # ---- encoding ---------------------------------------------------------------------------
    @property
    def eos_id(self) -> int:
        return self.special.get(ENDOFTEXT, self.vocab_size - 1)

    def _bpe(self, piece: str) -> list[int]:
        """The ids of one pre-token: merge the lowest-ranked adjacent pair (the leftmost of
        equals) until none is left, as Hugging Face's tokenizers does. The pairs wait in a heap
        and the symbols form a linked list, so a long piece (a 40,000-letter word in a request)
        costs n log n, not n^2; a heap entry whose pair has changed since is skipped."""
        symbols: list[str | None] = list(piece.encode("utf-8").decode("latin-1").translate(self._to_unicode))
        ranks = self.ranks
        following = list(range(1, len(symbols) + 1))
        following[-1] = -1
        preceding = list(range(-1, len(symbols) - 1))
        heap = [(rank, i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))
                if (rank := ranks.get(a + " " + b)) is not None]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = following[i]
            if symbols[i] is None or j < 0 or ranks.get(symbols[i] + " " + symbols[j]) != rank:
                continue
            symbols[i] += symbols[j]
            symbols[j] = None
            k = following[i] = following[j]
            if k >= 0:
                preceding[k] = i
                if (rank := ranks.get(symbols[i] + " " + symbols[k])) is not None:
                    heapq.heappush(heap, (rank, i))
            h = preceding[i]
            if h >= 0 and (rank := ranks.get(symbols[h] + " " + symbols[i])) is not None:
                heapq.heappush(heap, (rank, h))
        try:
            return [self.encoder[s] for s in symbols if s is not None]
        except KeyError as exc:
            raise TokenizerError(f"symbol {exc.args[0]!r} is not in the vocabulary") from None

    def _encode_ordinary(self, text: str, ids: list[int]) -> None:
        if self.add_prefix_space and text and not text.startswith(" "):  # no text, no space
            text = " " + text
        cache = self._cache
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        for piece in PRETOKENIZE.findall(text):
            found = cache.get(piece)
            if found is None:
                try:
                    found = self._bpe(piece)
                except UnicodeEncodeError as exc:  # a lone surrogate has no UTF-8 bytes
                    raise TokenizerError(_surrogate_message(ord(exc.object[exc.start]))) from None
                if len(piece) <= _CACHED_PIECE:
                    cache[piece] = found
            ids.extend(found)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of text. '<|endoftext|>' becomes its single special id, as Hugging Face
        does by default; allow_special=False encodes it as plain text instead. A tokenizer.json's
        added tokens that are not special stay single ids either way, as in Hugging Face."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        ids: list[int] = []
        splitter = self._splitters[bool(allow_special)]
        if splitter is None:
            self._encode_ordinary(text, ids)
            return ids
        for i, part in enumerate(splitter.split(text)):
            if i % 2:
                ids.append(self.encoder[part])
            elif part:
                self._encode_ordinary(part, ids)
        return ids

    def encode_batch(self, texts: Iterable[str], allow_special: bool = True) -> list[list[int]]:
        return [self.encode(t, allow_special) for t in texts]

    # ---- decoding ---------------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one id: an int or a NumPy integer, not a float or a string that would
        round or parse to one."""
        index = token_id if type(token_id) is int else _as_id(token_id)  # an int: at once (decode's loop)
        if not 0 <= index < self.vocab_size:
            raise TokenizerError(f"token id {index} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self.id_to_bytes[index]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids (a sequence or 1-D array of them); byte sequences that are not valid
        UTF-8 become U+FFFD, as in Hugging Face."""
        if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, Iterable) \
                or getattr(ids, "ndim", 1) != 1:  # a 0-d array is Iterable but cannot be iterated
            raise TokenizerError(f"decode takes a sequence of token ids, got {type(ids).__name__}")
        return b"".join(map(self.token_bytes, ids)).decode("utf-8", errors="replace")

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Takes ids one at a time and returns only complete characters, holding back a partial
    multi-byte sequence (an emoji often spans several tokens). The concatenation of what it
    returns, flush() included, equals Tokenizer.decode of all the ids."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is held back, as replacement characters if it never completed."""
        return self._utf8.decode(b"", final=True)


def _splitter(tokens: Iterable[str]) -> regex.Pattern | None:
    """A pattern whose split() isolates each of tokens, or None for none. Longest first: of
    two that start at one place the longer wins ('<|a|>b' over '<|a|>'), as in Hugging Face."""
    ordered = sorted(filter(None, tokens), key=len, reverse=True)  # an empty one would match everywhere
    return regex.compile("(" + "|".join(map(regex.escape, ordered)) + ")") if ordered else None


def _as_id(token_id: object) -> int:
    """token_id as an int, without int()'s conversions (3.7 -> 3, '5' -> 5). A bool is refused:
    True among ids is a mask or a flag passed by mistake, not token 1 (the server refuses
    it in a prompt too)."""
    if not isinstance(token_id, bool):
        try:
            return operator.index(token_id)
        except TypeError:
            pass
    raise TokenizerError(f"token id {shown(token_id)} is not an integer")


def _surrogate_message(code: int) -> str:
    # U+DC80..U+DCFF is how Python reads a byte that is not UTF-8 (argv, stdin: surrogateescape)
    if 0xDC80 <= code <= 0xDCFF:
        return f"the text is not valid UTF-8: it holds the byte 0x{code - 0xDC00:02X}"
    return f"the text is not valid Unicode: it holds a lone surrogate (U+{code:04X})"


TOKENIZER_FILE_LIMIT = 64 << 20  # bytes: GPT-2's tokenizer.json is 1.4 MB


def _read_text(path: Path) -> str:
    return read_small_text(path, TOKENIZER_FILE_LIMIT, TokenizerError)


def _read_json(path: Path, text: str | None = None) -> dict:
    return json_object(_read_text(path) if text is None else text, path, TokenizerError, "not valid JSON")


def _byte_level_prefix_space(path: Path, pre_tokenizer: Any) -> bool:
    """add_prefix_space of a tokenizer.json's pre-tokenizer, which must be GPT-2's ByteLevel
    (alone or as the one step of a Sequence): another one would split text differently."""
    steps = pre_tokenizer.get("pretokenizers") if isinstance(pre_tokenizer, dict) and \
        pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    if pre_tokenizer is None or len(steps) != 1 or not isinstance(steps[0], dict) \
            or steps[0].get("type") != "ByteLevel" or steps[0].get("use_regex", True) is not True:
        kind = pre_tokenizer.get("type") if isinstance(pre_tokenizer, dict) else pre_tokenizer
        raise TokenizerError(f"{path}: its pre-tokenizer ({kind!r}) is not GPT-2's ByteLevel, the only one neocore "
                             "applies")
    return steps[0].get("add_prefix_space", False) is True


def _check_vocab(vocab: dict, path: Path) -> dict[str, int]:
    # by exact type (bool is an int subclass), in C loops: a Python one took a tenth of a load
    if not vocab or set(map(type, vocab)) != {str} or set(map(type, vocab.values())) != {int} \
            or min(vocab.values()) < 0:
        raise TokenizerError(f"{path}: the vocabulary must map token strings to ids >= 0")
    # ids number the entries (GPT-2's 50257 are 0..50256): a stray huge id would size every
    # table indexed by id
    if max(vocab.values()) >= 2 * len(vocab):
        raise TokenizerError(f"{path}: token id {max(vocab.values())} is far past the {len(vocab)} "
                             f"entries of the vocabulary")
    return vocab


def _parse_merges(path: Path, lines: Sequence[str]) -> list[str]:
    """The merges as their lines, "a b" for the pair a, b: kept whole, since splitting 50,000
    of them into pairs at every load was most of a load's time."""
    merges = list(filterfalse(operator.methodcaller("startswith", "#version"), filter(None, lines)))
    if set(map(operator.methodcaller("count", " "), merges)) - {1}:  # a line of one symbol, or of three
        number, line = next((n, line) for n, line in enumerate(lines, 1)
                            if line and not line.startswith("#version") and line.count(" ") != 1)
        raise TokenizerError(f"{path}: line {number} is not a merge of two symbols: {line!r}")
    return merges
