"""Checkpoint formats, dtypes, and the broken or hostile files that must fail cleanly."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # none for Python 3.9: skipped there (conftest: an error in CI)
from safetensors.torch import load_file, save_file  # noqa: E402 - it imports torch

import neocore
from neocore.convert import convert

IDS = [5, 17, 900, 3, 44, 1002, 7, 0, 61, 250, 8, 9, 10, 11]


@pytest.fixture(scope="module")
def odd(reference_models):
    return reference_models("odd")


@pytest.fixture(scope="module")
def baseline(odd):
    return {dt: neocore.load(odd.folder, dtype=dt).logits(IDS) for dt in ("bfloat16", "float32")}


def copy_config(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bin_with_real_style_buffers_equals_safetensors(odd, baseline, write_bin, tmp_path, dtype):
    folder = write_bin(odd.torch_model, tmp_path / "bin")
    with zipfile.ZipFile(folder / "pytorch_model.bin") as zf:  # really carries the extras
        assert any(n.endswith("data.pkl") for n in zf.namelist())
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert "transformer.h.0.attn.attention.bias" in state and "lm_head.weight" in state
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    assert np.array_equal(neocore.load(folder, dtype=dtype).logits(IDS), baseline[dtype])


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_half_precision_checkpoints_load(odd, baseline, tmp_path, stored, dtype):
    """The fixture's weights are exact in fp16 and bf16, so the logits must not change at all."""
    state = {k: v.to(stored).contiguous() for k, v in odd.state_dict().items() if k != "lm_head.weight"}
    folder = copy_config(odd.folder, tmp_path / str(stored))
    save_file(state, folder / "model.safetensors")
    assert np.array_equal(neocore.load(folder, dtype=dtype).logits(IDS), baseline[dtype])
    bin_folder = tmp_path / f"{stored}-bin"
    bin_folder.mkdir()
    torch.save(state, bin_folder / "pytorch_model.bin")
    copy_config(odd.folder, bin_folder)
    assert np.array_equal(neocore.load(bin_folder, dtype=dtype).logits(IDS), baseline[dtype])


