/* Native CPU kernels for diagonal state-space scans (nimblelm.native).
 *
 * Mamba's selective scan (S6), per channel d and state index n:
 *     h_t[n, d] = exp(delta_t[d] * A[n, d]) * h_{t-1}[n, d] + delta_t[d] * u_t[d] * B_t[n]
 *     y_t[d]    = sum_n C_t[n] * h_t[n, d]
 * The state lives in the transposed layout [N, D] so that the innermost loop runs over
 * contiguous channels and vectorises; one call handles the channels [d0, d1) of every batch
 * row, so callers split channels across threads (ctypes releases the GIL).
 *
 * The forward pass keeps the state entering every chunk of `chunk` steps (and the final state)
 * in `hs`; the backward pass recomputes each chunk's states from there, walking time backwards.
 * Both exist for float and double (`_f32` / `_f64`); the exponential is our own polynomial so
 * the loops vectorise without fast-math and without libmvec (built with -fno-trapping-math,
 * which lets gcc turn the clamps into blends).
 *
 * The RG-LRU recurrence h_t = exp(log_a_t) * h_{t-1} + x_t (per channel, read out as h_t) has
 * its own pair of kernels, `nl_lr_forward` / `nl_lr_backward`, below.
 *
 * Layouts of the S6 kernels (all contiguous, row-major): u, delta, y, gu, gdelta [Bsz, T, D]; At, gA [N, D]
 * (gA per batch row: [Bsz, N, D]); Bm, Cm [Bsz, T, N]; h0, g_final, g_h0 [Bsz, N, D];
 * hs [Bsz, nchunks + 1, N, D]; gB, gC [Bsz, T, N] (partial sums over this call's channels).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef BLOCK
#define BLOCK 64 /* channels per inner block: the [N, BLOCK] state stays in L1 */
#endif

/* exp(x), meant for x <= 0 (the only case here; x is clamped to the finite range): 2^k * p(r), r = x - k ln2 in [-ln2/2, ln2/2].
 * Arguments below the underflow threshold return exactly 0 (a hard reset stays a reset). */
static inline float exp_nonpos_f32(float x) {
    const float lo = -87.0f, hi = 88.0f;
    float xc = x < lo ? lo : (x > hi ? hi : x);
    float k = __builtin_floorf(xc * 1.44269504088896341f + 0.5f);
    float r = xc - k * 0.693359375f;
    r = r + k * 2.12194440e-4f;
    float p = 1.f / 5040.f;
    p = p * r + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    int32_t bits = ((int32_t)k + 127) << 23;
    union { int32_t i; float f; } scale = { .i = bits };
    return x < lo ? 0.f : p * scale.f;
}

static inline double exp_nonpos_f64(double x) {
    const double lo = -708.0, hi = 709.0;
    double xc = x < lo ? lo : (x > hi ? hi : x);
    double k = __builtin_floor(xc * 1.44269504088896340736 + 0.5);
    double r = xc - k * 6.93147180369123816490e-01;
    r = r - k * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0;                /* 1/13! */
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    int64_t bits = ((int64_t)k + 1023) << 52;
    union { int64_t i; double f; } scale = { .i = bits };
    return x < lo ? 0.0 : p * scale.f;
}

#define DEFINE_SCAN_KERNELS(REAL, SFX, EXP)                                                       \
                                                                                                  \
REAL nl_exp_##SFX(REAL x) { return EXP(x); }                                              \
                                                                                                  \
