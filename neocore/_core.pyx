# cython: language_level=3, boundscheck=False, wraparound=False
"""The one bridge between Python and the C core in csrc/ (see neocore.h).

Python owns every weight array; an Engine holds pointers into them, plus a reference to
each so they outlive it. forward() is the single Python -> C call of a step."""
from libc.stdint cimport int32_t, uint8_t, uint16_t, uintptr_t
from libc.stdlib cimport calloc, free

import numpy as np

cdef extern from "neocore.h":
    ctypedef enum NeoDType:
        NEO_F32
        NEO_BF16
    ctypedef enum NeoIsa:
        NEO_ISA_GENERIC
        NEO_ISA_AVX2
    enum:
        NEO_OK
        NEO_ERR_CONTEXT_FULL
        NEO_ERR_BAD_TOKEN
    ctypedef struct NeoConfig:
        int hidden, n_layers, n_heads, head_dim, ffn, vocab, max_positions, window
        float ln_eps
        const uint8_t *layer_is_local
    ctypedef struct NeoLayerWeights:
        const float *ln1_w
        const float *ln1_b
        const void *q_w
        const void *k_w
        const void *v_w
        const void *out_w
        const float *out_b
        const float *ln2_w
        const float *ln2_b
        const void *fc_w
        const float *fc_b
        const void *proj_w
        const float *proj_b
    ctypedef struct NeoWeights:
        NeoDType dtype
        const void *wte
        const void *wpe
        const NeoLayerWeights *layers
        const float *lnf_w
        const float *lnf_b
    ctypedef struct NeoState:
        int n_ctx, chunk, n_threads, pos

    int neo_cpu_has_avx2_fma()
    NeoState *neo_state_new(const NeoConfig *cfg, int n_ctx, int chunk, int n_threads, NeoIsa isa)
    void neo_state_free(NeoState *s)
    int neo_forward(const NeoConfig *cfg, const NeoWeights *w, NeoState *s,
                    const int32_t *tokens, int n, float *logits, int all_logits) nogil
    void matmul_forward(float *out, const float *x, const void *w, NeoDType dtype,
                        const float *bias, int T, int K, int N, int accumulate, int n_threads,
                        NeoIsa isa) nogil
    void gelu_new_forward(float *x, size_t n, int n_threads, NeoIsa isa) nogil
    int neo_f32_to_bf16(unsigned short *dst, const float *src, size_t n, int n_threads) nogil


ISAS = {"generic": NEO_ISA_GENERIC, "avx2": NEO_ISA_AVX2}
DTYPES = {"float32": NEO_F32, "bfloat16": NEO_BF16}
MATRIX_NUMPY_DTYPE = {"float32": np.float32, "bfloat16": np.uint16}  # bf16 travels as raw uint16


def cpu_has_avx2_fma() -> bool:
    return bool(neo_cpu_has_avx2_fma())


cdef uintptr_t _address(object array, object dtype, tuple shape, str name) except 0:
    """Checks what C will assume of an array and returns its data pointer."""
    if not isinstance(array, np.ndarray) or array.dtype != dtype or array.shape != shape \
            or not array.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous {np.dtype(dtype)} array of shape {shape}")
    return <uintptr_t>array.ctypes.data


class ContextFull(Exception):
    pass