def test_sharded_checkpoints(odd, baseline, tmp_path):
    st = tmp_path / "sharded-st"
    odd.torch_model.save_pretrained(st, safe_serialization=True, max_shard_size="20KB")
    assert (st / "model.safetensors.index.json").is_file() and not (st / "model.safetensors").exists()
    assert np.array_equal(neocore.load(st).logits(IDS), baseline["bfloat16"])

    state = {k: v for k, v in odd.state_dict().items() if k != "lm_head.weight"}
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    pt = copy_config(odd.folder, tmp_path / "sharded-bin")
    weight_map = {}
    for shard, keys in shards.items():
        torch.save({k: state[k] for k in keys}, pt / shard)
        weight_map.update({k: shard for k in keys})
    (pt / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert np.array_equal(neocore.load(pt).logits(IDS), baseline["bfloat16"])

    os.remove(pt / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(neocore.CheckpointError, match="pytorch_model-00002-of-00002.bin.*missing"):
        neocore.load(pt)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval"])
def test_pickle_that_runs_code_is_refused(odd, tmp_path, payload):
    marker = tmp_path / "pwned"
    state = {k: v for k, v in odd.state_dict().items() if k != "lm_head.weight"}
    if payload == "os.system":
        state["transformer.h.0.ln_1.weight"] = _RunsCode(marker)
    else:
        class Eval:
            def __reduce__(self):
                return eval, (f"open({str(marker)!r}, 'w')",)
        state["evil"] = Eval()
    folder = copy_config(odd.folder, tmp_path / "evil")
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(neocore.CheckpointError, match=r"pytorch_model\.bin.*refused to load (posix|os|builtins|__builtin__)\.(system|eval)"):
        neocore.load(folder)
    assert not marker.exists(), "the pickle's code ran"


def _pickle_of(path: Path) -> bytes:
    with zipfile.ZipFile(path) as zf:
        return zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bin_of_parameters_loads(odd, baseline, tmp_path, dtype):
    """torch.save(dict(model.named_parameters())) pickles Parameters, as torch.load(weights_only=True) accepts."""
    folder = copy_config(odd.folder, tmp_path / "params")
    torch.save(dict(odd.torch_model.named_parameters()), folder / "pytorch_model.bin")
    assert b"_rebuild_parameter\n" in _pickle_of(folder / "pytorch_model.bin")
    assert isinstance(next(iter(torch.load(folder / "pytorch_model.bin", weights_only=True).values())),
                      torch.nn.Parameter)
    assert np.array_equal(neocore.load(folder, dtype=dtype).logits(IDS), baseline[dtype])


def test_parameter_with_state(odd, baseline, tmp_path, monkeypatch):
    """_rebuild_parameter_with_state loads when its state is empty; attributes are refused."""
    def with_empty_state(self, proto):
        return torch._utils._rebuild_parameter_with_state, (self.data, self.requires_grad, OrderedDict(), {})

    params = dict(odd.torch_model.named_parameters())
    folder = copy_config(odd.folder, tmp_path / "state")
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.Parameter, "__reduce_ex__", with_empty_state)
        torch.save(params, folder / "pytorch_model.bin")
    assert b"_rebuild_parameter_with_state" in _pickle_of(folder / "pytorch_model.bin")
    torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert np.array_equal(neocore.load(folder).logits(IDS), baseline["bfloat16"])

    tagged = torch.nn.Parameter(params["transformer.wpe.weight"].detach().clone())
    tagged.note = "an attribute"
    torch.save({**params, "transformer.wpe.weight": tagged}, folder / "pytorch_model.bin")
    assert b"_rebuild_parameter_with_state" in _pickle_of(folder / "pytorch_model.bin")
    with pytest.raises(neocore.CheckpointError, match=r"pytorch_model\.bin: a Parameter carrying hooks or attributes"):
        neocore.load(folder)


def test_plain_pickle_in_place_of_a_checkpoint_is_refused(odd, tmp_path):
    folder = copy_config(odd.folder, tmp_path / "plain")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(neocore.CheckpointError, match="pytorch_model.bin.*not a readable zip"):
        neocore.load(folder)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_file_is_a_clear_error(odd, write_bin, tmp_path, fmt):
    if fmt == "safetensors":
        folder = copy_config(odd.folder, tmp_path / "st")
        shutil.copy(odd.folder / "model.safetensors", folder / "model.safetensors")
        target = folder / "model.safetensors"
    else:
        folder = write_bin(odd.torch_model, tmp_path / "bin")
        target = folder / "pytorch_model.bin"
    data = target.read_bytes()
    for keep in (len(data) // 2, 5):
        target.write_bytes(data[:keep])
        with pytest.raises(neocore.CheckpointError, match=f"{target.name}.*(truncated|not a readable zip)"):
            neocore.load(folder)


def _edited_safetensors(odd, tmp_path, edit) -> Path:
    state = {k: v.clone() for k, v in load_file(odd.folder / "model.safetensors").items()}
    edit(state)
    folder = copy_config(odd.folder, tmp_path / "edited")
    save_file(state, folder / "model.safetensors")
    return folder


def test_missing_tensor(odd, tmp_path):
    folder = _edited_safetensors(odd, tmp_path, lambda s: s.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(neocore.CheckpointError, match=r"model\.safetensors.*transformer\.h\.1\.mlp\.c_fc\.bias.*missing"):
        neocore.load(folder)


def test_wrong_shape(odd, tmp_path):
    def edit(s):
        s["transformer.h.2.attn.attention.q_proj.weight"] = torch.zeros(36, 35)
    folder = _edited_safetensors(odd, tmp_path, edit)
    with pytest.raises(neocore.CheckpointError, match=r"q_proj\.weight.*shape \[36, 35\], expected \[36, 36\]"):
        neocore.load(folder)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type is 'gpt2'"),
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"num_heads": 5}, "hidden_size 36 is not divisible by num_heads 5"),
    ({"attention_types": [[["global"], 2]]}, "attention_types describe 2 layers, but num_layers is 3"),
    ({"attention_types": [[["sparse"], 3]]}, "unknown attention type\\(s\\) \\[.sparse.\\]"),
    ({"hidden_size": "36"}, "hidden_size must be an integer"),
    ({"num_layers": 10 ** 9}, "num_layers is 1000000000; neocore runs at most 4096"),
    ({"attention_types": [["global", 3]]}, "attention_types must look like"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings is False; neocore runs GPT-Neo with its lm_head tied"),
    ({"eos_token_id": [None]}, "eos_token_id must be a token id \\(an integer >= 0\\), a list of them or null"),
    ({"eos_token_id": [3, "x"]}, "eos_token_id must be a token id"),
    ({"bos_token_id": [1]}, "bos_token_id must be a token id \\(an integer >= 0\\) or null, got \\[1\\]"),
])
def test_bad_config(odd, tmp_path, change, message):
    folder = tmp_path / "cfg"
    folder.mkdir()
    shutil.copy(odd.folder / "model.safetensors", folder / "model.safetensors")
    config = json.loads((odd.folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(neocore.ConfigError, match=f"config.json: {message}"):
        neocore.load(folder)


def test_a_config_with_fewer_blocks_than_the_weights_is_refused(odd, tmp_path):
    """Read as such a config says, the model would run without the blocks past it and say
    nothing (transformers reports them as unexpected); load and convert refuse it."""
    folder = tmp_path / "cfg"
    folder.mkdir()
    shutil.copy(odd.folder / "model.safetensors", folder / "model.safetensors")
    config = json.loads((odd.folder / "config.json").read_text())
    config.update(num_layers=2, attention_types=[[["local", "global"], 1]], attention_layers=["local", "global"])
    (folder / "config.json").write_text(json.dumps(config))
    message = r"holds 'transformer\.h\.2\.[a-z_.]+', a tensor of a block past num_layers = 2"
    with pytest.raises(neocore.CheckpointError, match=message):
        neocore.load(folder)
    with pytest.raises(neocore.CheckpointError, match=message):
        convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_files(odd, tmp_path):
    with pytest.raises(neocore.ModelNotFoundError, match="no such model folder"):
        neocore.load(tmp_path / "nowhere")
    folder = copy_config(odd.folder, tmp_path / "noweights")
    with pytest.raises(neocore.CheckpointError, match="no weights found.*model.safetensors"):
        neocore.load(folder)
    no_config = tmp_path / "noconfig"
    no_config.mkdir()
    shutil.copy(odd.folder / "model.safetensors", no_config / "model.safetensors")
    with pytest.raises(neocore.ConfigError, match="config.json: no such file"):
        neocore.load(no_config)
    (no_config / "config.json").write_text("{not json")
    with pytest.raises(neocore.ConfigError, match="not a readable JSON"):
        neocore.load(no_config)


def test_rounding_is_reported_once(odd, tmp_path, caplog):
    def perturb(s):
        for k in ("transformer.h.0.mlp.c_fc.weight", "transformer.wte.weight"):
            s[k] = s[k] + 1e-3 * torch.rand_like(s[k])
    folder = _edited_safetensors(odd, tmp_path, perturb)
    with caplog.at_level("WARNING", logger="neocore"):
        neocore.load(folder)
        neocore.load(folder, dtype="float32")  # exact weights: nothing to report
    warnings = [r for r in caplog.records if "rounded" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].getMessage().startswith("2 weight tensor(s)")


def test_loading_fp32_peaks_below_the_file_size(reference_models):
    """Converted tensor by tensor, each mapped region let go: never the whole model twice."""
    ref = reference_models("gpt-neo-125M")
    weights = ref.folder / "model.safetensors"
    # VmHWM is this process image's own peak (ru_maxrss would carry pytest's over the exec)
    code = ("import neocore, sys; m = neocore.load(sys.argv[1]); status = open('/proc/self/status').read();"
            "print(int(status.split('VmHWM:')[1].split()[0]) * 1024)")
    peak = int(subprocess.run([sys.executable, "-c", code, str(ref.folder)], check=True,
                              capture_output=True, text=True).stdout)
    assert peak < weights.stat().st_size, f"peak RSS {peak >> 20} MiB vs file {weights.stat().st_size >> 20} MiB"


# ---- hand-made pickles: what torch.save never writes, found by a fuzz -------------------------
def _text(s: str) -> bytes:
    b = s.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(b)]) + b


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _int(i: int) -> bytes:
    return pickle.BININT + i.to_bytes(4, "little", signed=True)


