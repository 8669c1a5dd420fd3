/* Operators for dgemma's CPU trace of the decoder pass (model/native_ops.py), fp32, with torch's bits.
 *
 * 1. dg_moe: the experts of one MoE layer, with the same bits as dgemma's torch path (model/layers.py,
 * Experts.forward) and so as the reference's grouped_mm experts.
 *
 * torch runs the experts one after another: for each expert a GEMM over its rows (gate and up projections), the
 * tanh-approximated GELU of the gate times the up half, a second GEMM (down projection), then the routing weight,
 * a scatter back to token order and a sum over each token's top-k slots. Those per-expert GEMMs have 8-30 rows,
 * too few for MKL to use two threads well, and the ~20 ATen calls around them cost more than their arithmetic.
 * Here the experts are spread over OpenMP threads, each calling the same MKL `sgemm_` torch calls (its address is
 * handed in from torch's own library, so it is the same code) single-threaded, with everything between the two
 * GEMMs fused into one pass over the rows.
 *
 * Exactness rests on three facts, each checked at run time by dgemma/model/native_ops.py before this is used:
 *  - an expert's GEMM gives MKL's bits for its row count whether MKL runs it on one thread or on several. This
 *    holds for most row counts but not all (MKL splits some small ones differently across threads), so the caller
 *    passes a per-row-count table, probed once per shape, and experts whose count is not safe run after the
 *    parallel part on the calling thread, where MKL uses the same threads torch's call would;
 *  - the GELU is ATen's vectorised AVX2 formula, op for op: x³ as (x·x)·x, β·(κ·x³ + x) with the inner product
 *    and sum fused (the compiler contracts ATen's vector code so), 0.5·x·(1 + tanh(·)), with SLEEF's 8-wide
 *    tanh from torch's own library; rows of `inter` elements with inter % 16 == 0, so ATen's loop never takes its
 *    scalar tail (the caller checks);
 *  - the weighting is one fp32 product and the slot sum accumulates from 0 in slot order, as ATen's reduction over
 *    a middle dimension does for these shapes (it interleaves partial sums in the columns past the last whole
 *    block of 32 when K > 4, so the caller's self-check refuses such shapes).
 *
 * 2. dg_transpose_div: the tied head's weight-first product brought back to [N, V] (below).
 * 3. dg_pre_ffn, dg_ffn_tail, dg_qkv_post: a layer's RMSNorms, RoPE and residual adds (below).
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <omp.h>

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);
typedef __m256 (*tanh8_fn)(__m256);

static sgemm_fn g_sgemm;
static tanh8_fn g_tanh8;

void dg_moe_bind(void *sgemm, void *tanh8) {
    g_sgemm = (sgemm_fn)sgemm;
    g_tanh8 = (tanh8_fn)tanh8;
}

/* C[n, N] = X[n, K] · W[N, K]ᵀ, all row-major: the call torch's mm makes for x @ wᵀ (column-major Cᵀ = Wᵀᵀ·Xᵀ). */
static void linear(const float *X, int n, int K, const float *W, int N, float *C) {
    const char t = 'T', nt = 'N';
    const float one = 1.0f, zero = 0.0f;
    g_sgemm(&t, &nt, &N, &n, &K, &one, W, &K, X, &K, &zero, C, &N);
}

/* out[i] = gelu_tanh(g[i]) · u[i], i < n, n % 8 == 0 */
static void gelu_mul(const float *g, const float *u, float *out, int n) {
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    const __m256 beta = _mm256_set1_ps((float)(1.41421356237309504880 * 1.12837916709551257390 * 0.5));
    const __m256 kappa = _mm256_set1_ps((float)0.044715);
    for (int i = 0; i < n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
        __m256 inner = _mm256_mul_ps(beta, _mm256_fmadd_ps(kappa, x3, x));
        __m256 y = _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, g_tanh8(inner)));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(y, _mm256_loadu_ps(u + i)));
    }
}

