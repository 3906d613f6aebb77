/* forward.c: the run state and one forward step of GPT-Neo, top to bottom. */
#include <stdlib.h>
#include <string.h>
#include "internal.h"

static int cache_slots(const NeoConfig *c, int layer, int n_ctx)
{
    /* A local layer never looks back further than its window: a ring of that many slots. */
    return c->layer_is_local[layer] && c->window < n_ctx ? c->window : n_ctx;
}

void neo_state_free(NeoState *s)
{
    if (!s) return;
    float *buffers[] = {s->x, s->xn, s->q, s->k, s->v, s->att, s->h, s->scores};
    for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) free(buffers[i]);
    for (int l = 0; l < s->n_layers; l++) {  /* either table may be missing after a failed new */
        if (s->key_cache) free(s->key_cache[l]);
        if (s->value_cache) free(s->value_cache[l]);
    }
    free(s->key_cache);
    free(s->value_cache);
    free(s->cache_slots);
    free(s);
}

NeoState *neo_state_new(const NeoConfig *c, int n_ctx, int chunk, int n_threads, NeoIsa isa)
{
    NeoState *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->n_ctx = n_ctx;
    s->chunk = chunk;
    s->n_threads = n_threads;
    s->isa = isa;
    s->n_layers = c->n_layers;
    size_t act = (size_t)chunk * c->hidden;
    /* calloc: cache pages are only backed by memory once a position is written. */
    s->x = calloc(act, sizeof(float));
    s->xn = calloc(act, sizeof(float));
    s->q = calloc(act, sizeof(float));
    s->k = calloc(act, sizeof(float));
    s->v = calloc(act, sizeof(float));
    s->att = calloc(act, sizeof(float));
    s->h = calloc((size_t)chunk * c->ffn, sizeof(float));
    s->scores = calloc((size_t)n_threads * n_ctx, sizeof(float));
    s->key_cache = calloc(c->n_layers, sizeof(float *));
    s->value_cache = calloc(c->n_layers, sizeof(float *));
    s->cache_slots = calloc(c->n_layers, sizeof(int));
    int ok = s->x && s->xn && s->q && s->k && s->v && s->att && s->h && s->scores
          && s->key_cache && s->value_cache && s->cache_slots;
    for (int l = 0; ok && l < c->n_layers; l++) {
        s->cache_slots[l] = cache_slots(c, l, n_ctx);
        s->key_cache[l] = calloc((size_t)s->cache_slots[l] * c->hidden, sizeof(float));
        s->value_cache[l] = calloc((size_t)s->cache_slots[l] * c->hidden, sizeof(float));
        ok = s->key_cache[l] && s->value_cache[l];
    }
    if (!ok) {
        neo_state_free(s);
        return NULL;
    }
    return s;
}

/* rows [T][n_heads * head_dim] into the head-major cache [n_heads][slots][head_dim] */
static void cache_store(float *cache, int slots, const float *rows, int pos0, int T, int n_heads,
                        int head_dim)
{
    for (int t = 0; t < T; t++) {
        const int slot = (pos0 + t) % slots;
        for (int h = 0; h < n_heads; h++)
            memcpy(cache + ((size_t)h * slots + slot) * head_dim,
                   rows + (size_t)t * n_heads * head_dim + (size_t)h * head_dim, sizeof(float) * head_dim);
    }
}

/* T tokens at positions pos0.. through every layer; leaves the final hidden states in s->x. */
static void forward_chunk(const NeoConfig *c, const NeoWeights *w, NeoState *s,
                          const int32_t *tokens, int T, int pos0)
{
    const int C = c->hidden, nt = s->n_threads;
    const NeoIsa isa = s->isa;
    embedding_forward(s->x, tokens, T, pos0, w->wte, w->wpe, w->dtype, C);
    for (int l = 0; l < c->n_layers; l++) {
        const NeoLayerWeights *L = &w->layers[l];
        const int slots = s->cache_slots[l];
        const int window = c->layer_is_local[l] ? c->window : 0;

        /* x += out_proj(attention(ln_1(x))) */
        layernorm_forward(s->xn, s->x, L->ln1_w, L->ln1_b, T, C, c->ln_eps, nt);
        matmul_forward(s->q, s->xn, L->q_w, w->dtype, NULL, T, C, C, 0, nt, isa);
        matmul_forward(s->k, s->xn, L->k_w, w->dtype, NULL, T, C, C, 0, nt, isa);
        matmul_forward(s->v, s->xn, L->v_w, w->dtype, NULL, T, C, C, 0, nt, isa);
        attention_forward(s->att, s->q, s->k, s->v, s->key_cache[l], s->value_cache[l], slots,
                          pos0, T, c->n_heads, c->head_dim, window, s->scores, s->n_ctx, nt, isa);
        cache_store(s->key_cache[l], slots, s->k, pos0, T, c->n_heads, c->head_dim);
        cache_store(s->value_cache[l], slots, s->v, pos0, T, c->n_heads, c->head_dim);
        matmul_forward(s->x, s->att, L->out_w, w->dtype, L->out_b, T, C, C, 1, nt, isa);

        /* x += c_proj(gelu_new(c_fc(ln_2(x)))) */
        layernorm_forward(s->xn, s->x, L->ln2_w, L->ln2_b, T, C, c->ln_eps, nt);
        matmul_forward(s->h, s->xn, L->fc_w, w->dtype, L->fc_b, T, C, c->ffn, 0, nt, isa);
        gelu_new_forward(s->h, (size_t)T * c->ffn, nt, isa);
        matmul_forward(s->x, s->h, L->proj_w, w->dtype, L->proj_b, T, c->ffn, C, 1, nt, isa);
    }
}

int neo_forward(const NeoConfig *c, const NeoWeights *w, NeoState *s,
                const int32_t *tokens, int n, float *logits, int all_logits)
{
    if (n <= 0) return NEO_OK;
    if (n > s->n_ctx - s->pos) return NEO_ERR_CONTEXT_FULL;
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= c->vocab) return NEO_ERR_BAD_TOKEN;

    const int C = c->hidden;
    for (int done = 0; done < n;) {
        const int T = n - done < s->chunk ? n - done : s->chunk;
        forward_chunk(c, w, s, tokens + done, T, s->pos);
        s->pos += T;
        done += T;
        /* Logits only where asked: every position, or the last one of the last chunk. */
        const int first = all_logits ? 0 : (done == n ? T - 1 : T);
        if (first < T) {
            float *dst = all_logits ? logits + (size_t)(done - T) * c->vocab : logits;
            layernorm_forward(s->xn, s->x + (size_t)first * C, w->lnf_w, w->lnf_b, T - first, C,
                              c->ln_eps, s->n_threads);
            matmul_forward(dst, s->xn, w->wte, w->dtype, NULL, T - first, C, c->vocab, 0,
                           s->n_threads, s->isa);
        }
    }
    return NEO_OK;
}