/* One step of the forward recurrence for channels [0, w) of a block (pointers pre-offset). */    \
static inline void s6_step_##SFX(REAL *restrict h, REAL *restrict y, const REAL *restrict u,      \
                                 const REAL *restrict dl, const REAL *restrict At,                \
                                 const REAL *restrict Bt, const REAL *restrict Ct,                \
                                 int64_t N, int64_t D, int64_t w) {                               \
    REAL x[BLOCK], acc[BLOCK];                                                                    \
    for (int64_t j = 0; j < w; ++j) { x[j] = dl[j] * u[j]; acc[j] = 0; }                          \
    for (int64_t n = 0; n < N; ++n) {                                                             \
        const REAL bn = Bt[n], cn = Ct[n];                                                        \
        REAL *restrict hn = h + n * BLOCK;                                                        \
        const REAL *restrict an = At + n * D;                                                     \
        _Pragma("omp simd")                                                                       \
        for (int64_t j = 0; j < w; ++j) {                                                         \
            REAL v = EXP(dl[j] * an[j]) * hn[j] + x[j] * bn;                                      \
            hn[j] = v;                                                                            \
            acc[j] += cn * v;                                                                     \
        }                                                                                         \
    }                                                                                             \
    if (y) for (int64_t j = 0; j < w; ++j) y[j] = acc[j];                                         \
}                                                                                                 \
                                                                                                  \
static void load_state_##SFX(REAL *h, const REAL *src, int64_t N, int64_t D, int64_t w) {         \
    for (int64_t n = 0; n < N; ++n) memcpy(h + n * BLOCK, src + n * D, (size_t)w * sizeof(REAL)); \
}                                                                                                 \
static void store_state_##SFX(REAL *dst, const REAL *h, int64_t N, int64_t D, int64_t w) {        \
    for (int64_t n = 0; n < N; ++n) memcpy(dst + n * D, h + n * BLOCK, (size_t)w * sizeof(REAL)); \
}                                                                                                 \
                                                                                                  \
int nl_s6_forward_##SFX(const REAL *u, const REAL *dl, const REAL *At, const REAL *Bm,            \
                        const REAL *Cm, const REAL *h0, REAL *y, REAL *hs,                        \
                        int64_t Bsz, int64_t T, int64_t D, int64_t N, int64_t chunk,              \
                        int64_t d0, int64_t d1) {                                                 \
    const int64_t nch = (T + chunk - 1) / chunk;                                                  \
    REAL *h = (REAL *)malloc((size_t)(N * BLOCK) * sizeof(REAL));                                 \
    if (!h) return 1;                                                                             \
    for (int64_t b = 0; b < Bsz; ++b) {                                                           \
        for (int64_t c0 = d0; c0 < d1; c0 += BLOCK) {                                             \
            const int64_t w = (d1 - c0) < BLOCK ? (d1 - c0) : BLOCK;                              \
            REAL *hsb = hs + b * (nch + 1) * N * D + c0;                                          \
            load_state_##SFX(h, h0 + b * N * D + c0, N, D, w);                                    \
            for (int64_t t = 0; t < T; ++t) {                                                     \
                if (t % chunk == 0) store_state_##SFX(hsb + (t / chunk) * N * D, h, N, D, w);     \
                const int64_t o = (b * T + t) * D + c0;                                           \
                s6_step_##SFX(h, y + o, u + o, dl + o, At + c0, Bm + (b * T + t) * N,             \
                              Cm + (b * T + t) * N, N, D, w);                                     \
            }                                                                                     \
            store_state_##SFX(hsb + nch * N * D, h, N, D, w);                                     \
        }                                                                                         \
    }                                                                                             \
    free(h);                                                                                      \
    return 0;                                                                                     \
}                                                                                                 \
                                                                                                  \
/* Backward for channels [d0, d1). gy [Bsz, T, D]; g_final [Bsz, N, D] or NULL. Writes gu,      \
 * gdelta (own channels), gA [Bsz, N, D] (own channels), g_h0 [Bsz, N, D] (own channels) and     \
 * adds this call's partial sums into gB, gC [Bsz, T, N] (zeroed by the caller). */              \