/* One expert over its rows [r0, r0 + n) of the sorted slot order. ws: this expert's scratch, n·(H + 3·I) floats. */
static void expert(int e, int64_t r0, int n, const float *x, int H, int K, const int64_t *perm, const float *wts,
                   const float *gate_up, const float *down, int I, float *ws, float *slots) {
    float *xs = ws, *u = ws + (int64_t)n * H, *a = u + (int64_t)n * 2 * I;
    for (int r = 0; r < n; r++)
        memcpy(xs + (int64_t)r * H, x + (perm[r0 + r] / K) * H, sizeof(float) * (size_t)H);
    linear(xs, n, H, gate_up + (int64_t)e * 2 * I * H, 2 * I, u);
    for (int r = 0; r < n; r++)
        gelu_mul(u + (int64_t)r * 2 * I, u + (int64_t)r * 2 * I + I, a + (int64_t)r * I, I);
    float *y = xs; /* the gathered rows are no longer needed */
    linear(a, n, I, down + (int64_t)e * H * I, H, y);
    for (int r = 0; r < n; r++) {
        int64_t slot = perm[r0 + r];
        const float w = wts[slot];
        const float *src = y + (int64_t)r * H;
        float *dst = slots + slot * H;
        for (int h = 0; h < H; h++) dst[h] = src[h] * w;
    }
}

/* x [T, H]; perm [T·K]: slot ids sorted by expert (torch.sort of the flat top-k indices); counts [E]; wts [T·K]
 * routing weights by slot; gate_up [E, 2I, H]; down [E, H, I]; safe [T·K + 1]: may an expert with that many rows
 * run on a worker thread; out [T, H]; ws: T·K·(2H + 3I) floats. Returns 0, or -1 for an unsupported shape. */
int dg_moe(const float *x, int T, int H, int K, const int64_t *perm, const int64_t *counts, int E, const float *wts,
           const float *gate_up, const float *down, int I, const unsigned char *safe, float *out, float *ws,
           int nthreads) {
    enum { MAX_E = 1024 };
    int64_t start[MAX_E];
    if (E > MAX_E || I % 8 || g_sgemm == 0 || g_tanh8 == 0) return -1;
    const int64_t S = (int64_t)T * K;
    float *slots = ws; /* [S, H]: each slot's weighted output */
    float *scratch = ws + S * H;
    int64_t s = 0;
    for (int e = 0; e < E; e++) {
        if (counts[e] < 0) return -1;
        start[e] = s;
        s += counts[e];
    }
    if (s != S) return -1;
    for (int64_t r = 0; r < S; r++)
        if (perm[r] < 0 || perm[r] >= S) return -1;
    /* experts whose row count gives the same bits on one thread: spread over the threads, each taken in expert order
     * by whichever thread is free (the bits do not depend on who runs what) */
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int e = 0; e < E; e++) {
        int n = (int)counts[e];
        if (n && safe[n])
            expert(e, start[e], n, x, H, K, perm, wts, gate_up, down, I, scratch + start[e] * (H + 3 * I), slots);
    }
    for (int e = 0; e < E; e++) { /* the rest on this thread, with MKL's own threading as torch would run it */
        int n = (int)counts[e];
        if (n && !safe[n])
            expert(e, start[e], n, x, H, K, perm, wts, gate_up, down, I, scratch + start[e] * (H + 3 * I), slots);
    }
    for (int t = 0; t < T; t++) {
        float *o = out + (int64_t)t * H;
        const float *y = slots + (int64_t)t * K * H;
        for (int h = 0; h < H; h++) {
            float acc = 0.0f;
            for (int k = 0; k < K; k++) acc += y[(int64_t)k * H + h];
            o[h] = acc;
        }
    }
    return 0;
}

/* One GEMM as dg_moe's workers run it (inside a parallel region of nthreads, on one of them) or, with
 * nthreads == 0, as its calling thread does: for probing which row counts are safe. */
void dg_linear(const float *X, int n, int K, const float *W, int N, float *C, int nthreads) {
    if (nthreads <= 0) {
        linear(X, n, K, W, N, C);
        return;
    }
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp single
        linear(X, n, K, W, N, C);
    }
}


/* 2. dg_transpose_div: out[n, v] = in[v, n] / d for in [V, N] row-major, out [N, V] row-major.
 * The tied head's product is taken weight-first ([V, N], faster in MKL at batch 1) and must come back as [N, V] for
 * the softcap and the sampler; torch's strided copy of that transpose cost ~0.9 ms for a [8192, 64] fp32 product on
 * 2 cores. Blocks of 8 x 8 are transposed in registers and the softcap's first step (a division, one IEEE rounding
 * as torch's div_) is applied on the way. */
