"""Every weight format a user may hold gives the same logits as the Hugging Face safetensors
folder; convert writes a standard folder that loads in place, and in transformers too."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from transformers import GPTNeoForCausalLM, GPT2TokenizerFast

import neocore
from neocore.tokenizer import Tokenizer

torch = pytest.importorskip("torch")  # none for Python 3.9: skipped there (conftest: an error in CI)

IDS = [5, 17, 900, 3, 44, 1002, 7, 0, 61, 250, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
DTYPES = ["bfloat16", "float32"]


@pytest.fixture(scope="module")
def tiny(reference_models, gpt2_tokenizer_dir):
    ref = reference_models("tiny")
    return ref, {dt: neocore.load(ref.folder, dtype=dt).logits(IDS) for dt in DTYPES}


def unzip_checkpoint(ref, write_bin, tmp_path: Path) -> Path:
    zipped = write_bin(ref.torch_model, tmp_path / "zipped")
    folder = tmp_path / "unzipped"
    folder.mkdir()
    with zipfile.ZipFile(zipped / "pytorch_model.bin") as zf:
        zf.extractall(folder)
    shutil.copy(zipped / "config.json", folder / "config.json")
    return folder


@pytest.mark.parametrize("dtype", DTYPES)
def test_unzipped_checkpoint_folder(tiny, write_bin, tmp_path, dtype):
    ref, baseline = tiny
    folder = unzip_checkpoint(ref, write_bin, tmp_path)
    assert list(folder.glob("*/data.pkl")) and not (folder / "pytorch_model.bin").exists()
    assert np.array_equal(neocore.load(folder, dtype=dtype).logits(IDS), baseline[dtype])


def test_truncated_storage_file_of_an_unzipped_checkpoint(tiny, write_bin, tmp_path):
    ref, _ = tiny
    folder = unzip_checkpoint(ref, write_bin, tmp_path)
    storage = max((p for p in folder.glob("*/data/*")), key=lambda p: p.stat().st_size)
    storage.write_bytes(storage.read_bytes()[:100])
    with pytest.raises(neocore.CheckpointError, match=f"{storage.name}: truncated"):
        neocore.load(folder)


JAVA_FILES = {  # Hugging Face name in a block -> Java port file in decoderN/
    "ln_1.weight": "att.norm.w", "ln_1.bias": "att.norm.b",
    "attn.attention.q_proj.weight": "att.query.w", "attn.attention.k_proj.weight": "att.key.w",
    "attn.attention.v_proj.weight": "att.value.w", "attn.attention.out_proj.weight": "att.proj.w",
    "attn.attention.out_proj.bias": "att.proj.b", "ln_2.weight": "mlp.norm.w", "ln_2.bias": "mlp.norm.b",
    "mlp.c_fc.weight": "mlp.layer1.w", "mlp.c_fc.bias": "mlp.layer1.b",
    "mlp.c_proj.weight": "mlp.layer2.w", "mlp.c_proj.bias": "mlp.layer2.b",
}


def write_java_port(ref, folder: Path, tokenizer_dir: Path, properties: bool, transposed: bool = True) -> Path:
    """The layout of huplay's GPT-NEO parameter repositories, written independently of neocore;
    matrices [in, out] unless transposed is False (then [out, in], and model.properties says so)."""
    state = {k: v.numpy() for k, v in ref.state_dict().items()}

    def dat(path: Path, array: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(np.ascontiguousarray(array, dtype=">f4").tobytes())

    wte = np.ascontiguousarray(state["transformer.wte.weight"], dtype=">f4").tobytes()
    (folder / "input").mkdir(parents=True)
    third = len(wte) // 3
    for i, piece in enumerate([wte[:third], wte[third:2 * third], wte[2 * third:]], 1):
        (folder / "input" / f"wte.dat.part{i}").write_bytes(piece)
    dat(folder / "input" / "wpe.dat", state["transformer.wpe.weight"])
    layers = ref.config["num_layers"]
    for i in range(layers):
        for name, java in JAVA_FILES.items():
            value = state[f"transformer.h.{i}.{name}"]
            dat(folder / f"decoder{i + 1}" / f"{java}.dat", value.T if value.ndim == 2 and transposed else value)
    dat(folder / "output" / "norm.w.dat", state["transformer.ln_f.weight"])
    dat(folder / "output" / "norm.b.dat", state["transformer.ln_f.bias"])
    (folder / "tokenizer").mkdir()
    vocab = (tokenizer_dir / "vocab.json").read_text(encoding="utf-8").strip()
    (folder / "tokenizer" / "tokens.map").write_text(vocab[1:-1], encoding="utf-8")
    merges = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").split("\n", 1)[1]
    (folder / "tokenizer" / "merges.bpe").write_text(merges, encoding="utf-8")
    if properties:
        kinds = "".join(f"attention.type.{i + 1} = {k}\n" for i, k in enumerate(ref.torch_model.config.attention_layers))
        (folder / "model.properties").write_text(
            f"name = test\ntoken.count = {ref.config['vocab_size']}\nend.of.text.token = {ref.config['vocab_size'] - 1}\n"
            f"max.length = {ref.config['max_position_embeddings']}\nhidden.size = {ref.config['hidden_size']}\n"
            f"feedforward.size = {4 * ref.config['hidden_size']}\ndecoder.count = {layers}\n"
            f"attention.head.count = {ref.config['num_heads']}\n{kinds}epsilon = 1e-5f\n"
            f"attention.local.size = {ref.config['window_size']}\ndata.type = FLOAT32\n"
            f"byte.order = BIG_ENDIAN\nweights.transposed = {str(transposed).lower()}\n")
    return folder


@pytest.mark.parametrize("dtype", DTYPES)
def test_java_port_folder_with_properties(tiny, gpt2_tokenizer_dir, tmp_path, dtype):
    ref, baseline = tiny
    folder = write_java_port(ref, tmp_path / "java", gpt2_tokenizer_dir, properties=True)
    model = neocore.load(folder, dtype=dtype)
    assert np.array_equal(model.logits(IDS), baseline[dtype])
    hf = GPT2TokenizerFast(str(gpt2_tokenizer_dir / "vocab.json"), str(gpt2_tokenizer_dir / "merges.txt"))
    text = "Hello from the Java port's tokenizer folder, naïve café 😀"
    assert model.tokenizer.encode(text) == hf.encode(text)


def test_java_port_folder_shape_from_file_sizes_and_overrides(tiny, gpt2_tokenizer_dir, tmp_path):
    ref, baseline = tiny
    folder = write_java_port(ref, tmp_path / "java", gpt2_tokenizer_dir, properties=False)
    with pytest.raises(neocore.ConfigError, match="num_heads is missing .*num_heads="):
        neocore.load(folder)  # hidden size 64 is no member of the family: heads are not known
    model = neocore.load(folder, num_heads=4, window_size=8)
    assert model.config.hidden_size == 64 and model.config.num_layers == 4
    assert np.array_equal(model.logits(IDS), baseline["bfloat16"])
    (tmp_path / "cfg.json").write_text((ref.folder / "config.json").read_text())
    assert np.array_equal(neocore.load(folder, config=tmp_path / "cfg.json").logits(IDS), baseline["bfloat16"])


def test_java_port_broken_folders(tiny, gpt2_tokenizer_dir, tmp_path):
    ref, _ = tiny
    folder = write_java_port(ref, tmp_path / "java", gpt2_tokenizer_dir, properties=True)
    bad = folder / "decoder3" / "att.key.w.dat"
    good = bad.read_bytes()
    bad.write_bytes(good[:-8])
    with pytest.raises(neocore.CheckpointError, match=r"decoder3/att\.key\.w\.dat: holds \d+ bytes"):
        neocore.load(folder)
    bad.write_bytes(good)
    shutil.rmtree(folder / "decoder2")
    with pytest.raises(neocore.CheckpointError, match="decoder2: decoder folder is missing"):
        neocore.load(folder)


def test_java_port_matrices_stored_untransposed(tiny, gpt2_tokenizer_dir, tmp_path):
    ref, baseline = tiny
    folder = write_java_port(ref, tmp_path / "java", gpt2_tokenizer_dir, properties=True, transposed=False)
    assert np.array_equal(neocore.load(folder).logits(IDS), baseline["bfloat16"])
    props = folder / "model.properties"
    props.write_text(props.read_text().replace("weights.transposed = false", "weights.transposed = maybe"))
    with pytest.raises(neocore.CheckpointError, match="weights.transposed = 'maybe' is neither true nor false"):
        neocore.load(folder)


def test_java_port_hostile_folders_are_refused_without_reading_them(tiny, gpt2_tokenizer_dir, tmp_path):
    ref, _ = tiny
    folder = write_java_port(ref, tmp_path / "java", gpt2_tokenizer_dir, properties=True)
    wte = folder / "input" / "wte.dat.part1"
    first = wte.read_bytes()

    def refused(match: str) -> None:
        with pytest.raises(neocore.CheckpointError, match=match):
            neocore.load(folder)

    wte.unlink()
    wte.symlink_to("/dev/zero")  # reports 0 bytes and never ends
    refused(r"wte\.dat\.part1: not a regular file")
    wte.unlink()
    os.mkfifo(wte)  # reading it would wait for a writer for ever
    refused(r"wte\.dat\.part1: not a regular file")
    wte.unlink()
    wte.write_bytes(first)
    third = folder / "input" / "wte.dat.part3"
    third.rename(folder / "input" / "wte.dat.part4")
    refused(r"wte\.dat\.part3: missing \(found parts \[1, 2, 4\]\)")
    (folder / "input" / "wte.dat.part4").rename(third)
    second = folder / "input" / "wte.dat.part2"
    second_bytes = second.read_bytes()
    second.write_bytes(second_bytes[:-4])
    refused(rf"input/wte\.dat \(3 parts of {len(first)}, {len(second_bytes) - 4}, \d+ bytes\): holds")
    second.write_bytes(second_bytes)
    (folder / "decoder100000000").mkdir()  # one folder, not a hundred million layers
    refused("decoder5: decoder folder is missing .found 5 of decoder1..decoder100000000")
    (folder / "decoder100000000").rmdir()
    (folder / "decoder0").mkdir()  # not a decoder name: ignored like any other folder
    shutil.rmtree(folder / "decoder4")
    refused("decoder.count = 4, but the folder holds decoder1..decoder3")
    props = folder / "model.properties"
    props.write_text(props.read_text().replace("decoder.count = 4", "decoder.count = 3"))
    norm = folder / "decoder1" / "att.norm.w.dat"
    norm.write_bytes(b"")
    refused(r"decoder1/att\.norm\.w\.dat: empty")
    with open(props, "r+b") as f:
        f.truncate(17 << 20)  # sparse: a huge file that costs no disk
    refused("model.properties: 17825792 bytes, more than a model.properties file holds")


def test_unrecognisable_folder_says_what_it_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "weights.npz").write_bytes(b"\0" * 10)
    with pytest.raises(neocore.CheckpointError, match="no weights found.*model.safetensors.*pytorch_model.bin"
                                                      ".*data.pkl.*decoderN"):
        neocore.load(tmp_path)


def test_convert_round_trip(tiny, write_bin, tmp_path):
    ref, baseline = tiny
    src = write_bin(ref.torch_model, tmp_path / "src")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ref.folder / name, src / name)
    dst = tmp_path / "converted"
    proc = subprocess.run([sys.executable, "-m", "neocore", "convert", str(src), str(dst)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    header_len = int.from_bytes((dst / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((dst / "model.safetensors").read_bytes()[8:8 + header_len])
    assert header["transformer.wte.weight"]["dtype"] == "BF16" and "lm_head.weight" not in header
    model = neocore.load(dst, huge_pages=False)
    assert model.matrices_in_place == 2 + 6 * ref.config["num_layers"]  # used straight from the map
    assert np.array_equal(model.logits(IDS), baseline["bfloat16"])
    assert model.tokenizer is not None
    theirs = GPTNeoForCausalLM.from_pretrained(dst, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        their_logits = theirs(torch.tensor([IDS])).logits[0].numpy()
    ref_logits = ref.logits(IDS)
    assert np.abs(their_logits - ref_logits).max() <= 1e-4 * np.abs(ref_logits).max() + 1e-5


def test_convert_never_truncates_its_source_through_a_link(tiny, tmp_path):
    """A destination whose model.safetensors is a hard or symbolic link to the source's file:
    the new file replaces the link, and the source (read while writing) stays whole."""
    ref, baseline = tiny
    from neocore.convert import convert
    src = convert(ref.folder, tmp_path / "src")
    before = (src / "model.safetensors").read_bytes()
    originals = {p.name: p.read_bytes() for p in src.iterdir()}
    for kind in ("hard", "symbolic"):
        dst = tmp_path / kind
        dst.mkdir()
        for name in originals:  # a linked copy of the whole folder, as cp -al / cp -as make
            link = dst / name
            link.hardlink_to(src / name) if kind == "hard" else link.symlink_to(src / name)
        convert(src, dst, num_heads=2)  # an override, so that DST's config.json differs from SRC's
        assert {p.name: p.read_bytes() for p in src.iterdir()} == originals
        assert neocore.load(dst).config.num_heads == 2
    assert not list(tmp_path.rglob("*.partial"))


def test_convert_refuses_a_destination_whose_old_weights_would_win(tiny, tmp_path):
    ref, _ = tiny
    from neocore.convert import convert
    dst = convert(ref.folder, tmp_path / "dst")
    with pytest.raises(neocore.NeocoreError, match="already holds model.safetensors, which neocore would load"):
        convert(ref.folder, dst, dtype="int8")
    convert(ref.folder, dst)  # the same file again is fine: it is replaced


def test_convert_refuses_its_source_by_another_path(tiny, tmp_path):
    """The source named again (a symbolic link), or reached through a bind mount (as a
    case-insensitive file system would reach it): the source's weights would be overwritten."""
    ref, _ = tiny
    from neocore.convert import convert
    src = tmp_path / "src"
    shutil.copytree(ref.folder, src)
    before = (src / "model.safetensors").read_bytes()
    (tmp_path / "link").symlink_to(src)
    view = tmp_path / "view"
    view.mkdir()
    # bind mounts need root, which CI has (it installs Debian packages)
    subprocess.run(["mount", "--bind", str(src), str(view)], check=True, capture_output=True)
    try:
        for dst in (tmp_path / "link", view):
            with pytest.raises(neocore.NeocoreError, match="the destination must differ from the source folder"):
                convert(src, dst)
    finally:
        subprocess.run(["umount", str(view)], check=True)
    assert (src / "model.safetensors").read_bytes() == before


