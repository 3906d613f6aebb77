# cython: language_level=3, boundscheck=False, wraparound=False
"""The one bridge between Python and the C core in csrc/ (see neocore.h).

Python owns every weight array; a Core holds pointers into them, plus a reference to
each so they outlive it. step() is the single Python -> C call of a step."""
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free

import numpy as np

cdef extern from "neocore.h":
    ctypedef enum NeoDType:
        NEO_F32
        NEO_BF16
        NEO_I8
    ctypedef enum NeoIsa:
        NEO_ISA_GENERIC
        NEO_ISA_AVX2
        NEO_ISA_AVX512
        NEO_ISA_SCALAR
    ctypedef enum NeoDecodePrefetch:
        NEO_PREFETCH_NONE
        NEO_PREFETCH_NTA_NEAR
        NEO_PREFETCH_L2_FAR
    ctypedef enum NeoAttentionFetch:
        NEO_ATTENTION_FETCH_NONE
        NEO_ATTENTION_FETCH_AHEAD
        NEO_ATTENTION_FETCH_VALUES_WITH_KEYS
    ctypedef enum NeoCpuKind:
        NEO_CPU_OTHER
        NEO_CPU_AMD_ZEN3
        NEO_CPU_AMD_ZEN4
        NEO_CPU_INTEL
    ctypedef enum NeoBf16Gemm:
        NEO_BF16_OFF
        NEO_BF16_REFERENCE
        NEO_BF16_AVX512
        NEO_BF16_AMX
    enum:
        NEO_OK
        NEO_ERR_CONTEXT_FULL
        NEO_ERR_BAD_TOKEN
        NEO_ERR_NO_MEMORY
        NEO_ERR_BAD_BATCH
        NEO_I8_BLOCK
    ctypedef struct NeoMatrix:
        NeoDType dtype
        const void *data
        const float *scales
    ctypedef struct NeoConfig:
        int hidden, n_layers, n_heads, head_dim, ffn, vocab, max_positions, window
        float ln_eps
        const uint8_t *layer_is_local
    ctypedef struct NeoLayerWeights:
        const float *ln1_w
        const float *ln1_b
        NeoMatrix q, k, v, out
        const float *out_b
        const float *ln2_w
        const float *ln2_b
        NeoMatrix fc
        const float *fc_b
        NeoMatrix proj
        const float *proj_b
    ctypedef struct NeoWeights:
        NeoMatrix wte, wpe
        const NeoLayerWeights *layers
        const float *lnf_w
        const float *lnf_b
    ctypedef struct NeoSequence:
        int len
    ctypedef struct NeoState:
        int n_seqs, n_ctx, max_rows, n_threads
        NeoDType cache_dtype
        NeoSequence *seq
    ctypedef struct NeoBatch:
        int n_rows
        const int32_t *tokens
        const int32_t *seqs
        const uint8_t *want_logits

    int neo_cpu_has_avx2_fma()
    int neo_cpu_has_avx512()
    int neo_cpu_has_avx512_bf16()
    int neo_cpu_has_amx_bf16()
    int neo_built_with_openmp()
    NeoDecodePrefetch neo_decode_prefetch(NeoIsa isa, NeoDType dtype, int rows, int cols)
    NeoIsa neo_decode_isa(NeoIsa isa, NeoDType dtype)
    NeoAttentionFetch neo_attention_fetch()
    uint64_t neo_read_stream(const void *data, size_t nbytes, int n_threads, NeoDecodePrefetch how) nogil
    NeoCpuKind neo_cpu_kind()
    NeoState *neo_state_new(const NeoConfig *cfg, int n_seqs, int n_ctx, int max_rows,
                            int n_threads, NeoIsa isa, NeoBf16Gemm bf16_gemm)
    void neo_state_free(NeoState *s)
    void neo_seq_clear(NeoState *s, int seq)
    int neo_step(const NeoConfig *cfg, const NeoWeights *w, NeoState *s, const NeoBatch *batch,
                 float *logits) nogil
    void matmul_forward(float *out, const float *x, const NeoMatrix *w, const float *bias,
                        int T, int K, int N, int accumulate, int n_threads, NeoIsa isa) nogil
    void matvec_forward(float *out, const float *x, const NeoMatrix *w, const float *bias,
                        int T, int K, int N, int accumulate, int n_threads, NeoIsa isa) nogil
    ctypedef struct NeoProjection:
        float *out
        const NeoMatrix *w
        const float *bias
        int N
    void c_matvec_projections "matvec_projections"(const NeoProjection *proj, int n_proj,
                                                   const float *x, int T, int K, int accumulate,
                                                   int n_threads, NeoIsa isa) nogil
    void neo_decode_projections(const NeoProjection *proj, int n_proj, const float *x, int T, int K,
                                int accumulate, int n_threads, NeoIsa path) nogil
    int neo_bf16_decodes(NeoBf16Gemm gemm)
    void matvec_bf16_projections(const NeoProjection *proj, int n_proj, const float *x, int T, int K,
                                 int accumulate, int n_threads, NeoBf16Gemm gemm) nogil
    void matmul_bf16_forward(float *out, const float *x, const NeoMatrix *w, const float *bias,
                             int T, int K, int N, int accumulate, int n_threads,
                             NeoBf16Gemm gemm) nogil
    void gelu_new_forward(float *x, size_t n, int n_threads, NeoIsa isa) nogil
    int neo_f32_to_bf16(unsigned short *dst, const float *src, size_t n, int n_threads) nogil
    int neo_quantize_i8(signed char *values, float *scales, const float *src, size_t rows,
                        size_t cols, int n_threads) nogil


