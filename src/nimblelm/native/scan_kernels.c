/* Native CPU kernels for diagonal state-space scans (nimblelm.native).
 *
 * Mamba's selective scan (S6), per channel d and state index n:
 *     h_t[n, d] = exp(delta_t[d] * A[n, d]) * h_{t-1}[n, d] + delta_t[d] * u_t[d] * B_t[n]
 *     y_t[d]    = (sum_n C_t[n] * h_t[n, d] + D[d] * u_t[d]) * silu(z_t[d])   (D, z optional)
 * The state lives in the transposed layout [N, D] so that the innermost loop runs over
 * contiguous channels and vectorises; one call handles the channels [d0, d1) of every batch
 * row, so callers split channels across threads (ctypes releases the GIL). The forward keeps
 * the state entering every `chunk` steps (and the final state) in `hs`; the backward recomputes
 * each stretch from there, walking time backwards.
 *
 * Hawk / Griffin's RG-LRU recurrence h_t = exp(log_a_t) * h_{t-1} + x_t (per channel, read
 * out as h_t): `nl_lr_forward` / `nl_lr_backward`; the whole RG-LRU interior for inference:
 * `nl_rglru_forward`; the causal depthwise "short conv" for inference: `nl_conv_forward`.
 *
 * Every kernel exists for float and double (`_f32` / `_f64`): scan_kernels.inc is included
 * once per type. The exponentials are our own polynomials, so the loops vectorise without
 * fast-math and without libmvec (built with -fno-trapping-math, which lets gcc turn the
 * clamps into blends).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef BLOCK
#define BLOCK 64 /* channels per inner block: the [N, BLOCK] state stays in L1 */
#endif

/* exp(x) for x <= 88 (float) / 709 (double): 2^k * p(r) with r = x - k ln2 in [-ln2/2, ln2/2]
 * (Taylor to degree 7 / 13: within ~1 ulp). Below the underflow threshold, -inf included, the
 * result is exactly 0, so a hard reset stays a reset. Larger x gives garbage: callers check. */
static inline float exp_upto88_f32(float x) {
    const float lo = -87.0f;
    float xc = x < lo ? lo : x;
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
    union { int32_t i; float f; } scale = { .i = ((int32_t)k + 127) << 23 };
    return x < lo ? 0.f : p * scale.f;
}

/* e^r for |r| <= ln2 / 2: Taylor to degree 13 (within ~1 ulp in double). */
static inline double exp_reduced_f64(double r) {
    double p = 1.0 / 6227020800.0; /* 1/13! */
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
    return p * r + 1.0;
}

static inline double exp_upto709_f64(double x) {
    const double lo = -708.0;
    double xc = x < lo ? lo : x;
    double k = __builtin_floor(xc * 1.44269504088896340736 + 0.5);
    double r = xc - k * 6.93147180369123816490e-01;
    r = r - k * 1.90821492927058770002e-10;
    union { int64_t i; double f; } scale = { .i = ((int64_t)k + 1023) << 52 };
    return x < lo ? 0.0 : exp_reduced_f64(r) * scale.f;
}

/* 2^x for x <= 127 (float) / 1023 (double): 2^k * 2^f with f = x - k in [-1/2, 1/2] (exact),
 * 2^f a degree-6 fit of relative error 2e-9 in float (within ~2 ulp as evaluated) and
 * e^(f ln2) in double. Below 2^-126 / 2^-1022, -inf included, the result is exactly 0. The
 * selective scan's decays exp(delta A) = 2^(delta A log2(e)) with A scaled once per call:
 * no range reduction by ln2 per element. */
static inline float exp2_upto127_f32(float x) {
    const float lo = -126.0f;
    float xc = x < lo ? lo : x;
    float k = __builtin_floorf(xc + 0.5f);  /* (floor vectorises; roundeven is a libcall) */
    float f = xc - k;
    float p = 1.5353361813644827e-04f;
    p = p * f + 1.339887444538652e-03f;
    p = p * f + 9.618437358300634e-03f;
    p = p * f + 5.550332471026901e-02f;
    p = p * f + 2.4022647913619644e-01f;
    p = p * f + 6.931472028551287e-01f;
    p = p * f + 1.f;
    union { int32_t i; float f; } scale = { .i = ((int32_t)k + 127) << 23 };
    return x < lo ? 0.f : p * scale.f;
}

static inline double exp2_upto1023_f64(double x) {
    const double lo = -1022.0;
    double xc = x < lo ? lo : x;
    double k = __builtin_floor(xc + 0.5);
    double f = xc - k;
    union { int64_t i; double f; } scale = { .i = ((int64_t)k + 1023) << 52 };
    return x < lo ? 0.0 : exp_reduced_f64(f * 6.93147180559945309417e-01) * scale.f;
}

/* exp(x) for any x: clamped above first (the sigmoid of the gate and the RG-LRU decay, whose
 * arguments the caller does not bound), so huge x saturates at exp(88) / exp(709). */
static inline float exp_any_f32(float x) { return exp_upto88_f32(x > 88.0f ? 88.0f : x); }
static inline double exp_any_f64(double x) { return exp_upto709_f64(x > 709.0 ? 709.0 : x); }

/* Bumped whenever a kernel's signature changes; nimblelm.ops.native_scan refuses a library
 * whose number differs from its own (a process that loaded older Python code, say). */
int nl_scan_kernels_abi(void) { return 6; }

#define REAL float
#define SFX(name) name##_f32
#define EXP_UPTO exp_upto88_f32
#define EXP2_UPTO exp2_upto127_f32
#define EXP_ANY exp_any_f32
#include "scan_kernels.inc"
#undef REAL
#undef SFX
#undef EXP_UPTO
#undef EXP2_UPTO
#undef EXP_ANY

#define REAL double
#define SFX(name) name##_f64
#define EXP_UPTO exp_upto709_f64
#define EXP2_UPTO exp2_upto1023_f64
#define EXP_ANY exp_any_f64
#include "scan_kernels.inc"
