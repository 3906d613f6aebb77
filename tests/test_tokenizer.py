"""The BPE tokenizer against Hugging Face's GPT2TokenizerFast on the real GPT-2 files (the
copy bundled in the package), and how a model finds its tokenizer."""
from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import string
import tracemalloc

import numpy as np
import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GPT2TokenizerFast

import neocore
from neocore import TokenizerError
from neocore.cli import main as cli_main
from neocore.tokenizer import BUNDLED_GPT2, Tokenizer


@pytest.fixture(scope="module")
def ours():
    return neocore.Tokenizer.gpt2()


@pytest.fixture(scope="module")
def hf(gpt2_tokenizer_dir):
    return GPT2TokenizerFast(str(gpt2_tokenizer_dir / "vocab.json"), str(gpt2_tokenizer_dir / "merges.txt"))


def one_megabyte_document() -> str:
    rng = random.Random(0)
    words = ["the", "model", "GPT-Neo", "tokenizer's", "naïve", "café", "1234", "3.14159", "—", "Ελλάδα",
             "日本語", "😀", "x=y+1;", "\t", "  ", "\n\n", "don't", "WE'LL", "Москва", "مرحبا", "नमस्ते"]
    parts = []
    size = 0
    while size < 1_000_000:
        w = rng.choice(words) + rng.choice([" ", " ", "", "\n", "  "])
        parts.append(w)
        size += len(w.encode())
    return "".join(parts)


CORPUS = {
    "prose": "It was the best of times, it was the worst of times; it was the age of wisdom.",
    "code": "def f(x):\n\tif x  >  1:\n\t\treturn x ** 2  # square\n    \n\treturn None\n\n\n",
    "spaces": "a    b\t\t c  \n   \n  d   ",
    "numbers": "1 12 123 1234 12345 3.14159 -42 1e-5 0x1F 1,000,000 2026-11-26",
    "punctuation": "!!! ??? ... --- ((([]))) @#$%^&* \"quoted\" 'single' `tick`",
    "contractions": "it's I'm you're we've they'll he'd can't IT'S I'M YOU'RE WE'VE THEY'LL HE'D 'S 'LL 'd",
    "accents": "naïve café résumé Zürich São Paulo Ångström crème brûlée",
    "cyrillic": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "greek": "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "cjk": "東京は日本の首都です。我爱自然语言处理。한국어 텍스트",
    "arabic": "مرحبا بالعالم، هذا اختبار.",
    "hindi": "नमस्ते दुनिया, यह एक परीक्षण है।",
    "emoji": "😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇯🇵 👩🏿‍💻",
    "combining": "e\u0301 a\u0308 n\u0303 Z\u0351\u0327a\u0362l\u0315g\u0338o",
    "controls": "\x00\x01\x07\x1b[31mred\x1b[0m\x7f\x1c\x1d\x1e\x1f\x85\u2028\u2029\ufeff",
    "crlf": "line one\r\nline two\r\n\r\nend\r\n",
    "trailing": "trailing spaces   \n\t ",
    "empty": "",
    "special": "before<|endoftext|>after <|endoftext|> <|endoftext|><|endoftext|>",
    "unicode spaces": "a\u00a0b\u2003c\u3000d\u200be \u202f f",
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_matches_hugging_face(ours, hf, name):
    text = CORPUS[name]
    ids = ours.encode(text)
    assert ids == hf.encode(text)
    assert ours.decode(ids) == text


def test_one_megabyte_document(ours, hf):
    text = one_megabyte_document()
    ids = ours.encode(text)
    assert ids == hf.encode(text)
    assert ours.decode(ids) == text


def test_long_words_match_hugging_face(ours, hf):
    """One pre-token of 100,000 letters (a hostile request) and long runs of one and two symbols,
    where equal pairs overlap: merged as Hugging Face merges them, in n log n (the pair scan per
    merge this replaced took about two minutes for the first)."""
    rng = random.Random(5)
    for text in ("".join(rng.choices(string.ascii_lowercase, k=100_000)), "a" * 5001, "ab" * 3000,
                 " " + "é" * 2000, "1" * 999, "!?" * 1500):
        assert ours.encode(text) == hf.encode(text)


def test_long_words_are_not_kept_after_encoding(hf):
    """Pieces are cached, but not long ones: the words of a hostile request, refused once
    tokenized, would stay in memory, 1.5 MiB each at the prompt length limit."""
    tokenizer = Tokenizer.gpt2()
    rng = random.Random(3)
    words = ["".join(rng.choices(string.ascii_lowercase, k=20_000)) for _ in range(9)]
    expected = [hf.encode(word) for word in words[1:]]
    tracemalloc.start()
    try:
        tokenizer.encode(words.pop(0))  # fills Python's free lists, which are not freed
        before = tracemalloc.get_traced_memory()[0]
        assert [tokenizer.encode(word) for word in words] == expected
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 100_000, f"{kept} bytes kept for 8 words of 20,000 letters"  # 790 kB when kept


def test_the_tokenizer_s_tables_stay_small():
    """Its merges are kept as merges.txt's own lines: split into pairs of fresh strings they
    took 5 MiB more (18-19 MiB in all)."""
    tracemalloc.start()
    try:
        tokenizer = Tokenizer.gpt2()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 16 * 2 ** 20, f"{held / 2 ** 20:.1f} MiB"
    assert tokenizer.encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("lines, bad", [(["Ġ t", "h e l"], 3), (["Ġ t", "he"], 3), (["Ġ  t"], 2)])
def test_a_merge_that_is_not_two_symbols_is_refused_naming_its_line(gpt2_tokenizer_dir, tmp_path, lines, bad):
    shutil.copy(gpt2_tokenizer_dir / "vocab.json", tmp_path / "vocab.json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=f"merges.txt: line {bad} is not a merge of two symbols"):
        Tokenizer.from_dir(tmp_path)


def test_a_lone_surrogate_is_refused_in_one_line(ours):
    for text in ("\ud800", "ok \udbff then", "\ud83d"):
        with pytest.raises(TokenizerError, match="lone surrogate"):
            ours.encode(text)
    # how Python reads bytes that are not UTF-8 from argv or stdin
    with pytest.raises(TokenizerError, match="not valid UTF-8: it holds the byte 0xFF"):
        ours.encode(b"caf\xff".decode("utf-8", "surrogateescape"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=80))
def test_random_unicode_matches_hugging_face(ours, hf, text):
    ids = ours.encode(text)
    assert ids == hf.encode(text)
    assert ours.decode(ids) == text


def test_special_token_as_plain_text(ours, hf):
    text = "a <|endoftext|> b"
    plain = ours.encode(text, allow_special=False)
    assert 50256 not in plain
    assert plain == hf(text, split_special_tokens=True)["input_ids"]
    assert ours.encode(text) == hf.encode(text) and 50256 in ours.encode(text)


def test_decoding_arbitrary_ids_replaces_invalid_utf8_like_hugging_face(ours, hf):
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 12))]
        assert ours.decode(ids) == hf.decode(ids, clean_up_tokenization_spaces=False)
    assert ours.vocab_size == 50257 and ours.eos_id == 50256