# Kernel paths: those a model may run on, and the scalar reference the tests compare them
# with. Each names its vector kernels (NeoIsa); amx and avx512bf16 are the avx512 path plus a
# bf16 GEMM for the bf16 compute mode, which the scalar reference has too (its oracle).
ISAS = {"generic": NEO_ISA_GENERIC, "avx2": NEO_ISA_AVX2, "avx512": NEO_ISA_AVX512,
        "avx512bf16": NEO_ISA_AVX512, "amx": NEO_ISA_AVX512, "scalar": NEO_ISA_SCALAR}
BF16_GEMMS = {"amx": NEO_BF16_AMX, "avx512bf16": NEO_BF16_AVX512, "scalar": NEO_BF16_REFERENCE}
MODEL_ISAS = ("amx", "avx512bf16", "avx512", "avx2", "generic")  # fastest first
COMPUTE_MODES = ("exact", "bf16")
DTYPES = {"float32": NEO_F32, "bfloat16": NEO_BF16, "int8": NEO_I8}
# how a decode kernel prefetches its weight rows: not at all, non-temporally a few lines ahead
# (AMD), or into L2 a page ahead (Intel)
PREFETCHES = {"none": NEO_PREFETCH_NONE, "nta-near": NEO_PREFETCH_NTA_NEAR, "l2-far": NEO_PREFETCH_L2_FAR}
MATRIX_NUMPY_DTYPE = {"float32": np.float32, "bfloat16": np.uint16, "int8": np.int8}  # bf16 travels as raw uint16
I8_BLOCK = NEO_I8_BLOCK


def cpu_has_avx2_fma() -> bool:
    return bool(neo_cpu_has_avx2_fma())


def cpu_has_avx512() -> bool:
    """AVX-512F/BW/VL, with the OS saving the opmask and ZMM registers."""
    return bool(neo_cpu_has_avx512())


def cpu_has_avx512_bf16() -> bool:
    """AVX-512 and VDPBF16PS."""
    return bool(neo_cpu_has_avx512_bf16())


def cpu_has_amx_bf16() -> bool:
    """AVX-512 and AMX-BF16 tiles, with Linux granting this process the tile state."""
    return bool(neo_cpu_has_amx_bf16())


def built_with_openmp() -> bool:
    return bool(neo_built_with_openmp())


