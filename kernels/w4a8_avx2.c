/* 4-bit weights x int8 activations on AVX2 (+FMA): y = x W^T for small and large batches.
 *
 * Weights (built once in Python, see backends/native.py), per output row n, per block of 32 inputs: 16 bytes,
 * byte j = q[32b + j] | q[32b + 16 + j] << 4, codes q in 0..15. Per row and op group g (gb blocks of 32):
 * scale[n * G + g] and szero[n * G + g] (= scale * zero point), so that w = scale * q - szero.
 *
 * Activations are quantised per block of 32 to int8 with one float scale (xs), and per group we keep
 * xsum[g] = sum over its blocks of xs_b * sum(xq_b). Then
 *     y[m, n] = sum_g ( scale[n,g] * sum_{b in g} xs[m,b] * dot(q_b, xq_b)  -  szero[n,g] * xsum[m,g] ).
 * dot(q_b, xq_b) is exact in int32: _mm256_maddubs_epi16 multiplies unsigned codes (<= 15) by signed int8
 * (|x| <= 127), pair sums stay below 2^15.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define BLOCK 32

/* x: float [M, K] -> xq int8 [M, K], xs float [M, K/32], xsum float [M, G] (G = K / (32 * gb)). */
void w4a8_quantize_act(const float *x, int64_t M, int64_t K, int64_t gb, int8_t *xq, float *xs, float *xsum) {
    const int64_t nb = K / BLOCK, G = nb / gb;
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        for (int64_t g = 0; g < G; g++) {
            float gs = 0.f;
            for (int64_t b = g * gb; b < (g + 1) * gb; b++) {
                const float *xb = xr + b * BLOCK;
                __m256 amax = _mm256_setzero_ps();
                const __m256 sign = _mm256_set1_ps(-0.0f);
                for (int j = 0; j < BLOCK; j += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + j)));
                __m128 a4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
                a4 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
                a4 = _mm_max_ss(a4, _mm_shuffle_ps(a4, a4, 1));
                const float amx = _mm_cvtss_f32(a4);
                const float d = amx / 127.f;
                const float id = amx > 0.f ? 127.f / amx : 0.f;
                int32_t s = 0;
                int8_t *q = xq + m * K + b * BLOCK;
                for (int j = 0; j < BLOCK; j++) {
                    int v = (int)lrintf(xb[j] * id);
                    v = v > 127 ? 127 : (v < -127 ? -127 : v);
                    q[j] = (int8_t)v;
                    s += v;
                }
                xs[m * nb + b] = d;
                gs += d * (float)s;
            }
            xsum[m * G + g] = gs;
        }
    }
}

static inline __m256i unpack_block(const uint8_t *p, __m128i low_mask) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)p);
    const __m128i lo = _mm_and_si128(raw, low_mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low_mask);
    return _mm256_set_m128i(hi, lo);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* rows [n0, n1) of y[M, N] (float). ROWS rows at a time share the activation loads. */
