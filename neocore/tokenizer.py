"""GPT-2's byte-level BPE, as GPT-Neo uses it, giving the ids Hugging Face's tokenizer gives.

Text is split by GPT-2's pre-tokenisation pattern; each piece's UTF-8 bytes are mapped to
printable characters (bytes_to_unicode) and merged pair by pair, lowest merge rank first.
Pieces repeat a lot in real text, so each piece's ids are cached."""
from __future__ import annotations

import codecs
import heapq
import json
from functools import cached_property, lru_cache
from itertools import filterfalse, repeat
from operator import methodcaller
from pathlib import Path
from typing import Iterable, Sequence

import regex

from .errors import TokenizerError

# GPT-2's pattern: contractions, letters, numbers, other symbols, and its whitespace rules
# (a run of spaces leaves its last space to prefix the next word).
PRETOKENIZE = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
ENDOFTEXT = "<|endoftext|>"
_CACHE_LIMIT = 200_000  # pieces remembered; the cache is emptied past it
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

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]],
                 special_tokens: Iterable[str] = (ENDOFTEXT,)):
        self.encoder = dict(vocab)
        self.ranks = dict(zip(merges, range(len(merges))))  # a later duplicate's rank wins
        self.special = {tok: self.encoder[tok] for tok in special_tokens if tok in self.encoder}
        self._special_split = regex.compile("(" + "|".join(regex.escape(t) for t in self.special) + ")") \
            if self.special else None
        self.vocab_size = max(self.encoder.values()) + 1 if self.encoder else 0
        self._to_unicode = str.maketrans({b: ch for b, ch in bytes_to_unicode().items()})
        self._cache: dict[str, list[int]] = {}
        self.source: Path | None = None  # the folder or file it was read from

    @cached_property
    def id_to_bytes(self) -> list[bytes | None]:
        """Each id's bytes, made on the first decode: a model that only encodes (scoring) or
        has not decoded yet does not pay for it at load."""
        table: list[bytes | None] = [None] * self.vocab_size
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
        return max((len(b) for b in self.id_to_bytes if b is not None), default=1)

    @property
    def bundled(self) -> bool:
        """Whether this is neocore's own copy of the GPT-2 vocabulary."""
        return self.source == BUNDLED_GPT2

    # ---- loading ----------------------------------------------------------------------------
    @staticmethod
    def _vocab_and_merges(folder: Path) -> tuple[Path, Path] | None:
        """vocab.json + merges.txt, or the Java port's tokenizer/tokens.map + merges.bpe."""
        for vocab, merges in ((folder / "vocab.json", folder / "merges.txt"),
                              (folder / "tokenizer" / "tokens.map", folder / "tokenizer" / "merges.bpe")):
            if vocab.is_file() and merges.is_file():
                return vocab, merges
        return None

    @staticmethod
    def files_present(folder: Path) -> bool:
        folder = Path(folder)
        return Tokenizer._vocab_and_merges(folder) is not None or (folder / "tokenizer.json").is_file()

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
        if (folder / "vocab.json").is_file() or not (folder / "tokenizer.json").is_file():
            pair = cls._vocab_and_merges(folder)
            if pair is not None:
                vocab_path, merges_path = pair
                text = _read_text(vocab_path).strip()
                if vocab_path.suffix == ".map":  # the vocab JSON without its outer braces
                    text = "{" + text + "}"
                vocab = _read_json(vocab_path, text)
                merges = _parse_merges(merges_path, _read_text(merges_path).splitlines())
                return cls(_check_vocab(vocab, vocab_path), merges)
        if (folder / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(folder / "tokenizer.json")
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
            added = [t["content"] for t in data.get("added_tokens", []) if t.get("special")]
            for t in data.get("added_tokens", []):
                vocab.setdefault(t["content"], t["id"])
        except (KeyError, TypeError, AttributeError):
            raise TokenizerError(f"{path}: not a BPE tokenizer.json") from None
        tokenizer = cls(_check_vocab(vocab, path), _parse_merges(path, lines), added or (ENDOFTEXT,))
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
        heap = [(rank, i) for i, pair in enumerate(zip(symbols, symbols[1:]))
                if (rank := ranks.get(pair)) is not None]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = following[i]
            if symbols[i] is None or j < 0 or ranks.get((symbols[i], symbols[j])) != rank:
                continue
            symbols[i] += symbols[j]
            symbols[j] = None
            k = following[i] = following[j]
            if k >= 0:
                preceding[k] = i
                if (rank := ranks.get((symbols[i], symbols[k]))) is not None:
                    heapq.heappush(heap, (rank, i))
            h = preceding[i]
            if h >= 0 and (rank := ranks.get((symbols[h], symbols[i]))) is not None:
                heapq.heappush(heap, (rank, h))
        try:
            return [self.encoder[s] for s in symbols if s is not None]
        except KeyError as exc:
            raise TokenizerError(f"symbol {exc.args[0]!r} is not in the vocabulary") from None

    def _encode_ordinary(self, text: str, ids: list[int]) -> None:
        cache = self._cache
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        for piece in PRETOKENIZE.findall(text):
            found = cache.get(piece)
            if found is None:
                try:
                    found = cache[piece] = self._bpe(piece)
                except UnicodeEncodeError as exc:  # a lone surrogate has no UTF-8 bytes
                    raise TokenizerError(_surrogate_message(ord(exc.object[exc.start]))) from None
            ids.extend(found)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of text. '<|endoftext|>' becomes its single special id, as Hugging Face
        does by default; allow_special=False encodes it as plain text instead."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        ids: list[int] = []
        if not allow_special or self._special_split is None:
            self._encode_ordinary(text, ids)
            return ids
        for i, part in enumerate(self._special_split.split(text)):
            if i % 2:
                ids.append(self.special[part])
            elif part:
                self._encode_ordinary(part, ids)
        return ids

    def encode_batch(self, texts: Iterable[str], allow_special: bool = True) -> list[list[int]]:
        return [self.encode(t, allow_special) for t in texts]

    # ---- decoding ---------------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        if not isinstance(token_id, int) or not 0 <= token_id < self.vocab_size \
                or self.id_to_bytes[token_id] is None:
            raise TokenizerError(f"token id {token_id!r} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self.id_to_bytes[token_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; byte sequences that are not valid UTF-8 become U+FFFD, as in Hugging Face."""
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

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
        return self._utf8.decode(self._tokenizer.token_bytes(int(token_id)))

    def flush(self) -> str:
        """Whatever is held back, as replacement characters if it never completed."""
        return self._utf8.decode(b"", final=True)


def _surrogate_message(code: int) -> str:
    # U+DC80..U+DCFF is how Python reads a byte that is not UTF-8 (argv, stdin: surrogateescape)
    if 0xDC80 <= code <= 0xDCFF:
        return f"the text is not valid UTF-8: it holds the byte 0x{code - 0xDC00:02X}"
    return f"the text is not valid Unicode: it holds a lone surrogate (U+{code:04X})"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot read ({exc})") from None


def _read_json(path: Path, text: str | None = None) -> dict:
    try:
        data = json.loads(_read_text(path) if text is None else text)
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise TokenizerError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


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


def _parse_merges(path: Path, lines: Sequence[str]) -> list[tuple[str, str]]:
    # iterators of C functions only: 50,000 lines at every load
    kept = filterfalse(methodcaller("startswith", "#version"), filter(None, lines))
    merges = list(map(tuple, map(str.split, kept, repeat(" "))))
    if set(map(len, merges)) - {2}:
        number, line = next((n, line) for n, line in enumerate(lines, 1)
                            if line and not line.startswith("#version") and len(line.split(" ")) != 2)
        raise TokenizerError(f"{path}: line {number} is not a merge of two symbols: {line!r}")
    return merges
