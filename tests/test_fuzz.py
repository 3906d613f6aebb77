"""A seeded, bounded mutation fuzzer over the files neocore.load reads: model.safetensors,
pytorch_model.bin (a zip holding a pickle) and config.json.

Every mutated folder must either load (and then run a step) or raise a NeocoreError whose one-line
message names the file that is wrong; any other exception is a bug the user would see raw."""
from __future__ import annotations

import io
import json
import os
import random
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import transformers

import neocore

torch = pytest.importorskip("torch")  # none for Python 3.9: skipped there (conftest: an error in CI)

# Values of the wrong type or range, put where a field is expected.
ODD_VALUES = [None, True, -1, 0, 1.5, 2**40, 2**70, "", "F32", "x", [], [1], [[1]], [1, -2], ["F32"],
              {}, {"a": 1}, [0, 2**70], float("nan")]
CONFIG_FIELDS = ["hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size",
                 "max_position_embeddings", "window_size", "attention_types", "attention_layers",
                 "layer_norm_epsilon", "activation_function", "bos_token_id", "eos_token_id", "model_type"]
SAFETENSORS_CASES, BIN_CASES, CONFIG_CASES = 200, 120, 120


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A very small random GPT-Neo in both weight formats (the .bin beside, as pytorch_model.bin)."""
    folder = tmp_path_factory.mktemp("fuzz-base")
    torch.manual_seed(0)
    config = transformers.GPTNeoConfig(vocab_size=48, max_position_embeddings=12, hidden_size=8, num_layers=2,
                                       num_heads=2, attention_types=[[["global", "local"], 1]], window_size=4)
    model = transformers.GPTNeoForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    torch.save(model.state_dict(), folder / "bin")
    return folder


def model_folder(base: Path, dst: Path, weights: str, data: bytes | None = None,
                 config: bytes | None = None) -> Path:
    dst.mkdir()
    (dst / "config.json").write_bytes(config if config is not None else (base / "config.json").read_bytes())
    source = base / ("model.safetensors" if weights == "model.safetensors" else "bin")
    (dst / weights).write_bytes(data if data is not None else source.read_bytes())
    return dst


# Loads each folder (a path per line on stdin) under an address-space limit, so that a
# mutation that makes neocore allocate gigabytes fails the test instead of the machine.
LOADER = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
import neocore
for folder in sys.stdin.read().splitlines():
    try:
        model = neocore.load(folder, threads=1)
        model.logits([0, 1, 2])
        tokens = (model.config.bos_token_id, model.config.eos_token_id)
        outcome = {"loaded": True, "odd tokens": [repr(t) for t in tokens if t is not None and type(t) is not int]}
    except Exception as exc:
        outcome = {"loaded": False, "neocore": isinstance(exc, neocore.NeocoreError),
                   "error": type(exc).__name__, "message": str(exc)}
    print(json.dumps(outcome), flush=True)
""".replace("MEMORY_LIMIT", str(3 << 30))


def check_outcomes(cases: list[tuple[str, Path]], culprits: tuple[str, ...]) -> None:
    """Each (description, folder) must load with integer token ids, or fail with a one-line
    NeocoreError naming one of culprits (a config that disagrees with the weights may be
    reported against the weight file) and saying more than that, without running out of memory."""
    env = {**os.environ, "PYTHONPATH": str(Path(neocore.__file__).parent.parent)}
    proc = subprocess.run([sys.executable, "-c", LOADER], input="\n".join(str(f) for _, f in cases),
                          capture_output=True, text=True, env=env, timeout=300)
    outcomes = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 0 and len(outcomes) == len(cases), \
        f"the loader died after {len(outcomes)} cases ({cases[len(outcomes)][0]}): {proc.stderr[-2000:]}"
    failures = []
    for (what, folder), outcome in zip(cases, outcomes):
        if outcome["loaded"]:
            if outcome["odd tokens"]:
                failures.append(f"{what}: loaded with token ids {outcome['odd tokens']}")
            continue
        message = outcome["message"]
        named = next((name for name in culprits if f"{folder / name}: " in message), None)
        if not outcome["neocore"] or named is None or "\n" in message or "MemoryError" in message \
                or len(message) <= len(str(folder / named)) + 10:
            failures.append(f"{what}: {outcome['error']}: {message[:200]}")
    assert not failures, "\n".join(failures)


def replace_bytes(data: bytes, rng: random.Random, first: int, end: int, most: int) -> tuple[list[int], bytes]:
    """1 to most random bytes in [first, end) set to random values: (their positions, the result)."""
    out = bytearray(data)
    positions = [rng.randrange(first, end) for _ in range(rng.randint(1, most))]
    for pos in positions:
        out[pos] = rng.randrange(256)
    return positions, bytes(out)