#define ROWS 4
static void rows_kernel(const uint8_t *wq, const float *scale, const float *szero, const int8_t *xq,
                        const float *xs, const float *xsum, float *y, int64_t M, int64_t N, int64_t K, int64_t gb,
                        int64_t n0, int64_t n1) {
    const int64_t nb = K / BLOCK, G = nb / gb, row_bytes = K / 2;
    const __m128i low_mask = _mm_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    int64_t n = n0;
    for (; n + ROWS <= n1; n += ROWS) {
        int64_t m = 0;
        for (; m + 2 <= M; m += 2) { /* two activation rows share every unpacked weight block */
            const int8_t *xq0 = xq + m * K, *xq1 = xq + (m + 1) * K;
            const float *xs0 = xs + m * nb, *xs1 = xs + (m + 1) * nb;
            __m256 acc0[ROWS], acc1[ROWS];
            float corr0[ROWS], corr1[ROWS];
            for (int r = 0; r < ROWS; r++) {
                acc0[r] = acc1[r] = _mm256_setzero_ps();
                corr0[r] = corr1[r] = 0.f;
            }
            for (int64_t g = 0; g < G; g++) {
                __m256 ga0[ROWS], ga1[ROWS];
                for (int r = 0; r < ROWS; r++) ga0[r] = ga1[r] = _mm256_setzero_ps();
                for (int64_t b = g * gb; b < (g + 1) * gb; b++) {
                    const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq0 + b * BLOCK));
                    const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq1 + b * BLOCK));
                    const __m256 d0 = _mm256_set1_ps(xs0[b]), d1 = _mm256_set1_ps(xs1[b]);
                    for (int r = 0; r < ROWS; r++) {
                        const __m256i wv = unpack_block(wq + (n + r) * row_bytes + b * (BLOCK / 2), low_mask);
                        const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, x0), ones);
                        const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, x1), ones);
                        ga0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), d0, ga0[r]);
                        ga1[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), d1, ga1[r]);
                    }
                }
                for (int r = 0; r < ROWS; r++) {
                    const float sg = scale[(n + r) * G + g], zg = szero[(n + r) * G + g];
                    acc0[r] = _mm256_fmadd_ps(ga0[r], _mm256_set1_ps(sg), acc0[r]);
                    acc1[r] = _mm256_fmadd_ps(ga1[r], _mm256_set1_ps(sg), acc1[r]);
                    corr0[r] += zg * xsum[m * G + g];
                    corr1[r] += zg * xsum[(m + 1) * G + g];
                }
            }
            for (int r = 0; r < ROWS; r++) {
                y[m * N + n + r] = hsum(acc0[r]) - corr0[r];
                y[(m + 1) * N + n + r] = hsum(acc1[r]) - corr1[r];
            }
        }
        for (; m < M; m++) {
            const int8_t *xqm = xq + m * K;
            const float *xsm = xs + m * nb;
            __m256 acc[ROWS];
            float corr[ROWS];
            for (int r = 0; r < ROWS; r++) { acc[r] = _mm256_setzero_ps(); corr[r] = 0.f; }
            for (int64_t g = 0; g < G; g++) {
                __m256 ga[ROWS];
                for (int r = 0; r < ROWS; r++) ga[r] = _mm256_setzero_ps();
                for (int64_t b = g * gb; b < (g + 1) * gb; b++) {
                    const __m256i xv = _mm256_loadu_si256((const __m256i *)(xqm + b * BLOCK));
                    const __m256 d = _mm256_set1_ps(xsm[b]);
                    for (int r = 0; r < ROWS; r++) {
                        const __m256i wv = unpack_block(wq + (n + r) * row_bytes + b * (BLOCK / 2), low_mask);
                        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones);
                        ga[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, ga[r]);
                    }
                }
                for (int r = 0; r < ROWS; r++) {
                    acc[r] = _mm256_fmadd_ps(ga[r], _mm256_set1_ps(scale[(n + r) * G + g]), acc[r]);
                    corr[r] += szero[(n + r) * G + g] * xsum[m * G + g];
                }
            }
            for (int r = 0; r < ROWS; r++) y[m * N + n + r] = hsum(acc[r]) - corr[r];
        }
    }
    for (; n < n1; n++) {
        for (int64_t m = 0; m < M; m++) {
            __m256 acc = _mm256_setzero_ps();
            float corr = 0.f;
            for (int64_t g = 0; g < G; g++) {
                const float sg = scale[n * G + g];
                corr += szero[n * G + g] * xsum[m * G + g];
                for (int64_t b = g * gb; b < (g + 1) * gb; b++) {
                    const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + m * K + b * BLOCK));
                    const __m256i wv = unpack_block(wq + n * row_bytes + b * (BLOCK / 2), low_mask);
                    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones);
                    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(xs[m * nb + b] * sg), acc);
                }
            }
            y[m * N + n] = hsum(acc) - corr;
        }
    }
}

/* y[M, N] = dequant(W) applied to the quantised activations; threads split the output rows. */
void w4a8_matmul(const uint8_t *wq, const float *scale, const float *szero, const int8_t *xq, const float *xs,
                 const float *xsum, float *y, int64_t M, int64_t N, int64_t K, int64_t gb, int threads) {
    const int64_t chunk = 64;
    const int64_t n_chunks = (N + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < n_chunks; c++) {
        const int64_t n0 = c * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        rows_kernel(wq, scale, szero, xq, xs, xsum, y, M, N, K, gb, n0, n1);
    }
}