cdef class Engine:
    cdef NeoConfig cfg
    cdef NeoWeights weights
    cdef NeoLayerWeights *layers
    cdef NeoState *state
    cdef object keep_alive
    cdef public str isa
    cdef public int threads

    def __cinit__(self):
        self.layers = NULL
        self.state = NULL

    def __init__(self, shape: dict, weights: dict, str dtype, int n_ctx, int chunk, int threads,
                 str isa):
        """shape: hidden, n_layers, n_heads, ffn, vocab, max_positions, window, ln_eps,
        layer_is_local (uint8 array). weights: wte, wpe, lnf_w, lnf_b, layers (list of dicts)."""
        cdef int H = shape["hidden"], F = shape["ffn"], L = shape["n_layers"]
        cdef int V = shape["vocab"], P = shape["max_positions"]
        if isa not in ISAS:
            raise ValueError(f"unknown kernel path {isa!r}")
        if isa == "avx2" and not neo_cpu_has_avx2_fma():
            raise ValueError("this CPU has no AVX2+FMA: the avx2 kernel path cannot run")
        mat = MATRIX_NUMPY_DTYPE[dtype]
        f32 = np.float32
        local = np.ascontiguousarray(shape["layer_is_local"], dtype=np.uint8)
        self.keep_alive = [local, weights]
        self.isa = isa
        self.threads = threads
        self.cfg.hidden = H
        self.cfg.n_layers = L
        self.cfg.n_heads = shape["n_heads"]
        self.cfg.head_dim = H // shape["n_heads"]
        self.cfg.ffn = F
        self.cfg.vocab = V
        self.cfg.max_positions = P
        self.cfg.window = shape["window"]
        self.cfg.ln_eps = shape["ln_eps"]
        self.cfg.layer_is_local = <const uint8_t *><uintptr_t>_address(local, np.uint8, (L,), "layer_is_local")

        self.weights.dtype = DTYPES[dtype]
        self.weights.wte = <const void *>_address(weights["wte"], mat, (V, H), "wte")
        self.weights.wpe = <const void *>_address(weights["wpe"], mat, (P, H), "wpe")
        self.weights.lnf_w = <const float *>_address(weights["lnf_w"], f32, (H,), "ln_f.weight")
        self.weights.lnf_b = <const float *>_address(weights["lnf_b"], f32, (H,), "ln_f.bias")
        self.layers = <NeoLayerWeights *>calloc(L, sizeof(NeoLayerWeights))
        if self.layers == NULL:
            raise MemoryError()
        cdef int i
        for i in range(L):
            lw = weights["layers"][i]
            self.layers[i].ln1_w = <const float *>_address(lw["ln1_w"], f32, (H,), f"h.{i}.ln_1.weight")
            self.layers[i].ln1_b = <const float *>_address(lw["ln1_b"], f32, (H,), f"h.{i}.ln_1.bias")
            self.layers[i].q_w = <const void *>_address(lw["q_w"], mat, (H, H), f"h.{i}.q_proj.weight")
            self.layers[i].k_w = <const void *>_address(lw["k_w"], mat, (H, H), f"h.{i}.k_proj.weight")
            self.layers[i].v_w = <const void *>_address(lw["v_w"], mat, (H, H), f"h.{i}.v_proj.weight")
            self.layers[i].out_w = <const void *>_address(lw["out_w"], mat, (H, H), f"h.{i}.out_proj.weight")
            self.layers[i].out_b = <const float *>_address(lw["out_b"], f32, (H,), f"h.{i}.out_proj.bias")
            self.layers[i].ln2_w = <const float *>_address(lw["ln2_w"], f32, (H,), f"h.{i}.ln_2.weight")
            self.layers[i].ln2_b = <const float *>_address(lw["ln2_b"], f32, (H,), f"h.{i}.ln_2.bias")
            self.layers[i].fc_w = <const void *>_address(lw["fc_w"], mat, (F, H), f"h.{i}.c_fc.weight")
            self.layers[i].fc_b = <const float *>_address(lw["fc_b"], f32, (F,), f"h.{i}.c_fc.bias")
            self.layers[i].proj_w = <const void *>_address(lw["proj_w"], mat, (H, F), f"h.{i}.c_proj.weight")
            self.layers[i].proj_b = <const float *>_address(lw["proj_b"], f32, (H,), f"h.{i}.c_proj.bias")
        self.weights.layers = self.layers
        self.state = neo_state_new(&self.cfg, n_ctx, chunk, threads, ISAS[isa])
        if self.state == NULL:
            raise MemoryError("could not allocate the run state (key/value cache)")

    def __dealloc__(self):
        neo_state_free(self.state)
        free(self.layers)

    @property
    def pos(self) -> int:
        """Tokens held in the cache."""
        return self.state.pos

    @property
    def n_ctx(self) -> int:
        return self.state.n_ctx

    def reset(self) -> None:
        self.state.pos = 0

    def forward(self, const int32_t[::1] tokens, float[:, ::1] logits, bint all_logits) -> None:
        """Appends tokens to the cache; logits gets one row per token, or one for the last."""
        cdef int n = tokens.shape[0]
        cdef int rows = n if all_logits else 1
        if n == 0:
            return
        if logits.shape[0] < rows or logits.shape[1] != self.cfg.vocab:
            raise ValueError(f"logits buffer must be at least [{rows}, {self.cfg.vocab}]")
        cdef int rc
        with nogil:
            rc = neo_forward(&self.cfg, &self.weights, self.state, &tokens[0], n, &logits[0, 0],
                             all_logits)
        if rc == NEO_ERR_CONTEXT_FULL:
            raise ContextFull(f"{self.state.pos} + {n} tokens exceed the context of {self.state.n_ctx}")
        if rc == NEO_ERR_BAD_TOKEN:
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab})")
        if rc != NEO_OK:
            raise RuntimeError(f"neo_forward failed with code {rc}")


def matmul(float[:, ::1] out, const float[:, ::1] x, w, const float[::1] bias, bint accumulate,
           int threads, str isa) -> None:
    """out (+)= bias + x @ w.T with the chosen kernel path; w is float32 or bf16-as-uint16."""
    cdef int T = x.shape[0], K = x.shape[1]
    cdef int N = w.shape[0]
    dtype = "bfloat16" if w.dtype == np.uint16 else "float32"
    cdef uintptr_t wp = _address(w, MATRIX_NUMPY_DTYPE[dtype], (N, K), "w")
    if out.shape[0] != T or out.shape[1] != N:
        raise ValueError("out must be [T, N]")
    if bias is not None and bias.shape[0] != N:
        raise ValueError("bias must be [N]")
    if isa == "avx2" and not neo_cpu_has_avx2_fma():
        raise ValueError("this CPU has no AVX2+FMA")
    cdef const float *bp = &bias[0] if bias is not None else NULL
    cdef NeoDType dt = DTYPES[dtype]
    cdef NeoIsa path = ISAS[isa]
    with nogil:
        matmul_forward(&out[0, 0], &x[0, 0], <const void *>wp, dt, bp, T, K, N, accumulate,
                       threads, path)


def gelu_new(float[::1] x, int threads, str isa) -> None:
    """x = gelu_new(x) in place with the chosen kernel path."""
    if isa == "avx2" and not neo_cpu_has_avx2_fma():
        raise ValueError("this CPU has no AVX2+FMA")
    cdef NeoIsa path = ISAS[isa]
    if x.shape[0]:
        with nogil:
            gelu_new_forward(&x[0], x.shape[0], threads, path)


def f32_to_bf16(unsigned short[::1] dst, const float[::1] src, int threads) -> bool:
    """dst = bfloat16 bits of src (round to nearest even); True if any value was rounded."""
    if dst.shape[0] != src.shape[0]:
        raise ValueError("dst and src differ in length")
    cdef int rounded = 0
    if src.shape[0]:
        with nogil:
            rounded = neo_f32_to_bf16(&dst[0], &src[0], src.shape[0], threads)
    return bool(rounded)