def _tensor(key: str = "0", offset: int = 0, numel: int = 4, raw_key: bytes | None = None,
            stride: bytes | None = None, size: bytes | None = None) -> bytes:
    """_rebuild_tensor_v2 of a float storage `key`: numel values from offset, 1-D (raw_key,
    stride and size: the pickled objects to give instead)."""
    storage = pickle.MARK + _text("storage") + _global("torch", "FloatStorage") + (raw_key or _text(key)) \
        + _text("cpu") + _int(numel) + pickle.TUPLE + pickle.BINPERSID
    size = size or pickle.MARK + _int(numel - max(offset, 0)) + pickle.TUPLE
    return _global("torch._utils", "_rebuild_tensor_v2") + pickle.MARK + storage + _int(offset) \
        + size + (stride or pickle.MARK + _int(1) + pickle.TUPLE) \
        + pickle.NEWFALSE + _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE \
        + pickle.TUPLE + pickle.REDUCE


def _dag(levels: int) -> bytes:
    """A tuple whose every level holds the one below twice: a few bytes a level, 2^levels nodes
    to hash, print or compare."""
    put, get = pickle.BINPUT + b"\x00" + pickle.POP, pickle.BINGET + b"\x00"
    return _int(1) + put + (get + get + pickle.TUPLE2 + put) * levels + get


