/* MARK's fused Mamba-2 decoding step for the CPU (float32), called through ctypes by
 * src/mamba/native.py, which compiles this file once per machine (cc -O3 -march=native
 * -fopenmp) and caches the shared library.
 *
 * One call runs `steps` tokens for `batch` sequences: every layer (RMSNorm, in_proj,
 * causal depthwise conv, selective state update, gated RMSNorm, out_proj, residual), the
 * final norm, the LM head, and, for greedy decoding, the argmax that feeds the next step.
 * The whole call is one OpenMP parallel region: the threads split the rows of each matrix
 * and the channels of each elementwise phase, and meet at a barrier between phases (four
 * per layer), so a token costs no thread start-up, no allocation and no Python.
 *
 * The arithmetic is that of MambaLM.step_ (src/mamba/model.py) in float32; only the order
 * of the additions inside the dot products differs, as it does between any two BLAS.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

enum { /* dims[] */
    DIM_D_MODEL, DIM_LAYERS, DIM_HEADS, DIM_HEAD_DIM, DIM_STATE, DIM_GROUPS, DIM_KERNEL, DIM_VOCAB, DIM_COUNT
};
enum { /* weights[]: three model-wide pointers, then PER_LAYER per layer */
    W_EMBED, W_HEAD, W_NORM_F, W_MODEL
};
enum {
    L_NORM, L_IN_PROJ, L_CONV_W, L_CONV_B, L_DT_BIAS, L_A, L_D, L_GATED_NORM, L_OUT_PROJ, PER_LAYER
};

#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
typedef float vec __attribute__((vector_size(LANES * sizeof(float)), aligned(4)));

#define TILE (4 * LANES) /* output columns per packed tile */

/* The width of a packed tile, for native.py, which packs the weights. */
int mark_tile(void) { return TILE; }

static inline void store_tile(float *dst, vec a0, vec a1, vec a2, vec a3, int width) {
    float out[TILE];
    memcpy(out, &a0, sizeof a0);
    memcpy(out + LANES, &a1, sizeof a1);
    memcpy(out + 2 * LANES, &a2, sizeof a2);
    memcpy(out + 3 * LANES, &a3, sizeof a3);
    memcpy(dst, out, sizeof(float) * width);
}

/* y[b * ldy + o] = sum_i w[o, i] x[b * ldx + i] for the outputs o of tiles [t0, t1), b < batch.
 * w is packed (native.py): tile t holds w[t * TILE + c, i] at (t * n + i) * TILE + c, zero past
 * the last row, so a tile streams once, in order, and each output has its own accumulator lane
 * (no horizontal sums). Two rows of x at a time share each load of the weights. */
static void gemv_packed(const float *w, int n, int rows, int t0, int t1, const float *x, int ldx, int batch, float *y, int ldy) {
    for (int t = t0; t < t1; t++) {
        const float *wt = w + (int64_t)t * n * TILE;
        const int o = t * TILE, width = rows - o < TILE ? rows - o : TILE;
        int b = 0;
        for (; b + 2 <= batch; b += 2) {
            const float *x0 = x + (int64_t)b * ldx, *x1 = x0 + ldx;
            vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0};
            for (int i = 0; i < n; i++) {
                const vec *wi = (const vec *)(wt + (int64_t)i * TILE);
                const float u = x0[i], v = x1[i];
                a0 += wi[0] * u; a1 += wi[1] * u; a2 += wi[2] * u; a3 += wi[3] * u;
                c0 += wi[0] * v; c1 += wi[1] * v; c2 += wi[2] * v; c3 += wi[3] * v;
            }
            store_tile(y + (int64_t)b * ldy + o, a0, a1, a2, a3, width);
            store_tile(y + (int64_t)(b + 1) * ldy + o, c0, c1, c2, c3, width);
        }
        for (; b < batch; b++) {
            const float *x0 = x + (int64_t)b * ldx;
            vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            for (int i = 0; i < n; i++) {
                const vec *wi = (const vec *)(wt + (int64_t)i * TILE);
                const float u = x0[i];
                a0 += wi[0] * u; a1 += wi[1] * u; a2 += wi[2] * u; a3 += wi[3] * u;
            }
            store_tile(y + (int64_t)b * ldy + o, a0, a1, a2, a3, width);
        }
    }
}

