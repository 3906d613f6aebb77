"""neocore convert: any readable GPT-Neo checkpoint to a standard Hugging Face folder whose
model.safetensors holds every matrix as bfloat16 (one copy of the tied embedding), biases and
norms as float32. neocore maps such a file and uses its matrices in place: nothing to convert
at load time. transformers loads it as it is.

With dtype="int8" every matrix is written as int8 values plus a float32 "<name>.scales" tensor
(one scale per block of I8_BLOCK columns) to neocore-int8.safetensors, whose metadata says so:
neocore maps that in place too. transformers cannot load it: it would read the int8 values as
weights (it ignores the metadata's format tag), so the file has another name than
model.safetensors and transformers finds no weights in the folder."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, Callable

from . import _core
from .checkpoint import (NEOCORE_INT8_FILE, SINGLE_FILE_READERS, SafetensorsEntry, open_checkpoint,
                         write_safetensors)
from .config import GENERATION_CONFIG, read_json_object
from .errors import CheckpointError, NeocoreError, TokenizerError
from .model import resolve_config, usable_cores
from .resolve import resolve_model
from .tokenizer import HF_TOKENIZER_FILES, Tokenizer
from .weights import INT8_NOT_TRANSFORMERS, SCALES_SUFFIX, WeightLoader, holds_int8, i8_blocks, weight_table

CONVERT_DTYPES = ("bfloat16", "int8")
INT8_METADATA = {"format": "neocore-int8", "neocore.dtype": "int8",
                 "neocore.i8_block": str(_core.I8_BLOCK),
                 "neocore.note": "int8 values with float32 '.scales' per block of a row; "
                                 "load with neocore --dtype int8; transformers cannot load it"}


def convert(src: str | Path, dst: str | Path, tokenizer: str | Path | None = None,
            config: str | Path | None = None, progress: Callable[[int, int], None] | None = None,
            dtype: str = "bfloat16", **overrides: Any) -> Path:
    if dtype not in CONVERT_DTYPES:
        raise NeocoreError(f"convert writes {' or '.join(CONVERT_DTYPES)}, not {dtype!r}")
    for what, path in (("source", src), ("destination", dst)):
        if not str(path).strip():  # Path("") is the current folder, which nobody means by ""
            raise NeocoreError(f"the {what} folder is empty: name a folder")
    folder = resolve_model(src)
    dst = Path(dst)
    # by file identity, so by any path: a link, a bind mount, a case-insensitive file system
    if dst.is_dir() and os.path.samefile(dst, folder):
        raise NeocoreError(f"{dst}: the destination must differ from the source folder")
    checkpoint = open_checkpoint(folder)
    if dtype != "int8" and holds_int8(checkpoint):
        raise CheckpointError(f"{checkpoint.description}: holds {INT8_NOT_TRANSFORMERS}, and they "
                              f"cannot be converted back to {dtype} (the rounding is not undone); "
                              f"convert the original checkpoint instead")
    written = NEOCORE_INT8_FILE if dtype == "int8" else "model.safetensors"
    shadows = shadowing_weights(dst, written)
    if shadows:
        raise NeocoreError(f"{dst}: already holds {', '.join(shadows)}, which neocore would load instead of "
                           f"the new {written}: remove it or choose another folder")
    tokenizer_src = Path(tokenizer) if tokenizer else folder
    if tokenizer is not None:  # checked before the slow part, not after it
        if not tokenizer_src.is_dir():
            what = "is a file" if tokenizer_src.exists() else "no such folder"
            raise TokenizerError(f"{tokenizer_src}: {what} (--tokenizer takes a folder)")
        if tokenizer_src.resolve() == dst.resolve():
            raise TokenizerError(f"{tokenizer_src}: the tokenizer folder is the destination")
    tokenizer_files = _tokenizer_files(tokenizer_src, required=tokenizer is not None)  # read now: see beside
    stale = [] if tokenizer_files else Tokenizer.source_files(dst)
    if stale:  # they would be read as the new model's: not kept silently, not deleted unasked
        names = ", ".join(str(path.relative_to(dst)) for path in stale)
        raise TokenizerError(f"{dst}: holds {names}, which neocore would read as the converted model's "
                             f"tokenizer, but {folder} has none: remove them, choose another folder, "
                             f"or name a tokenizer folder with --tokenizer")
    cfg = resolve_config(folder, checkpoint, config, overrides)
    hf_config = cfg.to_hf_dict()
    # the files beside the weights, read now: a source file linked into dst would be gone once
    # dst's old files are, and a bad one is found before the slow part
    beside = {"config.json": (json.dumps(hf_config, indent=2) + "\n").encode(),
              **_generation_config(folder, hf_config["eos_token_id"], "eos_token_id" in overrides),
              **tokenizer_files}
    loader = WeightLoader(checkpoint, cfg, dtype, usable_cores())
    table = weight_table(cfg)
    entries: list[SafetensorsEntry] = []
    for i, spec in enumerate(table):
        name = f"transformer.{spec.name}"

        def read(index=i, spec=spec):
            if progress:
                progress(index + 1, len(table))
            return loader.read(spec)

        if not spec.is_matrix or dtype == "bfloat16":
            entries.append((name, "BF16" if spec.is_matrix else "F32", spec.shape, read))
            continue
        matrix = HeldMatrix(read)
        entries.append((name, "I8", spec.shape, matrix.values))
        entries.append((name + SCALES_SUFFIX, "F32", (spec.shape[0], i8_blocks(spec.shape[1])),
                        matrix.scales))

    outputs = (written, "config.json", GENERATION_CONFIG, *HF_TOKENIZER_FILES)
    for name in outputs:  # found before the slow part, not after it
        if (dst / name).is_dir():
            raise NeocoreError(f"{dst / name}: is a folder, where the converted model's file goes")
    created = [made for made in (dst, *dst.parents) if not made.exists()]  # deepest first
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NeocoreError(f"{dst}: exists and is not a folder") from None
    except NotADirectoryError:
        raise NeocoreError(f"{dst}: one of the folders above it is a file") from None
    except OSError as exc:
        raise NeocoreError(f"{dst}: cannot write the converted folder ({exc.strerror or exc})") from None
    replaced = False  # whether dst's files are the new ones yet (before, a failure leaves them)
    try:
        write_safetensors(dst / written, entries, INT8_METADATA if dtype == "int8" else None)
        replaced = True
        loader.report_rounding(f"the converted folder holds them so (convert writes {dtype}): keep "
                               f"the source for exact weights")
        for name in outputs[1:]:  # dst's old ones go: an old vocab.json would be read before a new tokenizer.json
            fresh(dst / name)
        for name, data in beside.items():
            _write(dst / name, data)
    except BaseException as exc:
        for name in outputs if replaced else ():  # no half-written folder that loads
            (dst / name).unlink(missing_ok=True)
        for made in created:  # nor empty folders
            if any(made.iterdir()):
                break
            made.rmdir()
        if isinstance(exc, OSError):
            path, wrote = _failed_file(exc, dst, outputs)
            raise NeocoreError(f"{path}: cannot {'write the converted folder' if wrote else 'read it'} "
                               f"({exc.strerror or exc})") from None
        raise
    return dst


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def _failed_file(exc: OSError, dst: Path, outputs: tuple[str, ...]) -> tuple[Path, bool]:
    """The file an OSError is about, and whether writing it failed (else reading a source file):
    one that names only the convert's own files (a rename names two) or runs out of room."""
    named = [Path(name) for name in (exc.filename, exc.filename2) if name]
    ours = [path for path in named  # the convert's own files (the weights' .partial too), not a source below dst
            if path.parent.resolve() == dst.resolve() and path.name.startswith(outputs)]
    if exc.errno in WRITE_ERRNOS or (ours and len(ours) == len(named)):
        return (ours[0] if ours else dst), True
    return (named[0] if named else dst), False


