"""From checkpoint tensors to the arrays the C core reads: matrices in bfloat16 (or float32
in the reference mode), biases and LayerNorm parameters in float32."""
from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from .checkpoint import Checkpoint, TensorRef
from .config import GPTNeoConfig
from .errors import CheckpointError

log = logging.getLogger("neocore")

WEIGHT_DTYPES = ("bfloat16", "float32")
_CHUNK = 1 << 20  # elements converted at a time, to bound temporaries


def f32_to_bf16(values: np.ndarray) -> tuple[np.ndarray, bool]:
    """Rounds float32 to bfloat16 bits (round to nearest, ties to even; NaN stays NaN).
    Returns the uint16 bits and whether any value changed (False when every low half is 0)."""
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    out = np.empty(flat.shape, dtype=np.uint16)
    rounded = False
    for start in range(0, flat.size, _CHUNK):
        bits = flat[start:start + _CHUNK].view(np.uint32)
        if bits.size and np.any(bits & 0xFFFF):
            rounded = True
            nearest = (bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16
            nan = (bits & 0x7FFFFFFF) > 0x7F800000
            nearest[nan] = (bits[nan] >> 16) | 0x0040  # keep NaN quiet rather than round it to inf
            out[start:start + _CHUNK] = nearest.astype(np.uint16)
        else:
            out[start:start + _CHUNK] = bits >> 16
    return out.reshape(values.shape), rounded


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


class WeightLoader:
    """Reads one model's tensors by their Hugging Face names, checking presence and shape."""

    def __init__(self, checkpoint: Checkpoint, config: GPTNeoConfig, dtype: str):
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"dtype must be one of {WEIGHT_DTYPES}, got {dtype!r}")
        self.checkpoint = checkpoint
        self.config = config
        self.dtype = dtype
        names = checkpoint.tensors
        # GPTNeoForCausalLM saves under "transformer.", a bare GPTNeoModel without a prefix
        self.prefix = "transformer." if "transformer.wte.weight" in names else ""
        self.rounded: list[str] = []
        self.in_place = 0  # tensors used straight from the mapped file

    def _ref(self, name: str, shape: tuple[int, ...]) -> TensorRef:
        ref = self.checkpoint.tensors.get(self.prefix + name)
        if ref is None:
            raise CheckpointError(f"{self.checkpoint.description}: tensor {self.prefix + name!r} is missing")
        if ref.shape != shape:
            raise CheckpointError(f"{self.checkpoint.description}: tensor {ref.name!r} has shape "
                                  f"{list(ref.shape)}, expected {list(shape)} from the config")
        if ref.dtype not in ("F32", "F16", "BF16", "F64"):
            raise CheckpointError(f"{self.checkpoint.description}: tensor {ref.name!r} is {ref.dtype}, "
                                  f"not a floating-point weight")
        return ref

    def _as_float32(self, ref: TensorRef, stored: np.ndarray) -> np.ndarray:
        return bf16_to_f32(stored) if ref.dtype == "BF16" else stored.astype(np.float32)

    def matrix(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A weight matrix in the engine's dtype; used in place when the file already holds it."""
        ref = self._ref(name, shape)
        stored = self.checkpoint.array(ref)
        target = "BF16" if self.dtype == "bfloat16" else "F32"
        if ref.dtype == target:
            self.in_place += 1
            return stored
        if self.dtype == "float32":
            result = self._as_float32(ref, stored)
        elif ref.dtype == "F32":
            result, changed = f32_to_bf16(stored)
            if changed:
                self.rounded.append(ref.name)
        else:
            result, changed = f32_to_bf16(self._as_float32(ref, stored))
            if changed:
                self.rounded.append(ref.name)
        del stored
        self.checkpoint.release(ref)
        return result

    def vector(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A bias or LayerNorm parameter, always float32 (small, copied)."""
        ref = self._ref(name, shape)
        return np.array(self._as_float32(ref, self.checkpoint.array(ref)), dtype=np.float32)

    def load_all(self, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Every tensor the engine reads, in the structure the Engine constructor takes;
        progress(layers done, layers) is called as it goes."""
        c = self.config
        H, F = c.hidden_size, c.intermediate_size
        weights: dict[str, Any] = {
            "wte": self.matrix("wte.weight", (c.vocab_size, H)),
            "wpe": self.matrix("wpe.weight", (c.max_position_embeddings, H)),
            "layers": [],
        }
        for i in range(c.num_layers):
            p = f"h.{i}."
            a = p + "attn.attention."
            weights["layers"].append({
                "ln1_w": self.vector(p + "ln_1.weight", (H,)),
                "ln1_b": self.vector(p + "ln_1.bias", (H,)),
                "q_w": self.matrix(a + "q_proj.weight", (H, H)),
                "k_w": self.matrix(a + "k_proj.weight", (H, H)),
                "v_w": self.matrix(a + "v_proj.weight", (H, H)),
                "out_w": self.matrix(a + "out_proj.weight", (H, H)),
                "out_b": self.vector(a + "out_proj.bias", (H,)),
                "ln2_w": self.vector(p + "ln_2.weight", (H,)),
                "ln2_b": self.vector(p + "ln_2.bias", (H,)),
                "fc_w": self.matrix(p + "mlp.c_fc.weight", (F, H)),
                "fc_b": self.vector(p + "mlp.c_fc.bias", (F,)),
                "proj_w": self.matrix(p + "mlp.c_proj.weight", (H, F)),
                "proj_b": self.vector(p + "mlp.c_proj.bias", (H,)),
            })
            if progress:
                progress(i + 1, c.num_layers)
        weights["lnf_w"] = self.vector("ln_f.weight", (H,))
        weights["lnf_b"] = self.vector("ln_f.bias", (H,))
        if self.rounded:
            log.warning("%d weight tensor(s) were not exactly representable in bfloat16 and were "
                        "rounded to nearest (e.g. %s); load with dtype='float32' for exact weights",
                        len(self.rounded), self.rounded[0])
        return weights
