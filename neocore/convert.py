"""neocore convert: any readable GPT-Neo checkpoint to a standard Hugging Face folder whose
model.safetensors holds every matrix as bfloat16 (one copy of the tied embedding), biases and
norms as float32. neocore maps such a file and uses its matrices in place: nothing to convert
at load time. transformers loads it as it is."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from .checkpoint import open_checkpoint, write_safetensors
from .errors import NeocoreError, TokenizerError
from .model import resolve_config, usable_cores
from .resolve import resolve_model
from .tokenizer import Tokenizer
from .weights import WeightLoader, weight_table

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json")


def convert(src: str | Path, dst: str | Path, tokenizer: str | Path | None = None,
            config: str | Path | None = None, progress: Callable[[int, int], None] | None = None,
            **overrides: Any) -> Path:
    folder = resolve_model(src)
    dst = Path(dst)
    if dst.resolve() == folder.resolve():
        raise NeocoreError(f"{dst}: the destination must differ from the source folder")
    checkpoint = open_checkpoint(folder)
    cfg = resolve_config(folder, checkpoint, config, overrides)
    loader = WeightLoader(checkpoint, cfg, "bfloat16", usable_cores())
    table = weight_table(cfg)

    def make(index: int, spec):
        def read():
            if progress:
                progress(index + 1, len(table))
            return loader.read(spec)
        return read

    dst.mkdir(parents=True, exist_ok=True)
    write_safetensors(dst / "model.safetensors",
                      [(f"transformer.{spec.name}", "BF16" if spec.is_matrix else "F32", spec.shape,
                        make(i, spec)) for i, spec in enumerate(table)])
    loader.report_rounding()
    (dst / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    copy_tokenizer(Path(tokenizer) if tokenizer else folder, dst, required=tokenizer is not None)
    return dst


def copy_tokenizer(src: Path, dst: Path, required: bool) -> None:
    """The tokenizer files as Hugging Face names them (the Java port's are rewritten)."""
    present = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in present:
        shutil.copy(src / name, dst / name)
    if present:
        return
    if Tokenizer.files_present(src):
        tok = Tokenizer.from_dir(src)
        (dst / "vocab.json").write_text(json.dumps(tok.encoder, ensure_ascii=False), encoding="utf-8")
        merges = sorted(tok.ranks, key=tok.ranks.get)
        (dst / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                        encoding="utf-8")
    elif required:
        raise TokenizerError(f"{src}: no tokenizer files to copy")