int nl_s6_backward_##SFX(const REAL *u, const REAL *dl, const REAL *At, const REAL *Bm,           \
                         const REAL *Cm, const REAL *hs, const REAL *gy, const REAL *g_final,     \
                         REAL *gu, REAL *gdl, REAL *gA, REAL *gB, REAL *gC, REAL *g_h0,           \
                         int64_t Bsz, int64_t T, int64_t D, int64_t N, int64_t chunk,             \
                         int64_t d0, int64_t d1) {                                                \
    const int64_t nch = (T + chunk - 1) / chunk;                                                  \
    const int64_t NB = N * BLOCK;                                                                 \
    REAL *hbuf = (REAL *)malloc((size_t)((chunk + 1) * NB) * sizeof(REAL));                       \
    REAL *gh = (REAL *)malloc((size_t)(2 * NB) * sizeof(REAL));                                   \
    if (!hbuf || !gh) { free(hbuf); free(gh); return 1; }                                         \
    REAL *gAl = gh + NB;                                                                          \
    for (int64_t b = 0; b < Bsz; ++b) {                                                           \
        for (int64_t c0 = d0; c0 < d1; c0 += BLOCK) {                                             \
            const int64_t w = (d1 - c0) < BLOCK ? (d1 - c0) : BLOCK;                              \
            const REAL *hsb = hs + b * (nch + 1) * N * D + c0;                                    \
            const REAL *Ab = At + c0;                                                             \
            memset(gAl, 0, (size_t)NB * sizeof(REAL));                                            \
            if (g_final) load_state_##SFX(gh, g_final + b * N * D + c0, N, D, w);                 \
            else memset(gh, 0, (size_t)NB * sizeof(REAL));                                        \
            for (int64_t c = nch - 1; c >= 0; --c) {                                              \
                const int64_t t0 = c * chunk, t1 = (t0 + chunk) < T ? (t0 + chunk) : T;           \
                load_state_##SFX(hbuf, hsb + c * N * D, N, D, w);                                 \
                for (int64_t t = t0; t < t1; ++t) {                                               \
                    const int64_t o = (b * T + t) * D + c0;                                       \
                    memcpy(hbuf + (t - t0 + 1) * NB, hbuf + (t - t0) * NB, (size_t)NB * sizeof(REAL)); \
                    s6_step_##SFX(hbuf + (t - t0 + 1) * NB, NULL, u + o, dl + o, Ab,              \
                                  Bm + (b * T + t) * N, Cm + (b * T + t) * N, N, D, w);           \
                }                                                                                 \
                for (int64_t t = t1 - 1; t >= t0; --t) {                                          \
                    const int64_t o = (b * T + t) * D + c0;                                       \
                    const REAL *ut = u + o, *dt = dl + o, *gyt = gy + o;                          \
                    const REAL *Bt = Bm + (b * T + t) * N, *Ct = Cm + (b * T + t) * N;            \
                    REAL *gBt = gB + (b * T + t) * N, *gCt = gC + (b * T + t) * N;                \
                    const REAL *hprev = hbuf + (t - t0) * NB, *hcur = hprev + NB;                 \
                    REAL x[BLOCK], gx[BLOCK], gd[BLOCK];                                          \
                    for (int64_t j = 0; j < w; ++j) { x[j] = dt[j] * ut[j]; gx[j] = 0; gd[j] = 0; } \
                    for (int64_t n = 0; n < N; ++n) {                                             \
                        const REAL bn = Bt[n], cn = Ct[n];                                        \
                        const REAL *an = Ab + n * D;                                              \
                        const REAL *hp = hprev + n * BLOCK, *hc = hcur + n * BLOCK;               \
                        REAL *ghn = gh + n * BLOCK, *gan = gAl + n * BLOCK;                       \
                        REAL sc = 0, sb = 0;                                                      \
                        _Pragma("omp simd reduction(+:sc,sb)")                                    \
                        for (int64_t j = 0; j < w; ++j) {                                         \
                            const REAL a = EXP(dt[j] * an[j]);                                    \
                            const REAL g = ghn[j] + gyt[j] * cn;                                  \
                            sc += gyt[j] * hc[j];                                                 \
                            sb += g * x[j];                                                       \
                            gx[j] += g * bn;                                                      \
                            const REAL ga = g * hp[j] * a;                                        \
                            gd[j] += ga * an[j];                                                  \
                            gan[j] += ga * dt[j];                                                 \
                            ghn[j] = g * a;                                                       \
                        }                                                                         \
                        gCt[n] += sc;                                                             \
                        gBt[n] += sb;                                                             \
                    }                                                                             \
                    for (int64_t j = 0; j < w; ++j) {                                             \
                        gu[o + j] = gx[j] * dt[j];                                                \
                        gdl[o + j] = gd[j] + gx[j] * ut[j];                                       \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
            store_state_##SFX(g_h0 + b * N * D + c0, gh, N, D, w);                                \
            store_state_##SFX(gA + b * N * D + c0, gAl, N, D, w);                                 \
        }                                                                                         \
    }                                                                                             \
    free(hbuf);                                                                                   \
    free(gh);                                                                                     \
    return 0;                                                                                     \
}


#define DEFINE_RECURRENCE_KERNELS(REAL, SFX, EXP)                                                 \
                                                                                                  \
/* h_t = exp(log_a_t) * h_{t-1} + x_t for channels [d0, d1); x, la, y [Bsz, T, D]; h0 [Bsz, D].  \
 * The outputs are the states, so y[t - 1] is the previous state (no extra buffer). */           \
int nl_lr_forward_##SFX(const REAL *x, const REAL *la, const REAL *h0, REAL *y,                   \
                        int64_t Bsz, int64_t T, int64_t D, int64_t d0, int64_t d1) {              \
    for (int64_t b = 0; b < Bsz; ++b) {                                                           \
        for (int64_t t = 0; t < T; ++t) {                                                         \
            const int64_t o = (b * T + t) * D;                                                    \
            const REAL *restrict hp = t ? y + o - D : h0 + b * D;                                 \
            REAL *restrict yt = y + o;                                                            \
            const REAL *restrict xt = x + o, *restrict lt = la + o;                               \
            _Pragma("omp simd")                                                                   \
            for (int64_t j = d0; j < d1; ++j) yt[j] = EXP(lt[j]) * hp[j] + xt[j];                 \
        }                                                                                         \
    }                                                                                             \
    return 0;                                                                                     \
}                                                                                                 \
                                                                                                  \
/* Backward for channels [d0, d1): gy [Bsz, T, D]; g_final [Bsz, D] or NULL. Writes gx, g_la     \
 * [Bsz, T, D] and g_h0 [Bsz, D] for those channels. */                                          \
int nl_lr_backward_##SFX(const REAL *la, const REAL *h0, const REAL *y, const REAL *gy,           \
                         const REAL *g_final, REAL *gx, REAL *g_la, REAL *g_h0,                   \
                         int64_t Bsz, int64_t T, int64_t D, int64_t d0, int64_t d1) {             \
    for (int64_t b = 0; b < Bsz; ++b) {                                                           \
        REAL *restrict gh = g_h0 + b * D;                                                         \
        for (int64_t j = d0; j < d1; ++j) gh[j] = g_final ? g_final[b * D + j] : 0;               \
        for (int64_t t = T - 1; t >= 0; --t) {                                                    \
            const int64_t o = (b * T + t) * D;                                                    \
            const REAL *restrict hp = t ? y + o - D : h0 + b * D;                                 \
            const REAL *restrict lt = la + o, *restrict gyt = gy + o;                             \
            REAL *restrict gxt = gx + o, *restrict glt = g_la + o;                                \
            _Pragma("omp simd")                                                                   \
            for (int64_t j = d0; j < d1; ++j) {                                                   \
                const REAL a = EXP(lt[j]);                                                        \
                const REAL g = gyt[j] + gh[j];                                                    \
                gxt[j] = g;                                                                       \
                glt[j] = g * hp[j] * a;                                                           \
                gh[j] = g * a;                                                                    \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    return 0;                                                                                     \
}

DEFINE_SCAN_KERNELS(float, f32, exp_nonpos_f32)
DEFINE_SCAN_KERNELS(double, f64, exp_nonpos_f64)
DEFINE_RECURRENCE_KERNELS(float, f32, exp_nonpos_f32)
DEFINE_RECURRENCE_KERNELS(double, f64, exp_nonpos_f64)