/* out[i] = x[i] * rsqrt(mean(x^2) + eps) * w[i], i < n */
static void rms_norm(const float *x, const float *w, int n, float eps, float *out) {
    float ss = 0.f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

/* exp(x) in float32 without a libm call, so that loops of it vectorize: x = n ln2 + r with
 * |r| <= ln2 / 2 (ln2 in two parts), e^r by its degree-6 Taylor polynomial (error < 2e-8
 * relative), times 2^n built in the exponent bits. Within 2 ulp of expf (x clamped to [-87.3, 88.7]). */
static inline float fast_exp(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
    /* n = round(x / ln2): adding 1.5 * 2^23 leaves n in the low bits of the mantissa */
    const float shifted = x * 1.44269504088896341f + 12582912.0f;
    const float n = shifted - 12582912.0f;
    const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { float f; int32_t i; } scale = {.f = shifted};
    scale.i = (scale.i - 0x4B400000 + 127) << 23; /* 2^n */
    return p * scale.f;
}

static inline float silu(float v) { return v / (1.0f + fast_exp(-v)); }
static inline float softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }

/* [lo, hi) of `count` items for thread t of n, in multiples of `align` */
static inline void split(int count, int align, int t, int n, int *lo, int *hi) {
    int blocks = (count + align - 1) / align;
    int per = blocks / n, extra = blocks % n;
    int b0 = t * per + (t < extra ? t : extra);
    int b1 = b0 + per + (t < extra ? 1 : 0);
    *lo = b0 * align < count ? b0 * align : count;
    *hi = b1 * align < count ? b1 * align : count;
}

/* Decode `steps` tokens for `batch` rows.
 * tokens_in (batch): the tokens fed first. conv[l]: (batch, conv_dim, kernel - 1);
 * ssm[l]: (batch, heads, head_dim, state), both float32, updated in place.
 * tokens_out (batch, steps), or NULL: the argmax of each step's logits, fed to the next step.
 * logits (batch, vocab), or NULL: the logits of the last step.
 * Returns 0, or -1 when the scratch memory cannot be allocated. */