def fresh(path: Path) -> Path:
    """path with whatever was there removed, so that writing it makes a new file: never one
    written through a hard or symbolic link into another folder (DST linked to SRC)."""
    path.unlink(missing_ok=True)
    return path


def shadowing_weights(folder: Path, written: str) -> list[str]:
    """The weight files in folder that neocore would load before the file named written."""
    found = []
    for filename in SINGLE_FILE_READERS:
        if filename == written:
            break
        found += [name for name in (filename, f"{filename}.index.json") if (folder / name).exists()]
    return found


class HeldMatrix:
    """An int8 matrix written as two entries, values then scales, from one quantisation: held
    from the first entry to the second, so one matrix at a time is in memory."""

    def __init__(self, read: Callable[[], Any]):
        self.read = read
        self.matrix = None

    def values(self):
        self.matrix = self.read()
        return self.matrix.values

    def scales(self):
        scales, self.matrix = self.matrix.scales, None
        return scales


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        exc.filename = exc.filename or str(path)  # a failed write names no file
        raise


def _read_source(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise NeocoreError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _generation_config(folder: Path, eos: Any, eos_overridden: bool) -> dict[str, bytes]:
    """The source's generation_config.json, its end-of-text ids those this load stops at (an
    override's) where it names some or they were overridden: without the field, transformers
    would not stop there, and the copy keeps it so."""
    path = folder / GENERATION_CONFIG
    if not path.is_file():
        return {}
    fields = read_json_object(path)
    if "eos_token_id" in fields or eos_overridden:
        fields["eos_token_id"] = eos
    return {GENERATION_CONFIG: (json.dumps(fields, indent=2) + "\n").encode()}


def _tokenizer_files(src: Path, required: bool) -> dict[str, bytes]:
    """The tokenizer files under Hugging Face's names: src's own, or the Java port's rewritten."""
    if not Tokenizer.files_present(src):  # some files but no whole set: refused there
        if required:
            raise TokenizerError(f"{src}: no tokenizer files to copy")
        return {}
    read = Tokenizer.source_files(src)
    if read[0].parent == src:
        return {name: _read_source(src / name) for name in HF_TOKENIZER_FILES if (src / name).is_file()}
    tok = Tokenizer.from_dir(src)  # the Java port's tokenizer/
    merges = sorted(tok.ranks, key=tok.ranks.get)
    return {"vocab.json": json.dumps(tok.encoder, ensure_ascii=False).encode("utf-8"),
            "merges.txt": ("#version: 0.2\n" + "".join(f"{merge}\n" for merge in merges)).encode("utf-8")}