def read_stream(const unsigned char[::1] data, int threads, str prefetch="none") -> int:
    """Reads data once on threads threads (what a decode step does to the weights), every line
    prefetched in one of the decode kernels' ways (PREFETCHES), and returns the XOR of its 64-bit
    words: the probe of neocore bench's read bandwidth."""
    _check_threads(threads)
    if prefetch not in PREFETCHES:
        raise ValueError(f"prefetch must be one of {', '.join(PREFETCHES)}, got {prefetch!r}")
    if data.shape[0] == 0:
        return 0
    if <uintptr_t>&data[0] % 8:
        raise ValueError("read_stream needs data aligned to 8 bytes (it reads 64-bit words)")
    cdef NeoDecodePrefetch how = PREFETCHES[prefetch]
    with nogil:
        folded = neo_read_stream(&data[0], data.shape[0], threads, how)
    return folded


def isa_runs_here(isa: str) -> bool:
    """Whether this CPU can run kernel path isa."""
    return {"avx2": neo_cpu_has_avx2_fma, "avx512": neo_cpu_has_avx512,
            "avx512bf16": neo_cpu_has_avx512_bf16, "amx": neo_cpu_has_amx_bf16}.get(isa, lambda: 1)() != 0


def usable_isas() -> list:
    """The kernel paths this CPU runs, fastest first, the scalar reference last."""
    return [isa for isa in MODEL_ISAS if isa_runs_here(isa)] + ["scalar"]


def cpu_kind() -> str:
    """The kind of CPU that the kernels' tuning choices go by (csrc/neocore.h): "amd-zen3" (AMD
    without AVX-512), "amd-zen4" (AMD with it), "intel" or "other"."""
    return {NEO_CPU_AMD_ZEN3: "amd-zen3", NEO_CPU_AMD_ZEN4: "amd-zen4", NEO_CPU_INTEL: "intel"}.get(
        neo_cpu_kind(), "other")


def bf16_decodes(str isa) -> bool:
    """Whether a model on path isa in the bf16 compute mode decodes in bf16 on this CPU (where
    that measured faster, csrc/matmul_bf16.c); elsewhere its decode stays exact."""
    _check_known_isa(isa)
    return isa in BF16_GEMMS and neo_bf16_decodes(BF16_GEMMS[isa]) != 0


ATTENTION_FETCHES = {NEO_ATTENTION_FETCH_NONE: "none", NEO_ATTENTION_FETCH_AHEAD: "ahead",
                     NEO_ATTENTION_FETCH_VALUES_WITH_KEYS: "values-with-keys"}


def attention_fetch(str isa) -> str:
    """How attention on path isa fetches a decode row's key and value rows on this CPU: "none",
    "ahead" (each a few rows before its use) or "values-with-keys" (that, and each value row
    into L2 with the key row at its position). The AVX2 and AVX-512 paths fetch on the CPU
    kinds where that measured faster (csrc/attention.c)."""
    _check_known_isa(isa)
    if ISAS[isa] not in (NEO_ISA_AVX2, NEO_ISA_AVX512):
        return "none"
    return ATTENTION_FETCHES[neo_attention_fetch()]


def decode_kernel(str isa, str dtype) -> str:
    """The decode kernel (generic, avx2, avx512, scalar) a model on path isa steps weights of type
    dtype with on this CPU: isa's own, except on the AVX-512 paths on AMD Zen 4, which decode bf16
    and fp32 weights with the AVX2 kernel (faster there, csrc/matmul.c; its tiles for many rows
    run in zmm registers there, with the same bits)."""
    _check_known_isa(isa)
    _check_dtype(dtype)
    cdef NeoIsa decode = neo_decode_isa(ISAS[isa], DTYPES[dtype])
    return next(name for name, value in ISAS.items() if value == decode)  # amx, avx512bf16: avx512