int mark_decode(const int64_t *dims, float eps, const float *const *weights, float *const *conv, float *const *ssm,
                int batch, const int64_t *tokens_in, int steps, int64_t *tokens_out, float *logits, int threads) {
    const int D = dims[DIM_D_MODEL], L = dims[DIM_LAYERS], H = dims[DIM_HEADS], P = dims[DIM_HEAD_DIM];
    const int N = dims[DIM_STATE], G = dims[DIM_GROUPS], K = dims[DIM_KERNEL], V = dims[DIM_VOCAB];
    const int DI = H * P, BC = G * N, CONV = DI + 2 * BC, PROJ = DI + CONV + H, GS = DI / G, HPG = H / G;
    if (threads < 1) threads = 1;
    /* shared: hidden (batch, D), proj (batch, PROJ), xbc after conv (batch, CONV), y (batch, DI),
     * logits (batch, V) unless given; per thread: normed input (batch, max(D, DI)), argmax. */
    int64_t wide = D > DI ? D : DI;
    int64_t shared = (int64_t)batch * (D + PROJ + CONV + DI + (logits ? 0 : V));
    int64_t priv = (int64_t)batch * wide;
    float *scratch = aligned_alloc(64, ((shared + priv * threads) * sizeof(float) + 63) / 64 * 64);
    float *best = malloc(sizeof(float) * batch * threads);
    int64_t *best_id = malloc(sizeof(int64_t) * batch * threads);
    int64_t *current = malloc(sizeof(int64_t) * batch);
    if (!scratch || !best || !best_id || !current) {
        free(scratch); free(best); free(best_id); free(current);
        return -1;
    }
    float *hidden = scratch, *proj = hidden + (int64_t)batch * D, *xbc = proj + (int64_t)batch * PROJ;
    float *y = xbc + (int64_t)batch * CONV, *out_logits = logits ? logits : y + (int64_t)batch * DI;
    float *private_base = scratch + shared;
    memcpy(current, tokens_in, sizeof(int64_t) * batch);

#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        float *normed = private_base + priv * t;
        int d0, d1, q0, q1, p0, p1, c0, c1, r0, r1, v0, v1; /* rows, tiles, channels */
        split(D, 4, t, T, &d0, &d1);
        split((D + TILE - 1) / TILE, 1, t, T, &q0, &q1);
        split((PROJ + TILE - 1) / TILE, 1, t, T, &p0, &p1);
        split(CONV, LANES, t, T, &c0, &c1);
        split(DI, P, t, T, &r0, &r1); /* whole heads */
        split((V + TILE - 1) / TILE, 1, t, T, &v0, &v1);
        for (int step = 0; step < steps; step++) {
            for (int b = 0; b < batch; b++)
                memcpy(hidden + (int64_t)b * D + d0, weights[W_EMBED] + current[b] * D + d0, sizeof(float) * (d1 - d0));
#pragma omp barrier
            for (int l = 0; l < L; l++) {
                const float *const *w = weights + W_MODEL + l * PER_LAYER;
                for (int b = 0; b < batch; b++) rms_norm(hidden + (int64_t)b * D, w[L_NORM], D, eps, normed + (int64_t)b * D);
                gemv_packed(w[L_IN_PROJ], D, PROJ, p0, p1, normed, D, batch, proj, PROJ);
#pragma omp barrier
                /* causal depthwise conv + SiLU on this thread's channels; the state shifts by one */
                for (int b = 0; b < batch; b++) {
                    float *state = conv[l] + (int64_t)b * CONV * (K - 1);
                    const float *in = proj + (int64_t)b * PROJ + DI;
                    for (int c = c0; c < c1; c++) {
                        float *s = state + (int64_t)c * (K - 1);
                        const float *cw = w[L_CONV_W] + (int64_t)c * K;
                        float acc = 0.f;
                        for (int k = 0; k < K - 1; k++) acc += s[k] * cw[k];
                        acc += in[c] * cw[K - 1];
                        for (int k = 0; k < K - 2; k++) s[k] = s[k + 1];
                        if (K > 1) s[K - 2] = in[c];
                        xbc[(int64_t)b * CONV + c] = acc + w[L_CONV_B][c];
                    }
                    float *act = xbc + (int64_t)b * CONV;
#pragma omp simd
                    for (int c = c0; c < c1; c++) act[c] = silu(act[c]);
                }
#pragma omp barrier
                /* selective state update and readout on this thread's heads, D skip, gate */
                for (int b = 0; b < batch; b++) {
                    const float *xb = xbc + (int64_t)b * CONV, *z = proj + (int64_t)b * PROJ;
                    const float *dt_raw = proj + (int64_t)b * PROJ + DI + CONV;
                    for (int r = r0; r < r1; r += P) {
                        const int h = r / P, g = h / HPG;
                        const float dt = softplus(dt_raw[h] + w[L_DT_BIAS][h]);
                        const float decay = expf(dt * w[L_A][h]);
                        const float *B = xb + DI + g * N, *C = xb + DI + BC + g * N;
                        float *hs = ssm[l] + ((int64_t)b * H + h) * P * N;
                        for (int p = 0; p < P; p++) {
                            const float xv = xb[r + p], coef = xv * dt;
                            float *s = hs + (int64_t)p * N;
                            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                            for (int n = 0; n < N; n++) {
                                float v = s[n] * decay + coef * B[n];
                                s[n] = v;
                                acc += v * C[n];
                            }
                            acc += xv * w[L_D][h];
                            y[(int64_t)b * DI + r + p] = acc;
                        }
                    }
                    float *yb = y + (int64_t)b * DI;
#pragma omp simd
                    for (int r = r0; r < r1; r++) yb[r] *= silu(z[r]);
                }
#pragma omp barrier
                /* gated RMSNorm per group (each thread its own copy), out_proj rows, residual */
                for (int b = 0; b < batch; b++)
                    for (int g = 0; g < G; g++)
                        rms_norm(y + (int64_t)b * DI + g * GS, w[L_GATED_NORM] + g * GS, GS, eps, normed + (int64_t)b * DI + g * GS);
                gemv_packed(w[L_OUT_PROJ], DI, D, q0, q1, normed, DI, batch, proj, PROJ); /* proj is free again */
                const int e0 = q0 * TILE, e1 = q1 * TILE < D ? q1 * TILE : D;
                for (int b = 0; b < batch; b++)
                    for (int o = e0; o < e1; o++) hidden[(int64_t)b * D + o] += proj[(int64_t)b * PROJ + o];
#pragma omp barrier
            }
            for (int b = 0; b < batch; b++) rms_norm(hidden + (int64_t)b * D, weights[W_NORM_F], D, eps, normed + (int64_t)b * D);
            gemv_packed(weights[W_HEAD], D, V, v0, v1, normed, D, batch, out_logits, V);
            if (tokens_out) {
                for (int b = 0; b < batch; b++) {
                    const float *row = out_logits + (int64_t)b * V;
                    const int u0 = v0 * TILE, u1 = v1 * TILE < V ? v1 * TILE : V;
                    float m = -INFINITY;
                    int64_t id = u0;
                    for (int v = u0; v < u1; v++)
                        if (row[v] > m) { m = row[v]; id = v; }
                    best[b * T + t] = m;
                    best_id[b * T + t] = id;
                }
            }
#pragma omp barrier
            if (tokens_out) {
                /* the first index of the maximum, as torch.argmax; single ends with a barrier */
#pragma omp single
                for (int b = 0; b < batch; b++) {
                    float m = best[b * T];
                    int64_t id = best_id[b * T];
                    for (int u = 1; u < T; u++)
                        if (best[b * T + u] > m) { m = best[b * T + u]; id = best_id[b * T + u]; }
                    current[b] = id;
                    tokens_out[(int64_t)b * steps + step] = id;
                }
            }
        }
    }
    free(scratch); free(best); free(best_id); free(current);
    return 0;
}