def test_convert_into_a_file_or_an_unwritable_place_is_one_clear_error(tiny, tmp_path):
    ref, _ = tiny
    from neocore.convert import convert
    (tmp_path / "a-file").write_text("")
    with pytest.raises(neocore.NeocoreError, match="exists and is not a folder"):
        convert(ref.folder, tmp_path / "a-file")
    with pytest.raises(neocore.NeocoreError, match="below: one of the folders above it is a file"):
        convert(ref.folder, tmp_path / "a-file" / "below")
    with pytest.raises(neocore.NeocoreError, match="cannot write the converted folder"):
        convert(ref.folder, "/proc/neocore-cannot-write-here")


def test_convert_refuses_empty_folder_names(tiny, tmp_path, monkeypatch):
    ref, _ = tiny
    from neocore.convert import convert
    monkeypatch.chdir(tmp_path)  # "" would otherwise mean this folder
    with pytest.raises(neocore.NeocoreError, match="the destination folder is empty"):
        convert(ref.folder, "")
    with pytest.raises(neocore.NeocoreError, match="the source folder is empty"):
        convert("", tmp_path / "dst")
    assert not list(tmp_path.iterdir())


def test_convert_replaces_the_destinations_old_tokenizer(tiny, gpt2_tokenizer_dir, tmp_path):
    """A source whose tokenizer is a tokenizer.json, converted into a folder that holds another
    model's vocab.json + merges.txt (read first when present): those must not survive."""
    ref, _ = tiny
    src = tmp_path / "src"
    shutil.copytree(ref.folder, src)
    for name in ("vocab.json", "merges.txt"):
        (src / name).unlink(missing_ok=True)
    hf = GPT2TokenizerFast(str(gpt2_tokenizer_dir / "vocab.json"), str(gpt2_tokenizer_dir / "merges.txt"))
    hf.backend_tokenizer.save(str(src / "tokenizer.json"))
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (dst / "merges.txt").write_text("#version: 0.2\na b\n")
    from neocore.convert import convert
    convert(src, dst)
    text = "an old tokenizer must not outlive its model"
    assert Tokenizer.from_dir(dst).encode(text) == hf.encode(text)
    (src / "tokenizer.json").unlink()  # a source with none: the destination's would be read as its own
    with pytest.raises(neocore.TokenizerError, match=f"{dst}: holds tokenizer.json, which neocore would read "
                                                     f"as the converted model's tokenizer, but {src} has none"):
        convert(src, dst)
    assert Tokenizer.from_dir(dst).encode(text) == hf.encode(text)  # refused before anything was written