def test_ids_a_vocabulary_skips_decode_to_nothing_as_in_hugging_face(tmp_path, gpt2_tokenizer_dir):
    """A vocab.json whose added token sits past a gap (<|pad|> at 50260: 50257-50259 unused):
    the unused ids have no text, as Hugging Face decodes them; past the vocabulary stays refused."""
    vocab = json.loads((gpt2_tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    (tmp_path / "vocab.json").write_text(json.dumps({**vocab, "<|pad|>": 50260}), encoding="utf-8")
    shutil.copy(gpt2_tokenizer_dir / "merges.txt", tmp_path / "merges.txt")
    ours = neocore.Tokenizer.from_dir(tmp_path)
    hf = GPT2TokenizerFast(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ids = [31373, 50257, 50260, 50259, 995]
    assert ours.decode(ids) == hf.decode(ids, clean_up_tokenization_spaces=False) == "hello<|pad|> world"
    decoder = ours.stream_decoder()
    assert "".join(decoder.add(i) for i in ids) + decoder.flush() == "hello<|pad|> world"
    with pytest.raises(TokenizerError, match=r"token id 50261 is outside the vocabulary \(0\.\.50260\)"):
        ours.decode([50261])


def test_out_of_range_ids_are_refused(ours):
    for bad in (50257, -1, 10**9):
        with pytest.raises(TokenizerError, match="outside the vocabulary"):
            ours.decode([1, bad])


@pytest.mark.parametrize("name", ["emoji", "cjk", "combining", "hindi", "controls"])
def test_stream_decoder_emits_exactly_decode(ours, name):
    ids = ours.encode(CORPUS[name])
    decoder = ours.stream_decoder()
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == ours.decode(ids) == CORPUS[name]
    assert all("\ufffd" not in p for p in pieces), "a partial character was emitted"


def test_decode_takes_integer_ids_only(ours, hf):
    """An id is an int or a NumPy integer (a 1-D array of them too); a float, a string, bytes or
    a bool is refused, not rounded or parsed to some other token, and so is a lone id or str."""
    ids = ours.encode(CORPUS["prose"])
    expected = hf.decode(ids, clean_up_tokenization_spaces=False)
    assert ours.decode(np.array(ids)) == ours.decode([np.int64(i) for i in ids]) == expected
    assert ours.decode(np.array(ids, np.uint16)) == ours.decode(tuple(ids)) == expected
    decoder = ours.stream_decoder()
    assert "".join(decoder.add(np.int32(i)) for i in ids) + decoder.flush() == expected
    for bad in (3.7, "5", b"1", None, float("nan"), "abc", True, np.float32(2.0), np.array([1, 2])):
        with pytest.raises(TokenizerError, match=re.escape(f"token id {bad!r} is not an integer")):
            ours.decode([31373, bad])
        with pytest.raises(TokenizerError, match=re.escape(f"token id {bad!r} is not an integer")):
            ours.stream_decoder().add(bad)
    with pytest.raises(TokenizerError, match=r"token id 70000 is outside the vocabulary \(0\.\.50256\)"):
        ours.decode(np.array([70000]))
    for bad, kind in ((5, "int"), ("hello", "str"), (b"hi", "bytes"), (None, "NoneType"),
                      (np.array([ids[:2]]), "ndarray"), (np.array(5), "ndarray")):  # 2-D, 0-d
        with pytest.raises(TokenizerError, match=f"decode takes a sequence of token ids, got {kind}"):
            ours.decode(bad)


def test_stream_decoder_on_random_ids(ours):
    rng = random.Random(2)
    for _ in range(200):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 10))]
        decoder = ours.stream_decoder()
        assert "".join(decoder.add(i) for i in ids) + decoder.flush() == ours.decode(ids)