def _state_dict(value: bytes) -> bytes:
    return pickle.PROTO + b"\x02" + _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE \
        + _text("transformer.wte.weight") + value + pickle.SETITEM + pickle.STOP


def _write_bin(folder: Path, data_pkl: bytes, compress_pickle: bool = False) -> Path:
    folder.mkdir()
    with zipfile.ZipFile(folder / "pytorch_model.bin", "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl, zipfile.ZIP_DEFLATED if compress_pickle else zipfile.ZIP_STORED)
        zf.writestr("archive/byteorder", b"little")
        zf.writestr("archive/data/0", np.arange(4, dtype=np.float32).tobytes())
    return folder


def test_the_hand_made_pickle_is_read_as_torch_writes_it(tmp_path):
    from neocore.checkpoint import read_torch_zip
    folder = _write_bin(tmp_path / "good", _state_dict(_tensor()))
    ref = read_torch_zip(folder / "pytorch_model.bin")["transformer.wte.weight"]
    assert ref.shape == (4,) and ref.dtype == "F32"


HOSTILE_PICKLES = {
    # BUILD would repoint the tensor at another file, or before its storage
    "build": (_state_dict(_tensor() + pickle.EMPTY_DICT + _text("offset") + _int(0) + pickle.SETITEM + pickle.BUILD),
              "rewrites a tensor's or a storage's fields"),
    "negative offset": (_state_dict(_tensor(offset=-100)), "offset, size or stride is not what torch writes"),
    "negative numel": (_state_dict(_tensor(numel=-4)), "unexpected persistent id"),
    "key with a path": (_state_dict(_tensor(key="../../etc/hostname")), "is not a plain file name"),
    # a 60-level tuple whose every level holds the one below twice: its repr has 2^60 characters
    "endless repr": (pickle.PROTO + b"\x02" + _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE
                     + pickle.REDUCE + _text("w") + _dag(60) + pickle.BINPERSID + pickle.SETITEM + pickle.STOP,
                     "unexpected persistent id \\(a tuple\\)"),
    # hashed as a dict key, such a tuple took for ever, in C, deaf to Ctrl-C and SIGTERM
    "key hashed for ever": (pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + _dag(80) + _int(0) + pickle.SETITEM
                            + pickle.STOP, "a dict key or set element of type tuple holding containers"),
    "keys hashed for ever": (pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.MARK + _dag(80) + _int(0)
                             + pickle.SETITEMS + pickle.STOP, "a dict key or set element of type tuple holding containers"),
    "set hashed for ever": (pickle.PROTO + b"\x04" + pickle.MARK + _dag(80) + pickle.FROZENSET + pickle.STOP,
                            "a dict key or set element of type tuple holding containers"),
    "ordered dict of pairs": (pickle.PROTO + b"\x02" + _global("collections", "OrderedDict") + pickle.MARK
                              + pickle.MARK + pickle.MARK + _dag(80) + _int(0) + pickle.TUPLE + pickle.LIST
                              + pickle.TUPLE + pickle.REDUCE + pickle.STOP, "made with items"),
    # printed in a message, such a tuple never ended
    "storage key printed for ever": (_state_dict(_tensor(raw_key=_dag(80))), "storage key of type tuple"),
    "stride printed for ever": (_state_dict(_tensor(stride=_dag(80))), "size or stride is not what torch writes"),
    # 400,000 dimensions: their partial products took 10 GB
    "dimensions": (_state_dict(_tensor(size=pickle.MARK + _int(1) * 9 + pickle.TUPLE)),
                   "size or stride is not what torch writes"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_PICKLES))
def test_hostile_pickles_are_refused_in_one_line(tmp_path, case):
    """In a process of its own, killed past a minute: a pickle that is hashed for ever does
    not return, nor take a signal Python could turn into an exception."""
    data, message = HOSTILE_PICKLES[case]
    folder = _write_bin(tmp_path / "hostile", data)
    read = subprocess.run([sys.executable, "-c", "import sys, neocore.checkpoint as c\n"
                           "try:\n    c.read_torch_zip(c.Path(sys.argv[1]))\n"
                           "except c.CheckpointError as exc:\n    print(exc)\n", str(folder / "pytorch_model.bin")],
                          capture_output=True, text=True, timeout=60)
    assert read.returncode == 0 and read.stderr == "", read.stderr
    assert re.search(message, read.stdout) and read.stdout.count("\n") == 1, read.stdout


def test_a_zip_bomb_is_not_inflated(tmp_path):
    from neocore.checkpoint import read_torch_zip
    bomb = _state_dict(_tensor())[:-1] + b"\x00" * (80 << 20) + pickle.STOP  # 80 MB of zeros, ~80 kB stored
    folder = _write_bin(tmp_path / "bomb", bomb, compress_pickle=True)
    assert (folder / "pytorch_model.bin").stat().st_size < 1 << 20
    with pytest.raises(neocore.CheckpointError, match="would inflate to"):
        read_torch_zip(folder / "pytorch_model.bin")


@pytest.mark.parametrize("shard", ["../elsewhere/model.safetensors", "/tmp/model.safetensors", 7])
def test_an_index_naming_files_outside_the_folder_is_refused(odd, tmp_path, shard):
    folder = copy_config(odd.folder, tmp_path / "index")
    names = load_file(str(odd.folder / "model.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    with pytest.raises(neocore.CheckpointError, match="is not a file name in the model folder"):
        neocore.load(folder)


def test_attention_types_are_counted_before_they_are_built(odd, tmp_path):
    folder = tmp_path / "cfg"
    folder.mkdir()
    shutil.copy(odd.folder / "model.safetensors", folder / "model.safetensors")
    config = json.loads((odd.folder / "config.json").read_text())
    config["attention_types"] = [[["global"], 10 ** 18]]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(neocore.ConfigError, match="attention_types describe 1000000000000000000 layers, but num_layers is 3"):
        neocore.load(folder)


def test_json_nested_past_the_recursion_limit_is_a_one_line_error(odd, tmp_path):
    deep = b"[" * 100_000 + b"]" * 100_000
    folder = tmp_path / "deep"
    folder.mkdir()
    (folder / "config.json").write_bytes(deep)
    shutil.copy(odd.folder / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(neocore.ConfigError, match="config.json: not a readable JSON file \\(nested too deeply\\)"):
        neocore.load(folder)
    shutil.copy(odd.folder / "config.json", folder / "config.json")
    (folder / "model.safetensors").write_bytes(len(deep).to_bytes(8, "little") + deep)
    with pytest.raises(neocore.CheckpointError, match="model.safetensors: corrupt safetensors header"):
        neocore.load(folder)
    (folder / "vocab.json").write_bytes(deep)
    (folder / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(neocore.TokenizerError, match="vocab.json: not valid JSON \\(nested too deeply\\)"):
        neocore.Tokenizer.from_dir(folder)


def test_an_integer_too_long_to_read_is_a_config_error(odd, tmp_path):
    folder = copy_config(odd.folder, tmp_path / "long")
    shutil.copy(odd.folder / "model.safetensors", folder)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace('"num_layers": 3', '"num_layers": 1' + "0" * 5000))
    with pytest.raises(neocore.ConfigError, match="config.json: not a readable JSON file"):
        neocore.load(folder)


def test_a_shape_error_blames_the_override_that_caused_it(odd):
    with pytest.raises(neocore.ConfigError, match="^override: hidden_size 36 is not divisible by num_heads 5"):
        neocore.load(odd.folder, num_heads=5)


def with_header(src: Path, dst: Path, change) -> Path:
    """A copy of src (config and model.safetensors) whose safetensors header change(header) edits."""
    folder = copy_config(src, dst)
    data = (src / "model.safetensors").read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    change(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    (folder / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + data[8 + size:])
    return folder


def test_a_big_endian_dtype_is_not_a_safetensors_dtype(odd, tmp_path):
    """F32BE is neocore's name for the Java port's files: in a safetensors header it is refused."""
    name = "transformer.ln_f.weight"

    def big_endian(header):
        assert header[name]["dtype"] == "F32"
        header[name]["dtype"] = "F32BE"

    folder = with_header(odd.folder, tmp_path / "be", big_endian)
    with pytest.raises(neocore.CheckpointError, match=f"tensor '{name}' has unsupported dtype F32BE"):
        neocore.load(folder)


def test_an_unzipped_pickle_too_large_is_refused_unread(odd, tmp_path):
    folder = copy_config(odd.folder, tmp_path / "big")
    (folder / "archive").mkdir()
    with open(folder / "archive" / "data.pkl", "wb") as f:
        f.truncate(8 << 30)  # sparse: 8 GiB on paper, nothing on disk
    with pytest.raises(neocore.CheckpointError, match="data.pkl: 8589934592 bytes, too large"):
        neocore.load(folder)


def test_overlapping_tensors_are_refused(odd, tmp_path):
    def overlap(header):  # two tensors of one shape and dtype on the same bytes
        header["transformer.ln_f.bias"]["data_offsets"] = header["transformer.ln_f.weight"]["data_offsets"]

    folder = with_header(odd.folder, tmp_path / "overlap", overlap)
    with pytest.raises(neocore.CheckpointError, match="overlap"):
        neocore.load(folder)


def _with_header(blob: bytes, change) -> bytes:
    """A safetensors file with change(header) applied to its JSON header (as text)."""
    length = int.from_bytes(blob[:8], "little")
    header = change(blob[8:8 + length].decode()).encode()
    return len(header).to_bytes(8, "little") + header + blob[8 + length:]


@pytest.mark.parametrize("change, message", [
    # millions of dimensions (9 MB of header) once took hours to multiply out
    (lambda h: h.replace('"shape":[', '"shape":[' + "1, " * 2_000_000, 1), "corrupt safetensors entry"),
    (lambda h: h.replace('"shape":[', '"shape":[' + "1, " * 8, 1), "corrupt safetensors entry"),
    # an integer Python will not turn into text: once a raw ValueError with no file named
    (lambda h: h.replace('"data_offsets":[', '"data_offsets":[' + "9" * 5000 + ", ", 1), "corrupt safetensors"),
])
def test_safetensors_headers_past_what_a_weight_has_are_refused_at_once(odd, tmp_path, change, message):
    import time
    folder = copy_config(odd.folder, tmp_path / "header")
    (folder / "model.safetensors").write_bytes(_with_header((odd.folder / "model.safetensors").read_bytes(), change))
    started = time.monotonic()
    with pytest.raises(neocore.CheckpointError, match=message) as info:
        neocore.load(folder)
    assert time.monotonic() - started < 30 and len(str(info.value)) < 400


def test_a_weight_file_that_is_not_a_regular_file_is_named(odd, tmp_path):
    """Not "no weights found": the file is there, and is a folder or a dangling link."""
    folder = copy_config(odd.folder, tmp_path / "dir")
    (folder / "model.safetensors").mkdir()
    with pytest.raises(neocore.CheckpointError, match="model.safetensors: not a regular file, and no other weights"):
        neocore.load(folder)
    folder = copy_config(odd.folder, tmp_path / "shard")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "a.safetensors"}}))
    (folder / "a.safetensors").symlink_to(tmp_path / "nowhere")
    with pytest.raises(neocore.CheckpointError, match="names shard a.safetensors, which is not a regular file"):
        neocore.load(folder)


def test_a_checkpoint_wrapping_its_state_dict_with_plain_values_loads(odd, baseline, tmp_path):
    """Keys and set elements that hash in linear time (scalars, flat tuples) are read: only
    nested ones, which can take for ever, are refused. Beside the file, a name that is a folder
    (another format's name) does not stop the weights that are there from loading."""
    import torch
    folder = copy_config(odd.folder, tmp_path / "wrapped")
    torch.save({"state_dict": odd.torch_model.state_dict(), "tags": {"a", "b"}, ("epoch", 1): 2.5, 0.5: None,
                True: frozenset({1, 2})}, folder / "pytorch_model.bin", pickle_protocol=4)  # sets as opcodes
    (folder / "model.safetensors").mkdir()
    assert np.array_equal(neocore.load(folder, dtype="float32").logits(IDS), baseline["float32"])


def test_tokenizer_files_without_a_whole_tokenizer_are_refused(reference_models, gpt2_tokenizer_dir, tmp_path):
    """Once passed over: the bundled GPT-2 tokenizer was read in their place, and `info` said the
    folder had none. A sparse tokenizer file of gigabytes (no disk) once took as much memory."""
    tiny = reference_models("tiny").folder
    cases = {"vocab.json alone": ["vocab.json"], "merges.txt a folder": ["vocab.json", "merges.txt/"],
             "tokenizer.json too large": ["tokenizer.json+"]}
    for case, names in cases.items():
        folder = copy_config(tiny, tmp_path / case.replace(" ", "_"))
        shutil.copy(tiny / "model.safetensors", folder)
        for name in names:
            if name.endswith("/"):
                (folder / name).mkdir()
            elif name.endswith("+"):
                with open(folder / name[:-1], "wb") as f:
                    f.truncate(65 << 20)  # sparse: past the limit, no disk used
            else:
                shutil.copy(gpt2_tokenizer_dir / name, folder / name)
        message = "too large for a tokenizer.json" if case.endswith("large") else "no whole tokenizer"
        with pytest.raises(neocore.TokenizerError, match=message):
            neocore.load(folder)