def decode_prefetch(str isa, str dtype, int rows, int cols) -> str:
    """How path isa's decode kernel prefetches weight rows of type dtype, cols columns long, for
    rows rows of x on this CPU, chosen by its kind: a name in PREFETCHES."""
    _check_known_isa(isa)
    _check_dtype(dtype)
    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be at least 1, got {rows} and {cols}")
    how = neo_decode_prefetch(ISAS[isa], DTYPES[dtype], rows, cols)
    return next(name for name, value in PREFETCHES.items() if value == how)


# /proc/cpuinfo flags that decide which kernels can run or would help (x86 and Arm names)
SIMD_FLAGS = ("sse2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "sve", "sve2")


def cpu_model() -> str:
    """The processor's name as /proc/cpuinfo gives it (model name; on Arm the implementer
    and part), else what the platform module knows."""
    import platform
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" in fields:
        return fields["model name"]
    if "CPU part" in fields:
        return f"Arm CPU implementer {fields.get('CPU implementer', '?')} part {fields['CPU part']}"
    return platform.processor() or platform.machine()


def cpu_flags() -> list:
    """The SIMD_FLAGS this CPU lists in /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            listed = next((line.partition(":")[2].split() for line in f
                           if line.startswith(("flags", "Features"))), [])
    except OSError:
        listed = []
    return [flag for flag in SIMD_FLAGS if flag in listed]


def _check_known_isa(str isa) -> None:
    if isa not in ISAS:
        raise ValueError(f"unknown kernel path {isa!r}")


def _check_isa(str isa) -> NeoIsa:
    _check_known_isa(isa)
    if not isa_runs_here(isa):
        raise ValueError(f"this CPU cannot run the {isa} kernel path")
    return ISAS[isa]


def _check_dtype(str dtype) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _check_threads(int threads) -> None:
    if threads < 1:  # OpenMP takes a team of -1 threads as a huge unsigned count and aborts
        raise ValueError(f"threads must be at least 1, got {threads}")


cdef NeoBf16Gemm _check_compute(str compute, str isa) except *:
    """The bf16 GEMM of path isa for compute mode compute (NEO_BF16_OFF when exact)."""
    if compute not in COMPUTE_MODES:
        raise ValueError(f"unknown compute mode {compute!r}")
    if compute == "exact":
        return NEO_BF16_OFF
    if isa not in BF16_GEMMS:
        raise ValueError(f"the {isa} kernel path has no bf16 GEMM")
    return BF16_GEMMS[isa]


cdef uintptr_t _address(object array, object dtype, tuple shape, str name) except 0:
    """Checks what C will assume of an array and returns its data pointer."""
    if not isinstance(array, np.ndarray) or array.dtype != dtype or array.shape != shape \
            or not array.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous {np.dtype(dtype)} array of shape {shape}")
    return <uintptr_t>array.ctypes.data


class ContextFull(Exception):
    pass


class BadBatch(Exception):
    pass


def matrix_dtype(w) -> str:
    """The engine dtype of a matrix: an int8 one is an object with .values and .scales."""
    if hasattr(w, "scales"):
        return "int8"
    return "bfloat16" if w.dtype == np.uint16 else "float32"


cdef int _set_matrix(NeoMatrix *m, object w, int rows, int cols, str name) except -1:
    """Points m at a weight matrix after checking its type and shape."""
    dtype = matrix_dtype(w)
    m.dtype = DTYPES[dtype]
    m.scales = NULL
    if dtype == "int8":
        blocks = (cols + NEO_I8_BLOCK - 1) // NEO_I8_BLOCK
        m.data = <const void *>_address(w.values, np.int8, (rows, cols), name)
        m.scales = <const float *>_address(w.scales, np.float32, (rows, blocks), name + " scales")
    else:
        m.data = <const void *>_address(w, MATRIX_NUMPY_DTYPE[dtype], (rows, cols), name)
    return 0


cdef class Core:
    """The model's weights and a run state with n_seqs sequence slots. step() runs one forward
    step over a batch of (sequence, token) rows: the single Python -> C call of a step."""
    cdef NeoConfig cfg
    cdef NeoWeights weights
    cdef NeoLayerWeights *layers
    cdef NeoState *state
    cdef object keep_alive
    cdef public str isa
    cdef public str compute
    cdef public int threads

    def __cinit__(self):
        self.layers = NULL
        self.state = NULL

    def __init__(self, shape: dict, weights: dict, int n_seqs, int n_ctx, int max_rows,
                 int threads, str isa, str compute="exact"):
        """shape: hidden, n_layers, n_heads, ffn, vocab, max_positions, window, ln_eps,
        layer_is_local (uint8 array). weights: wte, wpe, lnf_w, lnf_b, layers (list of dicts);
        matrices are float32, bf16 as uint16, or int8 objects with .values and .scales.
        compute: "exact", or "bf16" on a path with a bf16 GEMM (see BF16_GEMMS)."""
        cdef int H = shape["hidden"], F = shape["ffn"], L = shape["n_layers"]
        cdef int V = shape["vocab"], P = shape["max_positions"]
        cdef NeoIsa path = _check_isa(isa)
        cdef NeoBf16Gemm gemm = _check_compute(compute, isa)
        _check_threads(threads)
        if not 1 <= n_ctx <= P:
            raise ValueError(f"n_ctx must be between 1 and {P}")
        f32 = np.float32
        local = np.ascontiguousarray(shape["layer_is_local"], dtype=np.uint8)
        self.keep_alive = [local, weights]
        self.isa = isa
        self.compute = compute
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

        _set_matrix(&self.weights.wte, weights["wte"], V, H, "wte")
        _set_matrix(&self.weights.wpe, weights["wpe"], P, H, "wpe")
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
            _set_matrix(&self.layers[i].q, lw["q_w"], H, H, f"h.{i}.q_proj.weight")
            _set_matrix(&self.layers[i].k, lw["k_w"], H, H, f"h.{i}.k_proj.weight")
            _set_matrix(&self.layers[i].v, lw["v_w"], H, H, f"h.{i}.v_proj.weight")
            _set_matrix(&self.layers[i].out, lw["out_w"], H, H, f"h.{i}.out_proj.weight")
            self.layers[i].out_b = <const float *>_address(lw["out_b"], f32, (H,), f"h.{i}.out_proj.bias")
            self.layers[i].ln2_w = <const float *>_address(lw["ln2_w"], f32, (H,), f"h.{i}.ln_2.weight")
            self.layers[i].ln2_b = <const float *>_address(lw["ln2_b"], f32, (H,), f"h.{i}.ln_2.bias")
            _set_matrix(&self.layers[i].fc, lw["fc_w"], F, H, f"h.{i}.c_fc.weight")
            self.layers[i].fc_b = <const float *>_address(lw["fc_b"], f32, (F,), f"h.{i}.c_fc.bias")
            _set_matrix(&self.layers[i].proj, lw["proj_w"], H, F, f"h.{i}.c_proj.weight")
            self.layers[i].proj_b = <const float *>_address(lw["proj_b"], f32, (H,), f"h.{i}.c_proj.bias")
        self.weights.layers = self.layers
        self.state = neo_state_new(&self.cfg, n_seqs, n_ctx, max_rows, threads, path, gemm)
        if self.state == NULL:
            raise MemoryError("could not allocate the run state")

    def __dealloc__(self):
        neo_state_free(self.state)
        free(self.layers)

    @property
    def n_ctx(self) -> int:
        return self.state.n_ctx

    @property
    def n_seqs(self) -> int:
        return self.state.n_seqs

    @property
    def max_rows(self) -> int:
        return self.state.max_rows

    @property
    def cache_dtype(self) -> str:
        """What the key/value cache holds (the state's choice, by compute mode)."""
        return next(name for name, value in DTYPES.items() if value == self.state.cache_dtype)

    def length(self, int seq) -> int:
        """Tokens sequence seq holds."""
        if not 0 <= seq < self.state.n_seqs:
            raise IndexError(f"no sequence slot {seq}")
        return self.state.seq[seq].len

    def clear(self, int seq) -> None:
        """Forgets sequence seq and hands back its cache memory."""
        if not 0 <= seq < self.state.n_seqs:
            raise IndexError(f"no sequence slot {seq}")
        neo_seq_clear(self.state, seq)

    def step(self, const int32_t[::1] tokens, const int32_t[::1] seqs,
             const uint8_t[::1] want_logits, float[:, ::1] logits) -> None:
        """One forward step: row r appends tokens[r] to sequence seqs[r] (a sequence's rows
        consecutive); logits gets a row for each row with want_logits set, in order."""
        cdef NeoBatch batch
        cdef int n = tokens.shape[0], r, wanted = 0
        if seqs.shape[0] != n or want_logits.shape[0] != n:
            raise ValueError("tokens, seqs and want_logits differ in length")
        if n == 0:
            return
        for r in range(n):
            wanted += want_logits[r] != 0
        if logits.shape[0] < wanted or logits.shape[1] != self.cfg.vocab:
            raise ValueError(f"logits buffer must be at least [{wanted}, {self.cfg.vocab}]")
        batch.n_rows = n
        batch.tokens = &tokens[0]
        batch.seqs = &seqs[0]
        batch.want_logits = &want_logits[0]
        cdef int rc
        with nogil:
            rc = neo_step(&self.cfg, &self.weights, self.state, &batch, &logits[0, 0])
        if rc == NEO_ERR_CONTEXT_FULL:
            raise ContextFull(f"a sequence would run past the context of {self.state.n_ctx}")
        if rc == NEO_ERR_BAD_TOKEN:
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab})")
        if rc == NEO_ERR_BAD_BATCH:
            raise BadBatch(f"a batch takes at most {self.state.max_rows} rows, sequence slots "
                           f"0..{self.state.n_seqs - 1}, and each sequence's rows together")
        if rc == NEO_ERR_NO_MEMORY:
            raise MemoryError("no memory for a sequence's key/value cache")
        if rc != NEO_OK:
            raise RuntimeError(f"neo_step failed with code {rc}")


