"""The parameter folders of the Java GPT-Neo port (huplay's GPT-NEO-SMALL/-MEDIUM/-XL/-ADA).

One raw big-endian float32 file per tensor, no header: input/wte.dat (possibly split into
wte.dat.part1, .part2, ...), input/wpe.dat, decoder1/ ... decoderN/ and output/. Every weight
matrix is stored as [in, out], the transpose of nn.Linear's [out, in]; the embeddings are
not. There is no config.json: the shape comes from model.properties when present, else from
the file sizes, with the head count of the known family members."""
from __future__ import annotations

import re
from math import prod
from pathlib import Path
from typing import Any

from .checkpoint import TensorRef
from .config import CONFIG_LIMIT
from .errors import CheckpointError

HEADS_BY_HIDDEN = {768: 12, 1024: 16, 2048: 16, 2560: 20}  # 125M, 350M, 1.3B, 2.7B

# Java file (in decoderN/) -> (Hugging Face name in block N-1, stored transposed)
DECODER_FILES = {
    "att.norm.w": ("ln_1.weight", False), "att.norm.b": ("ln_1.bias", False),
    "att.query.w": ("attn.attention.q_proj.weight", True),
    "att.key.w": ("attn.attention.k_proj.weight", True),
    "att.value.w": ("attn.attention.v_proj.weight", True),
    "att.proj.w": ("attn.attention.out_proj.weight", True),
    "att.proj.b": ("attn.attention.out_proj.bias", False),
    "mlp.norm.w": ("ln_2.weight", False), "mlp.norm.b": ("ln_2.bias", False),
    "mlp.layer1.w": ("mlp.c_fc.weight", True), "mlp.layer1.b": ("mlp.c_fc.bias", False),
    "mlp.layer2.w": ("mlp.c_proj.weight", True), "mlp.layer2.b": ("mlp.c_proj.bias", False),
}


def is_java_port_folder(folder: Path) -> bool:
    return (folder / "input").is_dir() and (folder / "decoder1").is_dir()


def read_properties(path: Path) -> dict[str, str]:
    """key = value lines; '#' comments. Capped as config.json is: a real one is a few lines."""
    if path.stat().st_size > CONFIG_LIMIT:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes, more than a model.properties "
                              f"file holds (at most {CONFIG_LIMIT})")
    props = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def _bytes(pieces: tuple[Path, ...]) -> int:
    return sum(p.stat().st_size for p in pieces)


def _floats(path: Path) -> int:
    """Number of float32 values in a .dat file (or its .partN pieces)."""
    size = _bytes(_pieces(path))
    if size % 4:
        raise CheckpointError(f"{path}: {size} bytes is not a whole number of float32 values")
    return size // 4


def _pieces(path: Path) -> tuple[Path, ...]:
    """The file, or its pieces path.part1 .. path.partN in order. Only regular files: a device
    or a pipe reports no size and would be read without end."""
    if path.exists():
        if not path.is_file():
            raise CheckpointError(f"{path}: not a regular file")
        return (path,)
    numbers = sorted(int(m.group(1)) for p in path.parent.glob(path.name + ".part*")
                     if (m := re.fullmatch(re.escape(path.name) + r"\.part([1-9]\d*)", p.name)))
    if not numbers:
        raise CheckpointError(f"{path}: missing (neither the file nor {path.name}.part1, ... exist)")
    if numbers != list(range(1, len(numbers) + 1)):
        found = set(numbers)
        gap = next(i for i in range(1, len(numbers) + 2) if i not in found)
        raise CheckpointError(f"{path}.part{gap}: missing (found parts {numbers[:8]}"
                              f"{' ...' if len(numbers) > 8 else ''})")
    parts = tuple(path.with_name(f"{path.name}.part{i}") for i in numbers)
    for part in parts:
        if not part.is_file():
            raise CheckpointError(f"{part}: not a regular file")
    return parts


def _describe(pieces: tuple[Path, ...]) -> str:
    """A file for messages: its name, or its parts with their sizes."""
    if len(pieces) == 1:
        return str(pieces[0])
    sizes = ", ".join(str(p.stat().st_size) for p in pieces)
    return f"{pieces[0].with_suffix('')} ({len(pieces)} parts of {sizes} bytes)"


