/* forward.c: the run state (sequence slots and their caches) and one forward step of GPT-Neo
 * over a batch of rows, top to bottom. */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include "internal.h"

/* The step's order of rows: sequences with a single row first (they run through the decode
 * kernels), then those with several (the prefill kernels). Built and checked before anything
 * is written, so a refused batch leaves the state as it was. */
typedef struct {
    Segment *segments;      /* [max_rows], in step order */
    int n_segments;
    int n_single;           /* rows (= segments) of single-row sequences, first in step order */
    int32_t *row_segment;   /* [max_rows] step row -> its segment */
    int32_t *tokens;        /* [max_rows] in step order */
    int32_t *positions;     /* [max_rows] */
    int32_t *logit_rows;    /* [max_rows] step rows whose logits are wanted: see plan_logits */
    int32_t *logit_dest;    /* [max_rows] where each of them goes among the wanted rows */
    int n_logits;
    int n_logits_decode;    /* the first of them, which the decode kernel computes */
    uint8_t *seen;          /* [n_seqs] scratch: sequences met so far while planning */
    float *spare_row;       /* [vocab] for putting logit rows into batch order */
} StepPlan;

static int cache_slots(const NeoConfig *c, int layer, int n_ctx)
{
    /* A local layer never looks back further than its window: a ring of that many slots. */
    return c->layer_is_local[layer] && c->window < n_ctx ? c->window : n_ctx;
}

/* Bytes of one layer's keys (or values) in a sequence's cache */
static size_t layer_cache_bytes(const NeoState *s, int layer)
{
    return (size_t)s->cache_slots[layer] * s->hidden * dtype_bytes(s->cache_dtype);
}

static size_t sequence_cache_bytes(const NeoState *s)
{
    size_t bytes = 0;
    for (int l = 0; l < s->n_layers; l++) bytes += 2 * layer_cache_bytes(s, l);
    return bytes;
}

/* One anonymous mapping per sequence: the kernel backs a page only once it is written, and
 * munmap hands it all back (malloc would keep freed memory, and zero it on reuse). Not in huge
 * pages: where transparent huge pages are on for every mapping (THP "always"), a first token,
 * which writes a little of every head's block, would fault in 2 MiB around each, and a
 * sequence of one token would take most of a full context's memory. */
static int sequence_map(NeoState *s, NeoSequence *q)
{
    const size_t bytes = sequence_cache_bytes(s);
    void *base = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return 0;
#ifdef MADV_NOHUGEPAGE
    (void)madvise(base, bytes, MADV_NOHUGEPAGE);  /* advice only: may be refused */
#endif
    char *next = base;
    for (int l = 0; l < s->n_layers; l++) {
        q->key_cache[l] = next;
        next += layer_cache_bytes(s, l);
        q->value_cache[l] = next;
        next += layer_cache_bytes(s, l);
    }
    return 1;
}

void neo_seq_clear(NeoState *s, int seq)
{
    if (!s || seq < 0 || seq >= s->n_seqs) return;
    NeoSequence *q = &s->seq[seq];
    if (q->key_cache && q->key_cache[0]) {
        munmap(q->key_cache[0], sequence_cache_bytes(s));
        memset(q->key_cache, 0, sizeof(void *) * s->n_layers);
        memset(q->value_cache, 0, sizeof(void *) * s->n_layers);
    }
    q->len = 0;
}

static void plan_free(StepPlan *p)
{
    if (!p) return;
    free(p->segments);
    free(p->row_segment);
    free(p->tokens);
    free(p->positions);
    free(p->logit_rows);
    free(p->logit_dest);
    free(p->seen);
    free(p->spare_row);
    free(p);
}

static StepPlan *plan_new(int max_rows, int n_seqs, int vocab)
{
    StepPlan *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->segments = calloc(max_rows, sizeof(Segment));
    p->row_segment = calloc(max_rows, sizeof(int32_t));
    p->tokens = calloc(max_rows, sizeof(int32_t));
    p->positions = calloc(max_rows, sizeof(int32_t));
    p->logit_rows = calloc(max_rows, sizeof(int32_t));
    p->logit_dest = calloc(max_rows, sizeof(int32_t));
    p->seen = calloc(n_seqs, 1);
    p->spare_row = calloc(vocab, sizeof(float));
    if (!(p->segments && p->row_segment && p->tokens && p->positions && p->logit_rows
          && p->logit_dest && p->seen && p->spare_row)) {
        plan_free(p);
        return NULL;
    }
    return p;
}