def matmul(float[:, ::1] out, const float[:, ::1] x, w, const float[::1] bias, bint accumulate,
           int threads, str isa, str kernel="gemm") -> None:
    """out (+)= bias + x @ w.T with the chosen kernel path; kernel is "gemm" (prefill),
    "matvec" (path's decode kernel), "decode" (what a model on path decodes with: see
    decode_kernel), "bf16" (the bf16 compute mode's prefill GEMM) or "bf16-matvec" (its
    decode kernel); w as Core takes it."""
    cdef int T = x.shape[0], K = x.shape[1]
    cdef int N = (w.values if hasattr(w, "scales") else w).shape[0]
    cdef NeoMatrix m
    _set_matrix(&m, w, N, K, "w")
    if out.shape[0] != T or out.shape[1] != N:
        raise ValueError("out must be [T, N]")
    if bias is not None and bias.shape[0] != N:
        raise ValueError("bias must be [N]")
    cdef NeoIsa path = _check_isa(isa)
    _check_threads(threads)
    if kernel not in ("gemm", "matvec", "decode", "bf16", "bf16-matvec"):
        raise ValueError(f"unknown kernel {kernel!r}")
    cdef NeoBf16Gemm gemm = _check_compute("bf16" if kernel.startswith("bf16") else "exact", isa)
    cdef const float *bp = &bias[0] if bias is not None else NULL
    cdef bint decode = kernel.endswith("matvec")
    cdef bint engine_decode = kernel == "decode"
    cdef NeoProjection projection = NeoProjection(&out[0, 0], &m, bp, N)
    with nogil:
        if decode and gemm != NEO_BF16_OFF:
            matvec_bf16_projections(&projection, 1, &x[0, 0], T, K, accumulate, threads, gemm)
        elif engine_decode:
            neo_decode_projections(&projection, 1, &x[0, 0], T, K, accumulate, threads, path)
        elif decode:
            matvec_forward(&out[0, 0], &x[0, 0], &m, bp, T, K, N, accumulate, threads, path)
        elif gemm != NEO_BF16_OFF:
            matmul_bf16_forward(&out[0, 0], &x[0, 0], &m, bp, T, K, N, accumulate, threads, gemm)
        else:
            matmul_forward(&out[0, 0], &x[0, 0], &m, bp, T, K, N, accumulate, threads, path)