static void transpose8(const float *in, int64_t ldi, float *out, int64_t ldo, __m256 d) {
    __m256 r0 = _mm256_loadu_ps(in), r1 = _mm256_loadu_ps(in + ldi), r2 = _mm256_loadu_ps(in + 2 * ldi),
           r3 = _mm256_loadu_ps(in + 3 * ldi), r4 = _mm256_loadu_ps(in + 4 * ldi), r5 = _mm256_loadu_ps(in + 5 * ldi),
           r6 = _mm256_loadu_ps(in + 6 * ldi), r7 = _mm256_loadu_ps(in + 7 * ldi);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
           t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
           t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE),
           s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE),
           s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE),
           s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(out, _mm256_div_ps(_mm256_permute2f128_ps(s0, s4, 0x20), d));
    _mm256_storeu_ps(out + ldo, _mm256_div_ps(_mm256_permute2f128_ps(s1, s5, 0x20), d));
    _mm256_storeu_ps(out + 2 * ldo, _mm256_div_ps(_mm256_permute2f128_ps(s2, s6, 0x20), d));
    _mm256_storeu_ps(out + 3 * ldo, _mm256_div_ps(_mm256_permute2f128_ps(s3, s7, 0x20), d));
    _mm256_storeu_ps(out + 4 * ldo, _mm256_div_ps(_mm256_permute2f128_ps(s0, s4, 0x31), d));
    _mm256_storeu_ps(out + 5 * ldo, _mm256_div_ps(_mm256_permute2f128_ps(s1, s5, 0x31), d));
    _mm256_storeu_ps(out + 6 * ldo, _mm256_div_ps(_mm256_permute2f128_ps(s2, s6, 0x31), d));
    _mm256_storeu_ps(out + 7 * ldo, _mm256_div_ps(_mm256_permute2f128_ps(s3, s7, 0x31), d));
}

void dg_transpose_div(const float *in, int64_t V, int64_t N, float d, float *out, int nthreads) {
    const __m256 dv = _mm256_set1_ps(d);
    const int64_t V8 = V - V % 8, N8 = N - N % 8;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t v = 0; v < V8; v += 8) {
        for (int64_t n = 0; n < N8; n += 8) transpose8(in + v * N + n, N, out + n * V + v, V, dv);
        for (int64_t n = N8; n < N; n++)
            for (int64_t i = 0; i < 8; i++) out[n * V + v + i] = in[(v + i) * N + n] / d;
    }
    for (int64_t v = V8; v < V; v++)
        for (int64_t n = 0; n < N; n++) out[n * V + v] = in[v * N + n] / d;
}

/* 3. Layer glue: the residual adds and the RMSNorms around the FFN of a layer, as model/layers.py computes them
 * through ATen, fused into two calls (about twenty traced ATen calls each).
 * An RMSNorm row is x · (mean(x²) + eps)^-½ [· w] in fp32. ATen's mean is the sum of the squares divided by D; its
 * sum over a contiguous row of D floats (D % 32 == 0 and D <= 512: at most 16 blocks, where ATen's first cascade
 * level only moves the block sums onto zeros, the same values) keeps 4 accumulators of 8
 * lanes over blocks of 32 elements, adds them as ((a0 + a1) + a2) + a3 and then the 8 lanes in order onto 0.
 * x^-½ is 1 / sqrt(x) in ATen: one rounding each. Every product and sum here is its own rounding, as in ATen. */
static float inv_rms(const float *x, int64_t D, float eps) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < D; i += 32) {
        __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8), v2 = _mm256_loadu_ps(x + i + 16),
               v3 = _mm256_loadu_ps(x + i + 24);
        a0 = _mm256_add_ps(a0, _mm256_mul_ps(v0, v0));
        a1 = _mm256_add_ps(a1, _mm256_mul_ps(v1, v1));
        a2 = _mm256_add_ps(a2, _mm256_mul_ps(v2, v2));
        a3 = _mm256_add_ps(a3, _mm256_mul_ps(v3, v3));
    }
    __m256 p = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), a2), a3);
    float lanes[8], sum = 0.0f;
    _mm256_storeu_ps(lanes, p);
    for (int k = 0; k < 8; k++) sum += lanes[k];
    return 1.0f / sqrtf(sum / (float)D + eps);
}

/* out = x · r [· w] */
static void scale_row(const float *x, int64_t D, float r, const float *w, float *out) {
    const __m256 rv = _mm256_set1_ps(r);
    for (int64_t i = 0; i < D; i += 8) {
        __m256 y = _mm256_mul_ps(_mm256_loadu_ps(x + i), rv);
        if (w) y = _mm256_mul_ps(y, _mm256_loadu_ps(w + i));
        _mm256_storeu_ps(out + i, y);
    }
}

/* After attention: x2 = x + norm_pa(o); n1 = norm_pre(x2); n2 = norm_pre2(x2); r = (norm∅(x2) · scale) · root
 * (the router's input). All [rows, D]. */