def _config_from(folder: Path, props: dict[str, str]) -> dict[str, Any]:
    """A config.json-style dict: model.properties where it speaks, file sizes otherwise."""

    def prop(key: str, default: Any, kind=int) -> Any:
        if key not in props:
            return default
        try:
            return kind(props[key].rstrip("fF"))
        except ValueError:
            raise CheckpointError(f"{folder / 'model.properties'}: {key} = {props[key]!r} is not valid") from None

    decoders = {int(m.group(1)) for d in folder.iterdir()
                if d.is_dir() and (m := re.fullmatch(r"decoder([1-9]\d*)", d.name))}
    layers = len(decoders)
    # the first gap, found in len(decoders) steps: a folder named decoder100000000 is one folder
    gap = next(i for i in range(1, layers + 2) if i not in decoders)
    if gap <= max(decoders):
        raise CheckpointError(f"{folder / f'decoder{gap}'}: decoder folder is missing "
                              f"(found {layers} of decoder1..decoder{max(decoders)})")
    if prop("decoder.count", layers) != layers:
        raise CheckpointError(f"{folder / 'model.properties'}: decoder.count = {props['decoder.count']}, "
                              f"but the folder holds decoder1..decoder{layers}")
    hidden = _floats(folder / "decoder1" / "att.norm.w.dat")
    if not hidden:
        raise CheckpointError(f"{folder / 'decoder1' / 'att.norm.w.dat'}: empty")
    ffn = _floats(folder / "decoder1" / "mlp.layer1.b.dat")
    vocab = _floats(folder / "input" / "wte.dat") // hidden
    positions = _floats(folder / "input" / "wpe.dat") // hidden

    kinds = [props.get(f"attention.type.{i}", "global" if i % 2 else "local") for i in range(1, layers + 1)]
    config = {
        "model_type": "gpt_neo", "hidden_size": prop("hidden.size", hidden), "num_layers": layers,
        "intermediate_size": prop("feedforward.size", ffn), "vocab_size": prop("token.count", vocab),
        "max_position_embeddings": prop("max.length", positions),
        "window_size": prop("attention.local.size", 256),
        "attention_types": [[[kind], 1] for kind in kinds],
        "layer_norm_epsilon": prop("epsilon", 1e-5, float), "activation_function": "gelu_new",
        "eos_token_id": prop("end.of.text.token", 50256), "bos_token_id": prop("end.of.text.token", 50256),
    }
    heads = prop("attention.head.count", HEADS_BY_HIDDEN.get(hidden))
    if heads is not None:
        config["num_heads"] = heads  # else the config check asks for num_heads=...
    return config


def read_java_port(folder: Path) -> tuple[dict[str, TensorRef], dict[str, Any]]:
    props = read_properties(folder / "model.properties") if (folder / "model.properties").is_file() else {}
    if props.get("byte.order", "BIG_ENDIAN") != "BIG_ENDIAN" or props.get("data.type", "FLOAT32") != "FLOAT32":
        raise CheckpointError(f"{folder / 'model.properties'}: only big-endian FLOAT32 parameter files are supported")
    config = _config_from(folder, props)
    # huplay's loader reads matrices as [in, out] unless weights.transposed says false
    stored_transposed = props.get("weights.transposed", "true").lower()
    if stored_transposed not in ("true", "false"):
        raise CheckpointError(f"{folder / 'model.properties'}: weights.transposed = "
                              f"{props['weights.transposed']!r} is neither true nor false")
    H, F = config["hidden_size"], config["intermediate_size"]
    shapes = {"ln_1.weight": (H,), "ln_1.bias": (H,), "ln_2.weight": (H,), "ln_2.bias": (H,),
              "attn.attention.out_proj.bias": (H,), "mlp.c_fc.bias": (F,), "mlp.c_proj.bias": (H,),
              "mlp.c_fc.weight": (F, H), "mlp.c_proj.weight": (H, F)}
    files: dict[str, tuple[Path, tuple[int, ...], bool]] = {
        "transformer.wte.weight": (folder / "input" / "wte.dat", (config["vocab_size"], H), False),
        "transformer.wpe.weight": (folder / "input" / "wpe.dat", (config["max_position_embeddings"], H), False),
        "transformer.ln_f.weight": (folder / "output" / "norm.w.dat", (H,), False),
        "transformer.ln_f.bias": (folder / "output" / "norm.b.dat", (H,), False),
    }
    for i in range(config["num_layers"]):
        for java, (name, transposed) in DECODER_FILES.items():
            files[f"transformer.h.{i}.{name}"] = (folder / f"decoder{i + 1}" / f"{java}.dat",
                                                  shapes.get(name, (H, H)),
                                                  transposed and stored_transposed == "true")
    tensors = {}
    for name, (path, shape, transposed) in files.items():
        pieces = _pieces(path)
        expected, actual = 4 * prod(shape), _bytes(pieces)
        if actual != expected:
            raise CheckpointError(f"{_describe(pieces)}: holds {actual} bytes, but {name} of shape "
                                  f"{list(shape)} needs {expected} (wrong size or truncated)")
        where = pieces[0] if len(pieces) == 1 else pieces
        tensors[name] = TensorRef(name, where, 0, "F32BE", shape, transposed)
    return tensors, config