def matvec_projections(list outs, const float[:, ::1] x, list ws, list biases, bint accumulate,
                       int threads, str isa) -> None:
    """outs[i] (+)= biases[i] + x @ ws[i].T for every i, in one decode pass as q, k and v run;
    each weight as matmul takes it, each bias an fp32 vector or None."""
    cdef int T = x.shape[0], K = x.shape[1], n = len(ws), i, N
    if len(outs) != n or len(biases) != n:
        raise ValueError("outs, ws and biases need one entry per matrix")
    cdef NeoIsa path = _check_isa(isa)
    _check_threads(threads)
    cdef NeoMatrix *m = <NeoMatrix *>calloc(max(n, 1), sizeof(NeoMatrix))
    cdef NeoProjection *p = <NeoProjection *>calloc(max(n, 1), sizeof(NeoProjection))
    cdef float[:, ::1] out
    cdef const float[::1] bias
    try:
        if not m or not p:
            raise MemoryError()
        for i in range(n):
            N = (ws[i].values if hasattr(ws[i], "scales") else ws[i]).shape[0]
            _set_matrix(&m[i], ws[i], N, K, f"ws[{i}]")
            out = outs[i]
            if out.shape[0] != T or out.shape[1] != N:
                raise ValueError(f"outs[{i}] must be [T, N]")
            p[i].out, p[i].w, p[i].N, p[i].bias = &out[0, 0], &m[i], N, NULL
            if biases[i] is not None:
                bias = biases[i]
                if bias.shape[0] != N:
                    raise ValueError(f"biases[{i}] must be [N]")
                p[i].bias = &bias[0]
        with nogil:
            c_matvec_projections(p, n, &x[0, 0], T, K, accumulate, threads, path)
    finally:
        free(m)
        free(p)