void dg_pre_ffn(const float *x, const float *o, int64_t rows, int64_t D, const float *w_pa, const float *w_pre,
                const float *w_pre2, const float *scale, float root, float eps, float *x2, float *n1, float *n2,
                float *r) {
    const __m256 rootv = _mm256_set1_ps(root);
    for (int64_t t = 0; t < rows; t++) {
        const float *xr = x + t * D, *orow = o + t * D;
        float *x2r = x2 + t * D, *rr = r + t * D;
        scale_row(orow, D, inv_rms(orow, D, eps), w_pa, x2r);
        for (int64_t i = 0; i < D; i += 8)
            _mm256_storeu_ps(x2r + i, _mm256_add_ps(_mm256_loadu_ps(xr + i), _mm256_loadu_ps(x2r + i)));
        const float inv = inv_rms(x2r, D, eps);
        scale_row(x2r, D, inv, w_pre, n1 + t * D);
        scale_row(x2r, D, inv, w_pre2, n2 + t * D);
        scale_row(x2r, D, inv, scale, rr);
        for (int64_t i = 0; i < D; i += 8) _mm256_storeu_ps(rr + i, _mm256_mul_ps(_mm256_loadu_ps(rr + i), rootv));
    }
}

/* The end of a layer: out = (x + norm_post(norm_post1(h1) + norm_post2(h2))) · scalar[0]. All [rows, D]. */
void dg_ffn_tail(const float *x, const float *h1, const float *h2, int64_t rows, int64_t D, const float *w1,
                 const float *w2, const float *w, const float *scalar, float eps, float *out) {
    const __m256 sv = _mm256_set1_ps(*scalar);
    for (int64_t t = 0; t < rows; t++) {
        const float *a = h1 + t * D, *b = h2 + t * D, *xr = x + t * D;
        float *o = out + t * D;
        scale_row(a, D, inv_rms(a, D, eps), w1, o);
        const float rb = inv_rms(b, D, eps);
        for (int64_t i = 0; i < D; i += 8) {
            __m256 nb = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(b + i), _mm256_set1_ps(rb)), _mm256_loadu_ps(w2 + i));
            _mm256_storeu_ps(o + i, _mm256_add_ps(_mm256_loadu_ps(o + i), nb));
        }
        scale_row(o, D, inv_rms(o, D, eps), w, o);
        for (int64_t i = 0; i < D; i += 8)
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(xr + i), _mm256_loadu_ps(o + i)), sv));
    }
}

/* After the q/k/v projections of one attention layer: per head, q and k through their RMSNorm (with weight) and
 * RoPE, v through the weightless RMSNorm (on full layers V is the raw k). RoPE is ATen's x·cos + rot(x)·sin with
 * rot([a, b]) = [-b, a]: two products and a sum, each rounded. q [R, nh, d], k/v [R, g, d] with R = B·S rows;
 * cos/sin [S, d] indexed by r % S; v may be NULL (then V = the raw k). d % 32 == 0, d <= 512. */
static void norm_rope(const float *x, int64_t d, const float *w, float eps, const float *c, const float *s,
                      float *out) {
    float h[512];
    scale_row(x, d, inv_rms(x, d, eps), w, h);
    const int64_t half = d / 2;
    for (int64_t i = 0; i < d; i += 8) {
        __m256 rot = i < half ? _mm256_xor_ps(_mm256_loadu_ps(h + i + half), _mm256_set1_ps(-0.0f)) /* torch's neg */
                              : _mm256_loadu_ps(h + i - half);
        __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(h + i), _mm256_loadu_ps(c + i)),
                                 _mm256_mul_ps(rot, _mm256_loadu_ps(s + i)));
        _mm256_storeu_ps(out + i, y);
    }
}

void dg_qkv_post(const float *q, const float *k, const float *v, int64_t R, int64_t S, int64_t nh, int64_t g,
                 int64_t d, const float *cos, const float *sin, const float *wq, const float *wk, float eps, float *qo,
                 float *ko, float *vo) {
    for (int64_t r = 0; r < R; r++) {
        const float *c = cos + (r % S) * d, *s = sin + (r % S) * d;
        for (int64_t h = 0; h < nh; h++) norm_rope(q + (r * nh + h) * d, d, wq, eps, c, s, qo + (r * nh + h) * d);
        for (int64_t h = 0; h < g; h++) {
            const float *kr = k + (r * g + h) * d, *vr = v ? v + (r * g + h) * d : kr;
            norm_rope(kr, d, wk, eps, c, s, ko + (r * g + h) * d);
            scale_row(vr, d, inv_rms(vr, d, eps), 0, vo + (r * g + h) * d);
        }
    }
}