def test_encode_batch(ours, hf):
    texts = list(CORPUS.values())
    assert ours.encode_batch(texts) == [hf.encode(t) for t in texts]


def test_tokenizer_json_gives_the_same_ids(ours, hf, tmp_path):
    hf.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    from_json = Tokenizer.from_dir(tmp_path)
    for text in CORPUS.values():
        assert from_json.encode(text) == ours.encode(text)
    assert from_json.eos_id == 50256


def test_added_tokens_of_a_tokenizer_json_match_hugging_face(hf, tmp_path):
    """Added tokens that are not special are matched whole too, allow_special=False or not (as
    Hugging Face's split_special_tokens leaves them), and of two that start at one place the
    longer wins; the truth is Hugging Face's tokenizer read from the same file."""
    backend = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())  # a copy: hf is shared
    backend.add_tokens([tokenizers.AddedToken("<pad>", special=False, normalized=False)])
    backend.add_special_tokens([tokenizers.AddedToken("<|a|>", special=True),
                                tokenizers.AddedToken("<|a|>b", special=True)])
    backend.save(str(tmp_path / "tokenizer.json"))
    reference = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_dir(tmp_path)
    texts = ["x<pad>y", "q<|a|>bz", "<|a|>", "<|a|>b<|a|>", "a <pad> b<|endoftext|>c", "<pad><|a|>b<pad>",
             "<|a|<pad>|>b", "plain text"]
    for text in texts:
        assert ours.encode(text) == reference.encode(text).ids, text
    reference.encode_special_tokens = True  # what split_special_tokens sets
    for text in texts:
        assert ours.encode(text, allow_special=False) == reference.encode(text).ids, text


def test_a_tokenizer_json_that_adds_a_prefix_space_matches_hugging_face(hf, tmp_path):
    """ByteLevel's add_prefix_space: each run of text between special tokens that does not
    start with a space is encoded as if it did; the truth is tokenizers reading the same file."""
    data = json.loads(hf.backend_tokenizer.to_str())
    data["pre_tokenizer"]["add_prefix_space"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    reference = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_dir(tmp_path)
    texts = ["Hello", " Hello", "a<|endoftext|>b", "<|endoftext|>b", "a <|endoftext|> b", "", "\nx",
             *CORPUS.values()]
    for text in texts:
        assert ours.encode(text) == reference.encode(text).ids, text
    reference.encode_special_tokens = True  # allow_special=False: text with no added tokens to split at
    for text in texts:
        assert ours.encode(text, allow_special=False) == reference.encode(text).ids, text
    assert reference.encode("Hello").ids != hf.encode("Hello")  # the option changes ids: the test can fail


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(normalizer={"type": "NFC"}), "has a normalizer ('NFC')"),
    (lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), "pre-tokenizer ('Whitespace') is not GPT-2's ByteLevel"),
    (lambda d: d.update(pre_tokenizer=None), "pre-tokenizer (None) is not GPT-2's ByteLevel"),
    (lambda d: d["pre_tokenizer"].update(use_regex=False), "is not GPT-2's ByteLevel"),
])
def test_a_tokenizer_json_that_splits_text_otherwise_is_refused(hf, tmp_path, edit, message):
    """Ids that would differ from Hugging Face's without a word: refused instead."""
    data = json.loads(hf.backend_tokenizer.to_str())
    edit(data)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match=re.escape(message)):
        Tokenizer.from_dir(tmp_path)