def gelu_new(float[::1] x, int threads, str isa) -> None:
    """x = gelu_new(x) in place with the chosen kernel path."""
    cdef NeoIsa path = _check_isa(isa)
    _check_threads(threads)
    if x.shape[0]:
        with nogil:
            gelu_new_forward(&x[0], x.shape[0], threads, path)


def f32_to_bf16(unsigned short[::1] dst, const float[::1] src, int threads) -> bool:
    """dst = bfloat16 bits of src (round to nearest even); True if any value was rounded."""
    _check_threads(threads)
    if dst.shape[0] != src.shape[0]:
        raise ValueError("dst and src differ in length")
    cdef int rounded = 0
    if src.shape[0]:
        with nogil:
            rounded = neo_f32_to_bf16(&dst[0], &src[0], src.shape[0], threads)
    return bool(rounded)


def quantize_i8(signed char[:, ::1] values, float[:, ::1] scales, const float[:, ::1] src,
                int threads) -> bool:
    """values, scales = src in int8 blocks of I8_BLOCK (see neo_quantize_i8); False if src
    holds a NaN or an infinity."""
    _check_threads(threads)
    cdef Py_ssize_t rows = src.shape[0], cols = src.shape[1]
    if values.shape[0] != rows or values.shape[1] != cols \
            or scales.shape[0] != rows or scales.shape[1] != (cols + NEO_I8_BLOCK - 1) // NEO_I8_BLOCK:
        raise ValueError("values must be [rows, cols] and scales [rows, ceil(cols / I8_BLOCK)]")
    cdef int finite = 1
    if rows and cols:
        with nogil:
            finite = neo_quantize_i8(&values[0, 0], &scales[0, 0], &src[0, 0], <size_t>rows,
                                     <size_t>cols, threads)
    return bool(finite)