void neo_state_free(NeoState *s)
{
    if (!s) return;
    float *buffers[] = {s->x, s->xn, s->q, s->k, s->v, s->att, s->h, s->scores};
    for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) free(buffers[i]);
    for (int i = 0; s->seq && i < s->n_seqs; i++) {
        neo_seq_clear(s, i);
        free(s->seq[i].key_cache);
        free(s->seq[i].value_cache);
    }
    free(s->seq);
    free(s->cache_slots);
    plan_free(s->plan);
    free(s);
}

NeoState *neo_state_new(const NeoConfig *c, int n_seqs, int n_ctx, int max_rows, int n_threads,
                        NeoIsa isa, NeoBf16Gemm bf16_gemm)
{
    if (n_seqs < 1 || max_rows < 1 || n_ctx < 1 || n_ctx > c->max_positions) return NULL;
    NeoState *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->n_seqs = n_seqs;
    s->n_ctx = n_ctx;
    s->max_rows = max_rows;
    s->n_threads = n_threads;
    s->isa = isa;
    s->bf16_gemm = bf16_gemm;
    s->cache_dtype = bf16_gemm != NEO_BF16_OFF ? NEO_BF16 : NEO_F32;
    s->n_layers = c->n_layers;
    s->hidden = c->hidden;
    size_t act = (size_t)max_rows * c->hidden;
    s->x = calloc(act, sizeof(float));
    s->xn = calloc(act, sizeof(float));
    s->q = calloc(act, sizeof(float));
    s->k = calloc(act, sizeof(float));
    s->v = calloc(act, sizeof(float));
    s->att = calloc(act, sizeof(float));
    s->h = calloc((size_t)max_rows * c->ffn, sizeof(float));
    s->scores = calloc(n_threads * attention_scratch_floats(n_ctx, c->head_dim), sizeof(float));
    s->cache_slots = calloc(c->n_layers, sizeof(int));
    s->seq = calloc(n_seqs, sizeof(NeoSequence));
    s->plan = plan_new(max_rows, n_seqs, c->vocab);
    int ok = s->x && s->xn && s->q && s->k && s->v && s->att && s->h && s->scores
          && s->cache_slots && s->seq && s->plan;
    for (int l = 0; ok && l < c->n_layers; l++) s->cache_slots[l] = cache_slots(c, l, n_ctx);
    for (int i = 0; ok && i < n_seqs; i++) {
        s->seq[i].key_cache = calloc(c->n_layers, sizeof(void *));
        s->seq[i].value_cache = calloc(c->n_layers, sizeof(void *));
        ok = s->seq[i].key_cache && s->seq[i].value_cache;
    }
    if (!ok) {
        neo_state_free(s);
        return NULL;
    }
    return s;
}

/* The wanted rows (rank[row] >= 0: their place among the wanted), in two groups: first the
 * last row of every segment, the row a sequence's next token is drawn from, which the decode
 * kernel computes whatever else the step holds or the request asked (a prompt's last row then
 * gets the bits of a decode step, and the lm_head is streamed once rather than widened into
 * GEMM panels for a single row); then the other wanted rows (a scored prompt's), which the
 * prefill kernel computes. */
static void plan_logits(StepPlan *p, const int32_t *rank, int n_rows)
{
    p->n_logits = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (int row = 0; row < n_rows; row++) {
            const Segment *sg = &p->segments[p->row_segment[row]];
            const int last = row == sg->row0 + sg->n_rows - 1;
            if (rank[row] < 0 || last != (pass == 0)) continue;
            p->logit_rows[p->n_logits] = row;
            p->logit_dest[p->n_logits++] = rank[row];
        }
        if (pass == 0) p->n_logits_decode = p->n_logits;
    }
}

