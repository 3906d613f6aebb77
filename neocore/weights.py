"""From checkpoint tensors to the arrays the C core reads: matrices in bfloat16 (float32 in the
reference mode, int8 blocks with a scale each in the compact one), biases and LayerNorm
parameters in float32."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import _core
from .checkpoint import Checkpoint, TensorRef
from .config import GPTNeoConfig
from .errors import CheckpointError
from .hugepages import COPY_LIMIT, HugePageArena, huge_pages_offered, slot_bytes

Empty = Callable[[tuple[int, ...], Any], np.ndarray]  # np.empty, or a HugePageArena's

log = logging.getLogger("neocore")

WEIGHT_DTYPES = ("bfloat16", "float32", "int8")
STORED_AS = {"bfloat16": "BF16", "float32": "F32", "int8": "I8"}  # a file's tensor type usable in place
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64", "F32BE")
SCALES_SUFFIX = ".scales"  # an int8 matrix "x.weight" keeps its scales in "x.weight.scales"
INT8_NOT_TRANSFORMERS = "neocore int8 weights, which transformers cannot load"


def f32_to_bf16(values: np.ndarray, threads: int = 1, empty: Empty = np.empty) -> tuple[np.ndarray, bool]:
    """Rounds float32 to bfloat16 bits (round to nearest, ties to even; NaN stays NaN).
    Returns the uint16 bits and whether any value changed (False when every low half is 0)."""
    source = np.ascontiguousarray(values, dtype=np.float32)
    out = empty(source.shape, np.uint16)
    changed = _core.f32_to_bf16(out.reshape(-1), source.reshape(-1), threads)
    return out, changed


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class Int8Matrix:
    """A matrix as the C core reads NEO_I8: int8 values [rows, cols] and float32 scales
    [rows, ceil(cols / I8_BLOCK)], one per block of I8_BLOCK consecutive elements of a row;
    an element is value * scale."""
    values: np.ndarray
    scales: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes


def i8_blocks(cols: int) -> int:
    return -(-cols // _core.I8_BLOCK)


def quantize_i8(values: np.ndarray, threads: int = 1, empty: Empty = np.empty) -> Int8Matrix:
    """Symmetric round-to-nearest int8, one scale (max |x| / 127) per block of a row; every
    element comes back within half a step. ValueError if values holds a NaN or an infinity."""
    source = np.ascontiguousarray(values, dtype=np.float32)
    rows, cols = source.shape
    out = Int8Matrix(empty((rows, cols), np.int8), empty((rows, i8_blocks(cols)), np.float32))
    if not _core.quantize_i8(out.values, out.scales, source, threads):
        raise ValueError("holds NaN or infinite values")
    return out


def holds_int8(checkpoint: Checkpoint) -> bool:
    """Whether the checkpoint is a neocore int8 one (neocore convert --dtype int8)."""
    return any(ref.dtype == "I8" for ref in checkpoint.tensors.values())


class WeightLoader:
    """Reads one model's tensors by their Hugging Face names, checking presence and shape."""

    def __init__(self, checkpoint: Checkpoint, config: GPTNeoConfig, dtype: str, threads: int = 1,
                 huge_pages: bool | None = False):
        """huge_pages (neocore.hugepages): False leaves every page as it comes; otherwise, where
        the kernel offers huge pages, the file is mapped asking for them, matrices converted at
        load are put in a HugePageArena, and so are those that could be used in place, unless
        the page cache already holds them in huge pages, or huge_pages is None (auto) and they
        are more than COPY_LIMIT bytes."""
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"dtype must be one of {WEIGHT_DTYPES}, got {dtype!r}")
        self.checkpoint = checkpoint
        self.config = config
        self.dtype = dtype
        self.threads = threads
        names = checkpoint.tensors
        # GPTNeoForCausalLM saves under "transformer.", a bare GPTNeoModel without a prefix
        self.prefix = "transformer." if "transformer.wte.weight" in names else ""
        block = re.compile(re.escape(self.prefix) + r"h\.(\d+)\.")
        beyond = [n for n in names for m in [block.match(n)] if m and int(m.group(1)) >= config.num_layers]
        if beyond:  # read as the config says, the model would run without them and say nothing
            raise CheckpointError(f"{checkpoint.description}: holds {beyond[0]!r}, a tensor of a block past "
                                  f"num_layers = {config.num_layers}: the config does not describe these weights")
        self.rounded: list[str] = []
        self.in_place = 0  # tensors used straight from the mapped file
        if dtype != "int8" and holds_int8(checkpoint):
            raise CheckpointError(f"{checkpoint.description}: holds {INT8_NOT_TRANSFORMERS}; "
                                  f"load it with dtype='int8' (--dtype int8)")
        self.huge_pages = huge_pages
        self.advise = huge_pages is not False and huge_pages_offered()
        self.file_in_huge_pages: bool | None = None  # what a look at the file's matrices found
        self.copy_in_place = False  # copy the matrices that could be used in place into the arena
        matrices = [spec for spec in weight_table(config) if spec.is_matrix]
        in_place = {spec.name: ref for spec in matrices for ref in [self._in_place_ref(spec.name)] if ref is not None}
        if self.advise:
            checkpoint.advise_huge_pages = True
            if in_place and (huge_pages or sum(ref.nbytes for ref in in_place.values()) <= COPY_LIMIT):
                # the largest stands for the file: one tensor faulted in, not all, before the copies
                largest = max(in_place.values(), key=lambda ref: ref.nbytes)
                self.file_in_huge_pages = checkpoint.in_huge_pages([largest])
                self.copy_in_place = not self.file_in_huge_pages
        needed = sum(matrix_slot_bytes(spec.shape, dtype) for spec in matrices
                     if self.copy_in_place or spec.name not in in_place)
        self.arena = HugePageArena.create(needed) if self.advise and needed else None
        self.copy_in_place = self.copy_in_place and self.arena is not None
        self._empty: Empty = self.arena.empty if self.arena else np.empty

    @property
    def pages(self) -> str:
        """Which pages the matrices lie in, for neocore info."""
        if not self.advise:
            why = "huge pages not asked for" if self.huge_pages is False else "this kernel offers no transparent huge pages"
            return f"the mapped file's, as the page cache holds it ({why})" if self.in_place else f"in memory ({why})"
        if not self.in_place:
            return ("2 MiB where the kernel grants them (copied into memory at load)" if self.arena
                    else "in memory (no address space for a huge-page arena)")
        if self.file_in_huge_pages:
            return "2 MiB (the mapped file's, found in them)"
        if self.file_in_huge_pages is False:
            return "the mapped file's, as the page cache holds it (no address space for a huge-page arena)"
        return (f"the mapped file's, as the page cache holds it (asked for 2 MiB; not copied: "
                f"more than {COPY_LIMIT >> 20} MiB of matrices)")

    def _in_place_ref(self, name: str) -> TensorRef | None:
        """The tensor of matrix name if it can be used straight from the mapped file (its
        values, for an int8 one)."""
        ref = self.checkpoint.tensors.get(self.prefix + name)
        if ref is None or not ref.mappable:
            return None
        return ref if ref.dtype == STORED_AS[self.dtype] else None

    def _ref(self, name: str, shape: tuple[int, ...], dtypes: tuple[str, ...] = FLOAT_DTYPES,
             what: str = "from the config") -> TensorRef:
        ref = self.checkpoint.tensors.get(self.prefix + name)
        if ref is None:
            raise CheckpointError(f"{self.checkpoint.description}: tensor {self.prefix + name!r} is missing")
        if ref.shape != shape:
            raise CheckpointError(f"{self.checkpoint.description}: tensor {ref.name!r} has shape "
                                  f"{list(ref.shape)}, expected {list(shape)} {what}")
        if ref.dtype not in dtypes:
            expected = "a floating-point weight" if dtypes == FLOAT_DTYPES else " or ".join(dtypes)
            raise CheckpointError(f"{self.checkpoint.description}: tensor {ref.name!r} is {ref.dtype}, "
                                  f"not {expected}")
        return ref

    def _as_float32(self, ref: TensorRef, stored: np.ndarray) -> np.ndarray:
        return bf16_to_f32(stored) if ref.dtype == "BF16" else np.ascontiguousarray(stored, dtype=np.float32)

    def matrix(self, name: str, shape: tuple[int, ...]) -> np.ndarray | Int8Matrix:
        """A weight matrix in the engine's dtype; used in place when the file already holds it."""
        found = self.checkpoint.tensors.get(self.prefix + name)
        if self.dtype == "int8" and found is not None and found.dtype == "I8":
            return self._stored_int8(name, shape)
        ref = self._ref(name, shape)
        stored = self.checkpoint.array(ref)
        if ref.dtype == STORED_AS[self.dtype] and ref.mappable:  # (a stored int8 one returned above)
            if not self.copy_in_place:
                self.in_place += 1
                return stored
            result = self.arena.copy(stored)
        else:
            result = self._converted(ref, stored)
        del stored
        self.checkpoint.release(ref)
        return result

    def _converted(self, ref: TensorRef, stored: np.ndarray) -> np.ndarray | Int8Matrix:
        result = self._as_float32(ref, stored)  # a view, not a copy, for little-endian fp32
        if self.dtype == "bfloat16":
            result, changed = f32_to_bf16(result, self.threads, self._empty)
            if changed:
                self.rounded.append(ref.name)
        elif self.dtype == "int8":
            try:
                result = quantize_i8(result, self.threads, self._empty)
            except ValueError as exc:
                raise CheckpointError(f"{self.checkpoint.description}: tensor {ref.name!r} {exc}: "
                                      f"cannot quantise it to int8") from None
        elif self.arena is not None:
            result = self.arena.copy(result)
        return result

    def _stored_int8(self, name: str, shape: tuple[int, ...]) -> Int8Matrix:
        """An int8 matrix and its scales as neocore convert wrote them, used in place."""
        ref = self._ref(name, shape, ("I8",))
        blocks = (shape[0], i8_blocks(shape[1]))
        scales_ref = self._ref(name + SCALES_SUFFIX, blocks, ("F32",),
                               f"(one scale per {_core.I8_BLOCK} columns)")
        values = self.checkpoint.array(ref)
        scales = self.checkpoint.array(scales_ref)
        if self.copy_in_place:
            values, scales = self.arena.copy(values), self.arena.copy(scales)
            self.checkpoint.release(ref)
            self.checkpoint.release(scales_ref)
            return Int8Matrix(values, scales)
        self.in_place += ref.mappable
        # the C core reads scales as floats: copy the (small) array if the file misaligns it
        return Int8Matrix(values, np.require(scales, requirements=["C", "A"]))

    def vector(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A bias or LayerNorm parameter, always float32 (small, copied)."""
        ref = self._ref(name, shape)
        return np.array(self._as_float32(ref, self.checkpoint.array(ref)), dtype=np.float32)

    def read(self, spec: "WeightSpec") -> np.ndarray:
        return self.matrix(spec.name, spec.shape) if spec.is_matrix else self.vector(spec.name, spec.shape)

    def load_all(self, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Every tensor the engine reads, in the structure the Engine constructor takes;
        progress(layers done, layers) is called as it goes."""
        weights: dict[str, Any] = {"layers": [{} for _ in range(self.config.num_layers)]}
        for spec in weight_table(self.config):
            target = weights if spec.layer is None else weights["layers"][spec.layer]
            target[spec.key] = self.read(spec)
            if progress and spec.layer is not None and spec.key == LAST_LAYER_KEY:
                progress(spec.layer + 1, self.config.num_layers)
        self.report_rounding()
        return weights

    def report_rounding(self, advice: str = "load with dtype='float32' (--dtype float32) for exact weights") -> None:
        if self.rounded:
            log.warning("%d weight tensor(s) were not exactly representable in bfloat16 and were "
                        "rounded to nearest (e.g. %s); %s", len(self.rounded), self.rounded[0], advice)


@dataclass(frozen=True)
class WeightSpec:
    name: str                 # Hugging Face name, without the "transformer." prefix
    shape: tuple[int, ...]
    is_matrix: bool           # held in the engine's dtype; else float32
    key: str                  # its name in the Engine's weight structure
    layer: int | None = None  # its block, for per-layer tensors


LAYER_TENSORS = (  # (key, Hugging Face name within the block, matrix?, shape from (H, F))
    ("ln1_w", "ln_1.weight", False, lambda H, F: (H,)),
    ("ln1_b", "ln_1.bias", False, lambda H, F: (H,)),
    ("q_w", "attn.attention.q_proj.weight", True, lambda H, F: (H, H)),
    ("k_w", "attn.attention.k_proj.weight", True, lambda H, F: (H, H)),
    ("v_w", "attn.attention.v_proj.weight", True, lambda H, F: (H, H)),
    ("out_w", "attn.attention.out_proj.weight", True, lambda H, F: (H, H)),
    ("out_b", "attn.attention.out_proj.bias", False, lambda H, F: (H,)),
    ("ln2_w", "ln_2.weight", False, lambda H, F: (H,)),
    ("ln2_b", "ln_2.bias", False, lambda H, F: (H,)),
    ("fc_w", "mlp.c_fc.weight", True, lambda H, F: (F, H)),
    ("fc_b", "mlp.c_fc.bias", False, lambda H, F: (F,)),
    ("proj_w", "mlp.c_proj.weight", True, lambda H, F: (H, F)),
    ("proj_b", "mlp.c_proj.bias", False, lambda H, F: (H,)),
)
LAST_LAYER_KEY = LAYER_TENSORS[-1][0]


def matrix_slot_bytes(shape: tuple[int, ...], dtype: str) -> int:
    """The bytes a HugePageArena gives a matrix of this shape in dtype (an int8 one's scales
    included)."""
    rows, cols = shape
    if dtype == "int8":
        return slot_bytes(rows * cols) + slot_bytes(rows * i8_blocks(cols) * 4)
    return slot_bytes(rows * cols * (4 if dtype == "float32" else 2))


def weight_table(c: GPTNeoConfig) -> list[WeightSpec]:
    """Every tensor of a GPT-Neo model, in checkpoint order (lm_head is wte, so not listed)."""
    H, F = c.hidden_size, c.intermediate_size
    table = [WeightSpec("wte.weight", (c.vocab_size, H), True, "wte"),
             WeightSpec("wpe.weight", (c.max_position_embeddings, H), True, "wpe")]
    for i in range(c.num_layers):
        table += [WeightSpec(f"h.{i}.{name}", shape(H, F), matrix, key, i)
                  for key, name, matrix, shape in LAYER_TENSORS]
    table += [WeightSpec("ln_f.weight", (H,), False, "lnf_w"), WeightSpec("ln_f.bias", (H,), False, "lnf_b")]
    return table