def test_broken_tokenizer_files(gpt2_tokenizer_dir, tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(gpt2_tokenizer_dir / "merges.txt", tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError, match="vocab.json: expected a JSON object"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 1' + "0" * 5000 + "}")  # past the digits Python converts
    with pytest.raises(TokenizerError, match="vocab.json: not valid JSON .Exceeds the limit"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0, "b": 1}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(TokenizerError, match="line 2 is not a merge"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n\nab\n")
    with pytest.raises(TokenizerError, match="line 4 is not a merge"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "merges.txt").write_text("a b\n")
    for values in ("0, \"b\": -1", "true, \"b\": 1", "0, \"b\": 1.0", "0, \"b\": \"1\""):
        (tmp_path / "vocab.json").write_text('{"a": %s}' % values)
        with pytest.raises(TokenizerError, match="must map token strings to ids >= 0"):
            Tokenizer.from_dir(tmp_path)


def test_an_id_far_past_the_vocabulary_is_refused(hf, gpt2_tokenizer_dir, tmp_path):
    """Ids size the id -> bytes table: one id of 2e9 would allocate gigabytes on the first decode."""
    shutil.copy(gpt2_tokenizer_dir / "merges.txt", tmp_path / "merges.txt")
    vocab = json.loads((gpt2_tokenizer_dir / "vocab.json").read_text())
    (tmp_path / "vocab.json").write_text(json.dumps({**vocab, "zz": 2_000_000_000}))
    with pytest.raises(TokenizerError, match=r"token id 2000000000 is far past the \d+ entries"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").unlink()
    hf.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["added_tokens"].append({"id": 2_000_000_000, "content": "<|qqzz|>", "special": True})
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="far past"):
        Tokenizer.from_dir(tmp_path)


def test_a_tokenizer_json_with_a_non_string_added_token_is_refused(hf, tmp_path):
    hf.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["added_tokens"].append({"id": 50257, "content": 7, "special": False})
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="must map token strings to ids >= 0"):
        Tokenizer.from_dir(tmp_path)


def test_bundled_files_are_the_ones_source_md_records():
    """The shipped bytes are those whose provenance SOURCE.md states, and the license is beside them."""
    recorded = dict(re.findall(r"^\| (\S+) \| \d+ \| ([0-9a-f]{64}) \|$",
                               (BUNDLED_GPT2 / "SOURCE.md").read_text(), re.M))
    assert set(recorded) == {"vocab.json", "merges.txt"}
    for name, digest in recorded.items():
        assert hashlib.sha256((BUNDLED_GPT2 / name).read_bytes()).hexdigest() == digest
    assert "MIT License" in (BUNDLED_GPT2 / "LICENSE").read_text()


def run_info(folder, capsys) -> str:
    assert cli_main(["info", "-m", str(folder)]) == 0
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("tokenizer:"))


def test_a_folder_without_tokenizer_files_uses_the_bundled_one(reference_models, hf, tmp_path, capsys):
    src = reference_models("tiny").folder
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, bare / name)
    model = neocore.load(bare)
    assert model.tokenizer.bundled
    assert model.tokenizer.encode(CORPUS["prose"]) == hf.encode(CORPUS["prose"])
    assert "bundled GPT-2" in run_info(bare, capsys)


def test_a_folder_s_own_tokenizer_files_win(reference_models, tmp_path, capsys):
    """A vocabulary with two ids swapped must be the one used, not the bundled copy."""
    src = reference_models("tiny").folder
    own = tmp_path / "own"
    own.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, own / name)
    vocab = json.loads((BUNDLED_GPT2 / "vocab.json").read_text(encoding="utf-8"))
    vocab["Hello"], vocab["Ġworld"] = vocab["Ġworld"], vocab["Hello"]
    (own / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    shutil.copy(BUNDLED_GPT2 / "merges.txt", own / "merges.txt")
    model = neocore.load(own)
    assert not model.tokenizer.bundled
    assert model.tokenizer.encode("Hello world") == [995, 15496]
    assert Tokenizer.gpt2().encode("Hello world") == [15496, 995]
    assert run_info(own, capsys) == f"tokenizer:       {own}"


def test_a_model_too_small_for_gpt2_ids_gets_no_tokenizer(reference_models, capsys):
    folder = reference_models("odd").folder  # vocab_size 1003, no tokenizer files
    assert neocore.load(folder).tokenizer is None
    assert run_info(folder, capsys).endswith("none found")
