/*
 * The softmax rows of one chunk of attention logits and the sums sink statistics need, in one sweep
 * per row (the row stays in L1 between its passes). Called through ctypes by eah_interp/native.py;
 * eah_interp/chunked.py has the same computation in PyTorch (the reference and the fallback).
 *
 * For each of n matrices (batch * heads) and each of its `rows` rows of `cols` logits x:
 *   m      = max_j x[j]
 *   y[j]   = max(x[j] - m, log_floor)              (exp of anything lower would be subnormal: ~70x slower)
 *   u[j]   = exp(y[j]), or exactly 0 where x[j] <= blocked (masked entries hold the float32 minimum)
 *   total  = sum_j u[j]                            (the softmax denominator: P = u / total)
 *   ylogu  = sum_j u[j] * y[j]                     (entropy = log(total) - ylogu / total)
 *   column_sums[j] += weight / total * u[j]  for every j except the row's own key, diag_start + row
 *
 * Built without -ffast-math on purpose: linking a shared library with it (GCC < 13) sets the
 * flush-to-zero mode for the whole process at load time. The flags eah_interp/native.py passes allow
 * the reassociation that vectorises the reductions, nothing that changes other code.
 */
#include <stdint.h>

/* exp(y) for y in [-87.5, 0]: y = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two for an exact
 * n ln2), exp(r) by a degree-7 polynomial (Cephes' expf coefficients, relative error ~1e-7), and
 * 2^n written straight into the exponent bits (n >= -126: always a normal float). */
static inline float exp_nonpositive(float y) {
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    float n = __builtin_rintf(y * log2e);
    float r = (y - n * ln2_hi) - n * ln2_lo;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } two_n = { .i = ((int32_t)n + 127) << 23 };
    return p * two_n.f;
}

void attention_rows(const float *restrict x, float *restrict u, int64_t n, int64_t rows, int64_t cols,
                    const float *restrict weights, int64_t weight_stride, float log_floor, float blocked,
                    float *restrict total, float *restrict ylogu,
                    float *restrict column_sums, int64_t column_stride, int64_t diag_start, int threads) {
    /* matrices are independent (each owns its column sums): split over `threads` when built with
     * OpenMP, which in a process that loaded PyTorch's libgomp.so.1 is PyTorch's own thread pool */
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n > 1)
    for (int64_t a = 0; a < n; a++) {
        float *restrict sums = column_sums + a * column_stride;
        for (int64_t i = 0; i < rows; i++) {
            const int64_t row = a * rows + i;
            const float *restrict xr = x + row * cols;
            float *restrict ur = u + row * cols;
            float m = xr[0];
            for (int64_t j = 1; j < cols; j++) m = xr[j] > m ? xr[j] : m;
            float t = 0.0f, s = 0.0f;
            for (int64_t j = 0; j < cols; j++) {
                float y = xr[j] - m;
                y = y < log_floor ? log_floor : y;
                float e = xr[j] <= blocked ? 0.0f : exp_nonpositive(y);
                ur[j] = e;
                t += e;
                s += e * y;
            }
            total[row] = t;
            ylogu[row] = s;
            const float w = t > 0.0f ? weights[a * weight_stride + i] / t : 0.0f;
            if (w != 0.0f) {
                const int64_t own = diag_start + i;  /* skipped: the diagonal is no sink evidence */
                const int64_t stop = own >= 0 && own < cols ? own : cols;
                for (int64_t j = 0; j < stop; j++) sums[j] += w * ur[j];
                for (int64_t j = stop + 1; j < cols; j++) sums[j] += w * ur[j];
            }
        }
    }
}