def test_convert_refuses_a_java_port_tokenizer_a_tokenizerless_source_would_take(tiny, gpt2_tokenizer_dir, tmp_path):
    """Any tokenizer neocore would read in the destination counts (the Java port's tokenizer/
    too); a lone vocab.json, which it would not read, does not stop the convert."""
    ref, _ = tiny
    src = shutil.copytree(ref.folder, tmp_path / "src")
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        (src / name).unlink(missing_ok=True)
    from neocore.convert import convert
    java = tmp_path / "java" / "tokenizer"
    java.mkdir(parents=True)
    (java / "tokens.map").write_text("")
    (java / "merges.bpe").write_text("")
    with pytest.raises(neocore.TokenizerError, match="holds tokenizer/tokens.map, tokenizer/merges.bpe, which "
                                                     "neocore would read"):
        convert(src, tmp_path / "java")
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "vocab.json").write_text("{}")
    convert(src, lone)
    assert neocore.load(lone).tokenizer.bundled


def test_a_convert_that_fails_after_its_weights_leaves_nothing_that_loads(tiny, tmp_path, monkeypatch):
    """The disk filling up while the tokenizer is written: the error names the destination's
    file (also when the source lies below it), and no new weights stay beside a cut vocab.json."""
    ref, _ = tiny
    import errno
    from neocore.convert import convert
    source = shutil.copytree(ref.folder, tmp_path / "parent" / "model")  # for the second case, below
    write_bytes = Path.write_bytes

    def fills_up(path, data):
        if path.name != "vocab.json":
            return write_bytes(path, data)
        write_bytes(path, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", fills_up)
    dst = tmp_path / "new" / "dst"
    with pytest.raises(neocore.NeocoreError, match=f"{dst / 'vocab.json'}: cannot write the converted folder "
                                                   r"\(No space left on device\)"):
        convert(ref.folder, dst)
    assert not (tmp_path / "new").exists()
    with pytest.raises(neocore.NeocoreError, match=f"{tmp_path / 'parent' / 'vocab.json'}: cannot write"):
        convert(source, tmp_path / "parent")  # into its own parent: the error names ours, not the source's
    assert sorted(p.name for p in (tmp_path / "parent").iterdir()) == ["model"]


def test_convert_from_a_folder_of_links_into_the_destination(tiny, tmp_path):
    """A source made of links to the destination's files (cp -as): the small files are read
    before the destination's old ones go, so the new folder keeps its tokenizer and settings."""
    ref, _ = tiny
    from neocore.convert import convert
    dst = shutil.copytree(ref.folder, tmp_path / "dst")
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": [50256, 11], "top_k": 5}))
    src = tmp_path / "src"
    src.mkdir()
    for path in dst.iterdir():
        (src / path.name).symlink_to(path)
    convert(src, dst)
    again = neocore.load(dst)
    assert again.config.eos_token_ids == (50256, 11)
    assert json.loads((dst / "generation_config.json").read_text())["top_k"] == 5
    text = "links into the destination"
    assert again.tokenizer.encode(text) == Tokenizer.from_dir(ref.folder).encode(text)


def test_a_bad_generation_config_is_refused_before_the_weights_are_written(tiny, tmp_path):
    ref, _ = tiny
    from neocore.convert import convert
    src = shutil.copytree(ref.folder, tmp_path / "src")
    (src / "generation_config.json").write_text("[1, 2]")
    read = []
    with pytest.raises(neocore.ConfigError, match="generation_config.json: expected a JSON object"):
        # load would not read it, with eos_token_id given; convert copies it
        convert(src, tmp_path / "dst", progress=lambda done, total: read.append(done), eos_token_id=7)
    assert read == [] and not (tmp_path / "dst").exists()


def test_a_tokenizer_json_beats_a_vocab_json_without_merges(tiny, gpt2_tokenizer_dir, tmp_path):
    """vocab.json without merges.txt beside a tokenizer.json and the Java port's tokenizer/: the
    tokenizer.json is read, as transformers reads it, in the folder and once converted."""
    ref, _ = tiny
    src = shutil.copytree(ref.folder, tmp_path / "src")
    (src / "merges.txt").unlink()
    hf = GPT2TokenizerFast(str(gpt2_tokenizer_dir / "vocab.json"), str(gpt2_tokenizer_dir / "merges.txt"))
    hf.backend_tokenizer.save(str(src / "tokenizer.json"))
    for folder in (src, tmp_path / "dst"):
        (folder / "tokenizer").mkdir(parents=True)
        (folder / "tokenizer" / "tokens.map").write_text('"a": 0')
        (folder / "tokenizer" / "merges.bpe").write_text("")
    from neocore.convert import convert
    convert(src, tmp_path / "dst")
    text = "the file transformers reads"
    for folder in (src, tmp_path / "dst"):
        assert Tokenizer.source_files(folder) == [folder / "tokenizer.json"]
        assert Tokenizer.from_dir(folder).encode(text) == hf.encode(text)


def test_convert_finds_an_unwritable_small_file_before_the_weights(tiny, tmp_path):
    ref, _ = tiny
    from neocore.convert import convert
    for name in ("model.safetensors", "config.json", "vocab.json"):
        dst = tmp_path / name.replace(".", "-")
        (dst / name).mkdir(parents=True)
        with pytest.raises(neocore.NeocoreError, match=f"{name}: is a folder, where the converted model's file goes"):
            convert(ref.folder, dst)
        assert [p.name for p in dst.iterdir()] == [name]  # no weights written
    dst = tmp_path / "partial-is-a-folder"
    (dst / "model.safetensors.partial").mkdir(parents=True)
    with pytest.raises(neocore.NeocoreError, match="model.safetensors.partial: cannot write the converted folder"):
        convert(ref.folder, dst)


def test_convert_checks_the_tokenizer_folder_before_writing(tiny, tmp_path):
    ref, _ = tiny
    from neocore.convert import convert
    (tmp_path / "a-file").write_text("")
    for tokenizer, message in [(tmp_path / "none", "no such folder"), (tmp_path, "no tokenizer files"),
                               (tmp_path / "dst", "is the destination"), (tmp_path / "a-file", "is a file")]:
        (tmp_path / "dst").mkdir(exist_ok=True)
        with pytest.raises(neocore.TokenizerError, match=message):
            convert(ref.folder, tmp_path / "dst", tokenizer=tokenizer)
        assert not (tmp_path / "dst" / "model.safetensors").exists()


def test_convert_a_java_port_folder(tiny, gpt2_tokenizer_dir, tmp_path):
    ref, baseline = tiny
    folder = write_java_port(ref, tmp_path / "java", gpt2_tokenizer_dir, properties=True)
    from neocore.convert import convert
    dst = convert(folder, tmp_path / "converted")
    assert np.array_equal(neocore.load(dst).logits(IDS), baseline["bfloat16"])
    assert Tokenizer.from_dir(dst).encode("a test") == Tokenizer.from_dir(gpt2_tokenizer_dir).encode("a test")
    assert json.loads((dst / "config.json").read_text())["num_heads"] == 4


def test_a_convert_error_names_the_file_it_is_about(tmp_path):
    """Read or write, by the files an OSError names: a rename names two of the convert's own, a
    source file (even one below the destination) is read, a full disk is a write."""
    import errno
    from neocore.convert import _failed_file
    dst, outputs = tmp_path / "dst", ("model.safetensors", "vocab.json")
    dst.mkdir()

    def error(code: int, *names: Path) -> OSError:
        exc = OSError(code, os.strerror(code))
        exc.filename, exc.filename2 = (*(str(name) for name in names), None, None)[:2]
        return exc

    partial, final, source = dst / "model.safetensors.partial", dst / "model.safetensors", dst / "src" / "vocab.json"
    assert _failed_file(error(errno.EACCES, partial, final), dst, outputs) == (partial, True)
    assert _failed_file(error(errno.EACCES, source), dst, outputs) == (source, False)
    assert _failed_file(error(errno.EIO, source, dst / "vocab.json"), dst, outputs) == (source, False)
    assert _failed_file(error(errno.ENOSPC, source, dst / "vocab.json"), dst, outputs) == (dst / "vocab.json", True)
    assert _failed_file(error(errno.ENOSPC), dst, outputs) == (dst, True)