/* Splits the batch into segments, checks it, and orders the rows for the step. */
static int plan_step(const NeoConfig *c, NeoState *s, const NeoBatch *b)
{
    StepPlan *p = s->plan;
    if (b->n_rows > s->max_rows) return NEO_ERR_BAD_BATCH;
    for (int r = 0; r < b->n_rows; r++) {
        if (b->tokens[r] < 0 || b->tokens[r] >= c->vocab) return NEO_ERR_BAD_TOKEN;
        if (b->seqs[r] < 0 || b->seqs[r] >= s->n_seqs) return NEO_ERR_BAD_BATCH;
    }
    /* Runs of equal sequence ids, in batch order; a sequence may own only one run. */
    Segment runs[b->n_rows];
    int n_runs = 0;
    for (int r = 0; r < b->n_rows; r++) {
        if (r > 0 && b->seqs[r] == b->seqs[r - 1]) {
            runs[n_runs - 1].n_rows++;
            continue;
        }
        if (p->seen[b->seqs[r]]) {  /* seen in an earlier run: undo the marks and refuse */
            for (int i = 0; i < n_runs; i++) p->seen[runs[i].seq] = 0;
            return NEO_ERR_BAD_BATCH;
        }
        p->seen[b->seqs[r]] = 1;
        runs[n_runs++] = (Segment){b->seqs[r], s->seq[b->seqs[r]].len, r, 1};
    }
    int status = NEO_OK;
    for (int i = 0; i < n_runs; i++) {
        p->seen[runs[i].seq] = 0;
        if (runs[i].pos0 + runs[i].n_rows > s->n_ctx) status = NEO_ERR_CONTEXT_FULL;
    }
    if (status != NEO_OK) return status;
    for (int i = 0; i < n_runs; i++) {
        NeoSequence *q = &s->seq[runs[i].seq];
        if (!q->key_cache[0] && !sequence_map(s, q)) return NEO_ERR_NO_MEMORY;
    }

    /* Step order: single-row segments, then the rest, each group in batch order. row0 of a
     * run is its first batch row until it is given its step row here. */
    int row = 0, wanted_before = 0;
    p->n_segments = 0;
    int32_t wanted_rank[b->n_rows], step_rank[b->n_rows];
    for (int r = 0; r < b->n_rows; r++) wanted_rank[r] = b->want_logits[r] ? wanted_before++ : -1;
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < n_runs; i++) {
            const int single = runs[i].n_rows == 1;
            if (single != (pass == 0)) continue;
            Segment sg = runs[i];
            const int batch_row0 = sg.row0;
            sg.row0 = row;
            p->segments[p->n_segments] = sg;
            for (int t = 0; t < sg.n_rows; t++, row++) {
                p->row_segment[row] = p->n_segments;
                p->tokens[row] = b->tokens[batch_row0 + t];
                p->positions[row] = sg.pos0 + t;
                step_rank[row] = wanted_rank[batch_row0 + t];
            }
            p->n_segments++;
        }
        if (pass == 0) p->n_single = row;
    }
    plan_logits(p, step_rank, row);
    return NEO_OK;
}

/* rows [T][n_heads * head_dim] into the head-major cache [n_heads][slots][head_dim] of dtype
 * (for NEO_BF16 the rows hold bf16 values already: the conversion only drops zero bits) */
static void cache_store(void *cache, NeoDType dtype, int slots, const float *rows, int pos0, int T,
                        int n_heads, int head_dim)
{
    for (int t = 0; t < T; t++) {
        const int slot = (pos0 + t) % slots;
        for (int h = 0; h < n_heads; h++) {
            const float *row = rows + (size_t)t * n_heads * head_dim + (size_t)h * head_dim;
            const size_t at = ((size_t)h * slots + slot) * head_dim;
            if (dtype == NEO_BF16)
                for (int d = 0; d < head_dim; d++) ((uint16_t *)cache)[at + d] = f32_to_bf16_bits(row[d]);
            else
                memcpy((float *)cache + at, row, sizeof(float) * head_dim);
        }
    }
}

/* For each projection, out (+)= bias + x @ w.T over n_rows rows: the first n_decode through the
 * decode kernel (on the SIMD paths every projection in one parallel region), the others
 * through the prefill kernel (in bf16 if the state computes so). Callers choose the split by
 * what a row is (in a layer: a single-row sequence's row), never by what else is in the batch,
 * so a row's sums never depend on the batch. */
static void linear(const NeoState *s, const NeoProjection *proj, int n_proj, const float *x,
                   int n_rows, int n_decode, int K, int accumulate)
{
    if (n_decode > 0 && neo_bf16_decodes(s->bf16_gemm))
        matvec_bf16_projections(proj, n_proj, x, n_decode, K, accumulate, s->n_threads, s->bf16_gemm);
    else if (n_decode > 0)
        neo_decode_projections(proj, n_proj, x, n_decode, K, accumulate, s->n_threads, s->isa);
    if (n_rows == n_decode) return;
    x += (size_t)n_decode * K;
    for (const NeoProjection *p = proj; p < proj + n_proj; p++) {
        float *out = p->out + (size_t)n_decode * p->N;
        if (s->bf16_gemm != NEO_BF16_OFF)
            matmul_bf16_forward(out, x, p->w, p->bias, n_rows - n_decode, K, p->N, accumulate,
                                s->n_threads, s->bf16_gemm);
        else
            matmul_forward(out, x, p->w, p->bias, n_rows - n_decode, K, p->N, accumulate,
                           s->n_threads, s->isa);
    }
}