def truncated(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    cut = rng.randrange(len(data))
    return f"truncated to {cut}", data[:cut]


# ---- safetensors ---------------------------------------------------------------------------

def mutate_safetensors(blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    (hlen,) = struct.unpack("<Q", blob[:8])
    header, data = json.loads(blob[8:8 + hlen]), blob[8 + hlen:]
    kind = rng.choice(["field", "field", "entry", "flip", "prefix", "truncate", "data"])
    if kind in ("field", "entry"):
        name = rng.choice([n for n in header if n != "__metadata__"] + ["__metadata__"])
        if kind == "entry" or name == "__metadata__":
            header[name] = rng.choice(ODD_VALUES)
            what = f"{name} = {header[name]!r}"
        else:
            field = rng.choice(["dtype", "shape", "data_offsets"])
            if rng.random() < 0.15:
                del header[name][field]
                what = f"{name}.{field} deleted"
            else:
                header[name][field] = rng.choice(ODD_VALUES + ["BF16", "F16", "I64", "BOOL", [3, 2**62]])
                what = f"{name}.{field} = {header[name][field]!r}"
        text = json.dumps(header).encode()
        return f"{kind} {what}", struct.pack("<Q", len(text)) + text + data
    if kind == "flip":
        positions, out = replace_bytes(blob, rng, 8, 8 + hlen, 4)
        return f"header bytes {positions} replaced", out
    if kind == "prefix":
        value = rng.choice([0, 1, hlen - 1, hlen + 1, hlen + 8, len(blob), 2**63, 2**64 - 1])
        return f"length prefix {value}", struct.pack("<Q", value) + blob[8:]
    if kind == "truncate":
        return truncated(blob, rng)
    out = bytearray(blob)
    pos = rng.randrange(8 + hlen, len(blob))
    out[pos] ^= 0xFF
    return f"data byte {pos} flipped", bytes(out)


def test_mutated_safetensors_fail_cleanly(base, tmp_path):
    rng = random.Random(1301)
    blob = (base / "model.safetensors").read_bytes()
    cases = []
    for i in range(SAFETENSORS_CASES):
        what, data = mutate_safetensors(blob, rng)
        cases.append((f"case {i} ({what})", model_folder(base, tmp_path / str(i), "model.safetensors", data=data)))
    check_outcomes(cases, ("model.safetensors",))


# ---- pytorch_model.bin ---------------------------------------------------------------------

def rezip(blob: bytes, change) -> bytes:
    """The same zip with change(name, bytes) -> bytes applied to each member (stored, as torch writes)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(blob)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, change(info.filename, src.read(info)))
    return out.getvalue()


def mutate_bin(blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["pickle", "pickle", "pickle", "storage", "flip", "truncate"])
    if kind == "pickle":
        positions = []

        def flip(name: str, data: bytes) -> bytes:
            if not name.endswith("/data.pkl"):
                return data
            out = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                positions.append(rng.randrange(len(out)))
                out[positions[-1]] = rng.randrange(256)
            return bytes(out)
        data = rezip(blob, flip)
        return f"data.pkl bytes {positions} replaced", data
    if kind == "storage":
        victim = rng.choice([n for n in zipfile.ZipFile(io.BytesIO(blob)).namelist() if "/data/" in n])
        size = rng.choice([0, 3])
        return f"{victim} cut to {size} bytes", rezip(blob, lambda n, d: d[:size] if n == victim else d)
    if kind == "flip":
        positions, out = replace_bytes(blob, rng, 0, len(blob), 4)
        return f"zip bytes {positions} replaced", out
    return truncated(blob, rng)


def test_mutated_bin_fails_cleanly(base, tmp_path):
    rng = random.Random(1302)
    blob = (base / "bin").read_bytes()
    cases = []
    for i in range(BIN_CASES):
        what, data = mutate_bin(blob, rng)
        cases.append((f"case {i} ({what})", model_folder(base, tmp_path / str(i), "pytorch_model.bin", data=data)))
    check_outcomes(cases, ("pytorch_model.bin",))


# ---- config.json ---------------------------------------------------------------------------

def mutate_config(text: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["field", "field", "field", "delete", "flip", "truncate", "top"])
    config = json.loads(text)
    if kind == "field":
        key = rng.choice(CONFIG_FIELDS)
        config[key] = rng.choice(ODD_VALUES + [[[["global"], 2]], [[["local", "x"], 1]], [[["global"], -1]]])
        return f"{key} = {config[key]!r}", json.dumps(config).encode()
    if kind == "delete":
        key = rng.choice(CONFIG_FIELDS)
        config.pop(key, None)
        return f"{key} deleted", json.dumps(config).encode()
    if kind == "top":
        value = rng.choice([[], 1, "x", None])
        return f"the whole file is {value!r}", json.dumps(value).encode()
    if kind == "flip":
        positions, out = replace_bytes(text, rng, 0, len(text), 3)
        return f"bytes {positions} replaced", out
    return truncated(text, rng)


def test_mutated_config_fails_cleanly(base, tmp_path):
    rng = random.Random(1303)
    text = (base / "config.json").read_bytes()
    cases = []
    for i in range(CONFIG_CASES):
        what, config = mutate_config(text, rng)
        cases.append((f"case {i} ({what})", model_folder(base, tmp_path / str(i), "model.safetensors", config=config)))
    check_outcomes(cases, ("config.json", "model.safetensors"))


def test_the_unmutated_files_load(base, tmp_path):
    """The fuzzer's base case: both formats load, so the failures above come from the mutations."""
    for weights in ("model.safetensors", "pytorch_model.bin"):
        model = neocore.load(model_folder(base, tmp_path / weights, weights))
        assert model.logits([0, 1, 2]).shape == (3, 48)