/* The planned rows through every layer; leaves the final hidden states in s->x. */
static void forward_rows(const NeoConfig *c, const NeoWeights *w, NeoState *s, const StepPlan *p,
                         int T)
{
    const int C = c->hidden, S = p->n_single, nt = s->n_threads;
    embedding_forward(s->x, p->tokens, p->positions, T, &w->wte, &w->wpe, C);
    for (int l = 0; l < c->n_layers; l++) {
        const NeoLayerWeights *L = &w->layers[l];
        const int slots = s->cache_slots[l];
        const int window = c->layer_is_local[l] ? c->window : 0;

        /* x += out_proj(attention(ln_1(x))) */
        layernorm_forward(s->xn, s->x, L->ln1_w, L->ln1_b, T, C, c->ln_eps, nt);
        const NeoProjection qkv[] = {{s->q, &L->q, NULL, C}, {s->k, &L->k, NULL, C}, {s->v, &L->v, NULL, C}};
        linear(s, qkv, 3, s->xn, T, S, C, 0);
        if (s->cache_dtype == NEO_BF16) {  /* as the cache will hold them (attention_forward) */
            round_to_bf16(s->k, (size_t)T * C, nt);
            round_to_bf16(s->v, (size_t)T * C, nt);
        }
        attention_forward(s->att, s->q, s->k, s->v, s->seq, s->cache_dtype, l, slots, p->segments,
                          p->row_segment, T, S, c->n_heads, c->head_dim, window, s->scores,
                          s->n_ctx, nt, s->isa);
        for (int i = 0; i < p->n_segments; i++) {
            const Segment *sg = &p->segments[i];
            const size_t first = (size_t)sg->row0 * C;
            NeoSequence *seq = &s->seq[sg->seq];
            cache_store(seq->key_cache[l], s->cache_dtype, slots, s->k + first, sg->pos0, sg->n_rows,
                        c->n_heads, c->head_dim);
            cache_store(seq->value_cache[l], s->cache_dtype, slots, s->v + first, sg->pos0,
                        sg->n_rows, c->n_heads, c->head_dim);
        }
        linear(s, &(NeoProjection){s->x, &L->out, L->out_b, C}, 1, s->att, T, S, C, 1);

        /* x += c_proj(gelu_new(c_fc(ln_2(x)))) */
        layernorm_forward(s->xn, s->x, L->ln2_w, L->ln2_b, T, C, c->ln_eps, nt);
        linear(s, &(NeoProjection){s->h, &L->fc, L->fc_b, c->ffn}, 1, s->xn, T, S, C, 0);
        gelu_new_forward(s->h, (size_t)T * c->ffn, nt, s->isa);
        linear(s, &(NeoProjection){s->x, &L->proj, L->proj_b, C}, 1, s->h, T, S, c->ffn, 1);
    }
}

/* logits = ln_f(x) @ wte.T for the wanted rows, then each row moved to its batch place. */
static void logits_forward(const NeoConfig *c, const NeoWeights *w, NeoState *s,
                           const StepPlan *p, float *logits)
{
    const int C = c->hidden, V = c->vocab;
    for (int i = 0; i < p->n_logits; i++)
        memcpy(s->att + (size_t)i * C, s->x + (size_t)p->logit_rows[i] * C, sizeof(float) * C);
    layernorm_forward(s->xn, s->att, w->lnf_w, w->lnf_b, p->n_logits, C, c->ln_eps, s->n_threads);
    linear(s, &(NeoProjection){logits, &w->wte, NULL, V}, 1, s->xn, p->n_logits, p->n_logits_decode, C, 0);
    /* Row i belongs at logit_dest[i]: follow each cycle of the permutation once. */
    char done[p->n_logits];
    memset(done, 0, sizeof done);
    for (int i = 0; i < p->n_logits; i++) {
        if (done[i] || p->logit_dest[i] == i) continue;
        memcpy(p->spare_row, logits + (size_t)i * V, sizeof(float) * V);
        int at = i;
        do {  /* the spare row holds what was at `at`; put it where it belongs */
            const int to = p->logit_dest[at];
            float *dst = logits + (size_t)to * V;
            for (int j = 0; j < V; j++) {
                const float kept = dst[j];
                dst[j] = p->spare_row[j];
                p->spare_row[j] = kept;
            }
            done[at] = 1;
            at = to;
        } while (at != i);
    }
}

int neo_step(const NeoConfig *c, const NeoWeights *w, NeoState *s, const NeoBatch *batch,
             float *logits)
{
    if (batch->n_rows <= 0) return NEO_OK;
    int status = plan_step(c, s, batch);
    if (status != NEO_OK) return status;
    const StepPlan *p = s->plan;
    forward_rows(c, w, s, p, batch->n_rows);
    for (int i = 0; i < p->n_segments; i++) s->seq[p->segments[i].seq].len += p->segments[i].n_rows;
    if (p->n_logits) logits_forward(c, w, s, p, logits);
    return NEO_OK;
}
