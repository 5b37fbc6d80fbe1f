/* 4-bit weights x int8 activations on AVX2 (+FMA, F16C): y = x W^T + bias, tuned for batch-1 decode.
 * Built twice by backends/native_build.py: plain AVX2, and with AVX512-VNNI/VL where the CPU has them; the VNNI
 * build does each integer dot with two _mm256_dpbusd_epi32 instead of maddubs/add/madd (same exact sums).
 *
 * Weights (repacked once at load by backends/native.py), in tiles of TILE = 4 output rows streamed in order:
 *   wq    uint8 [N/4][np][4][32]: per pair of input blocks (2 x 32 inputs) and row, 32 bytes; byte j < 16 holds the
 *         codes j (low nibble) and j + 16 (high nibble) of the first block, byte 16 + j those of the second block.
 *         Codes are 0..15; K is padded with zero codes to np = ceil(K / 64) pairs.
 *   scale [N/4][Gp][4] float16 (or float32 when scale_f32), zero int8 [N/4][Gp][4]: w = scale * (q - zero) per op
 *         group of gb blocks of 32 (gb = 1, 2, 4 or 8; for gb = 1 the block count is padded to even).
 * Activations are quantised per block of 32 to int8 with one float scale d (round to nearest, |q| <= 127), stored
 * in the order the nibbles unpack: per pair [first block 0..15][second 0..15][first 16..31][second 16..31]. With
 * xsum[g] = sum over the blocks of group g of d_b * sum(q_b):
 *     y[n] = sum_g scale[n,g] * ( sum_{b in g} d_b * dot(q_w, q_x)_b  -  zero[n,g] * xsum[g] ).
 * dot() is exact in integers: _mm256_maddubs_epi16 multiplies the unsigned codes (<= 15) by the signed int8
 * activations; two of them added stay below 2 * 2 * 15 * 127 < 2^15.
 *
 * Several activation rows (prefill): up to M_BLOCK rows go through a tile together, so that each 32-byte weight
 * piece is loaded and unpacked once for all of them (tile_groups_mb; groups of gb >= 2 blocks). In the AVX512-VNNI
 * build, batches of GEMM_MIN_M rows or more take a register-blocked product over unpacked panels instead (see
 * "batched path" below).
 *
 * Threads (parallel.h): the caller and up to threads - 1 others take chunks of CHUNK_TILES tiles one at a time.
 */
#include "parallel.h"

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 32
#define PAIR 64
#define TILE 4
#define CHUNK_TILES 16
#define M_BLOCK 4

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

typedef struct {
    const uint8_t *wq;
    const void *scale;
    const int8_t *zero;
    const float *bias;
    int64_t N, K, gb, np, Gp;
    int scale_f32;
} weights_t;

typedef struct {
    const int8_t *xq;   /* [M][np * 64] */
    const float *xd;    /* [M][np * 2]: d of each pair's two blocks */
    const float *xsum;  /* [M][Gp] */
    int64_t M;
} acts_t;

/* ------------------------------------------------------------------------------------------- conversions */
static inline __m256 load8(const void *x, int dt, int64_t i) {
    if (dt == DT_BF16) {
        const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    if (dt == DT_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i)));
    return _mm256_loadu_ps((const float *)x + i);
}

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);                 /* round to nearest even */
}

static inline void store4(void *y, int dt, int64_t i, __m128 v) {
    if (dt == DT_F32) {
        _mm_storeu_ps((float *)y + i, v);
    } else if (dt == DT_F16) {
        _mm_storel_epi64((__m128i *)((uint16_t *)y + i), _mm_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    } else {
        float f[4];
        _mm_storeu_ps(f, v);
        for (int r = 0; r < 4; r++) ((uint16_t *)y)[i + r] = to_bf16(f[r]);
    }
}

static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

static inline int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* four row accumulators -> their four horizontal sums */
static inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

/* --------------------------------------------------------------------------------- activation quantisation */
/* One block of 32 inputs (zeros past K) -> 32 int8 codes in input order; returns d, sets *qsum. A NaN input gives
 * d = NaN (an infinite one d = inf), so that the outputs it touches are NaN, as in a float product. */
static inline float quantize_block(const void *x, int dt, int64_t start, int64_t K, __m256i *codes, int32_t *qsum) {
    __m256 v[4];
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 amax = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    for (int j = 0; j < 4; j++) {
        v[j] = start + 8 * j < K ? load8(x, dt, start + 8 * j) : _mm256_setzero_ps();
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v[j], v[j], _CMP_UNORD_Q));
    }
    const float m = _mm256_movemask_ps(nan) ? __builtin_nanf("") : hmax(amax);
    const __m256 id = _mm256_set1_ps(m > 0.f ? 127.f / m : 0.f);
    __m256i q[4];
    for (int j = 0; j < 4; j++) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], id));
    *qsum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    *codes = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    return m / 127.f;
}

/* One activation row (K inputs, dtype dt) -> its pair-ordered int8 codes, pair scales and group sums. */
static void quantize_row(const void *x, int dt, const weights_t *w, int8_t *xq, float *xd, float *xsum) {
    const int64_t nb = w->K / BLOCK;
    memset(xsum, 0, (size_t)w->Gp * sizeof(float));
    for (int64_t p = 0; p < w->np; p++) {
        for (int h = 0; h < 2; h++) {
            const int64_t b = 2 * p + h;
            __m256i c = _mm256_setzero_si256();
            int32_t s = 0;
            const float d = b < nb ? quantize_block(x, dt, b * BLOCK, w->K, &c, &s) : 0.f;
            _mm_storeu_si128((__m128i *)(xq + p * PAIR + h * 16), _mm256_castsi256_si128(c));
            _mm_storeu_si128((__m128i *)(xq + p * PAIR + 32 + h * 16), _mm256_extracti128_si256(c, 1));
            xd[p * 2 + h] = d;
            xsum[b / w->gb] += d * (float)s;
        }
    }
}

/* ----------------------------------------------------------------------------------------------- dot products */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define W4A8_VNNI 1
#endif

/* 8 partial dots (as floats) of one row's pair of blocks, given as its low / high nibbles, with the activations:
 * lanes 0-3 first block, 4-7 second; each lane the exact sum over 4 bytes of both nibble planes. */
static inline __m256 nibble_dot(__m256i lo, __m256i hi, __m256i xl, __m256i xh) {
#ifdef W4A8_VNNI
    return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, xl), hi, xh));
#else
    const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, _mm256_set1_epi16(1)));
#endif
}

static inline void unpack_piece(const uint8_t *wp, __m256i *lo, __m256i *hi) {
    const __m256i mask = _mm256_set1_epi8(0x0f);
    const __m256i raw = _mm256_loadu_si256((const __m256i *)wp);
    *lo = _mm256_and_si256(raw, mask);
    *hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
}

static inline __m256 pair_dot(const uint8_t *wp, __m256i xl, __m256i xh) {
    __m256i lo, hi;
    unpack_piece(wp, &lo, &hi);
    return nibble_dot(lo, hi, xl, xh);
}

/* The activation scales of pair p as lanes [d0 x4, d1 x4] (kept compact so that a long row's scales stay in L1). */
static inline __m256 pair_scales(const float *xd, int64_t p) {
    const __m128 two = _mm_castpd_ps(_mm_load_sd((const double *)(xd + 2 * p)));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(two), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

static inline __m128 load_scales(const weights_t *w, int64_t tile, int64_t g) {
    const int64_t i = (tile * w->Gp + g) * TILE;
    if (w->scale_f32) return _mm_loadu_ps((const float *)w->scale + i);
    return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)((const uint16_t *)w->scale + i)));
}

static inline __m128 load_zeros(const weights_t *w, int64_t tile, int64_t g) {
    int32_t z;
    memcpy(&z, w->zero + (tile * w->Gp + g) * TILE, 4);
    return _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(z)));
}

/* One-row paths: ask for the weight stream PREFETCH_BYTES ahead of the pair being read (a hint; it never faults
 * past the end). Measured side by side on the five benchmark shapes: a few percent more bandwidth, most on long
 * rows (14336 inputs). */
#define PREFETCH_BYTES 4096
static inline void prefetch_ahead(const uint8_t *wp) {
    _mm_prefetch((const char *)(wp + PREFETCH_BYTES), _MM_HINT_T0);
    _mm_prefetch((const char *)(wp + PREFETCH_BYTES + 64), _MM_HINT_T0);
}

/* The four outputs of one tile for one activation row, groups of gb >= 2 blocks (whole pairs). */
static __m128 tile_groups(const weights_t *w, int64_t tile, const int8_t *xq, const float *xd, const float *xsum) {
    const int64_t ppg = w->gb / 2, G = w->Gp;
    const uint8_t *wp = w->wq + tile * w->np * TILE * 32;
    __m256 acc[TILE];
    __m128 corr = _mm_setzero_ps();
    for (int r = 0; r < TILE; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m256 ga[TILE];
        for (int r = 0; r < TILE; r++) ga[r] = _mm256_setzero_ps();
        for (int64_t p = g * ppg; p < (g + 1) * ppg; p++, wp += TILE * 32) {
            prefetch_ahead(wp);
            const __m256i xl = _mm256_loadu_si256((const __m256i *)(xq + p * PAIR));
            const __m256i xh = _mm256_loadu_si256((const __m256i *)(xq + p * PAIR + 32));
            const __m256 d = pair_scales(xd, p);
            for (int r = 0; r < TILE; r++) ga[r] = _mm256_fmadd_ps(pair_dot(wp + r * 32, xl, xh), d, ga[r]);
        }
        const __m128 s = load_scales(w, tile, g);
        corr = _mm_fmadd_ps(_mm_mul_ps(s, load_zeros(w, tile, g)), _mm_set1_ps(xsum[g]), corr);
        const __m256 s8 = _mm256_set_m128(s, s);
        for (int r = 0; r < TILE; r++)
            acc[r] = _mm256_fmadd_ps(ga[r], _mm256_permutevar8x32_ps(s8, _mm256_set1_epi32(r)), acc[r]);
    }
    return _mm_sub_ps(hsum4(acc[0], acc[1], acc[2], acc[3]), corr);
}

/* tile_groups for M_BLOCK activation rows at once (rows[m]: that row's codes, pair scales and group sums; a short
 * batch repeats its last row). Each weight piece is unpacked once and multiplied with every row. */
typedef struct {
    const int8_t *xq[M_BLOCK];
    const float *xd[M_BLOCK], *xsum[M_BLOCK];
} rows_t;

static void tile_groups_mb(const weights_t *w, int64_t tile, const rows_t *rows, __m128 *out) {
    const int64_t ppg = w->gb / 2, G = w->Gp;
    const uint8_t *wp = w->wq + tile * w->np * TILE * 32;
    __m256 acc[M_BLOCK][TILE];
    __m128 corr[M_BLOCK];
    for (int m = 0; m < M_BLOCK; m++) {
        corr[m] = _mm_setzero_ps();
        for (int r = 0; r < TILE; r++) acc[m][r] = _mm256_setzero_ps();
    }
    for (int64_t g = 0; g < G; g++) {
        __m256 ga[M_BLOCK][TILE];
        for (int m = 0; m < M_BLOCK; m++)
            for (int r = 0; r < TILE; r++) ga[m][r] = _mm256_setzero_ps();
        for (int64_t p = g * ppg; p < (g + 1) * ppg; p++, wp += TILE * 32) {
            __m256i lo[TILE], hi[TILE];
            for (int r = 0; r < TILE; r++) unpack_piece(wp + r * 32, &lo[r], &hi[r]);
            for (int m = 0; m < M_BLOCK; m++) {
                const __m256i xl = _mm256_loadu_si256((const __m256i *)(rows->xq[m] + p * PAIR));
                const __m256i xh = _mm256_loadu_si256((const __m256i *)(rows->xq[m] + p * PAIR + 32));
                const __m256 d = pair_scales(rows->xd[m], p);
                for (int r = 0; r < TILE; r++)
                    ga[m][r] = _mm256_fmadd_ps(nibble_dot(lo[r], hi[r], xl, xh), d, ga[m][r]);
            }
        }
        const __m128 s = load_scales(w, tile, g), sz = _mm_mul_ps(s, load_zeros(w, tile, g));
        const __m256 s8 = _mm256_set_m128(s, s);
        for (int r = 0; r < TILE; r++) {
            const __m256 sr = _mm256_permutevar8x32_ps(s8, _mm256_set1_epi32(r));
            for (int m = 0; m < M_BLOCK; m++) acc[m][r] = _mm256_fmadd_ps(ga[m][r], sr, acc[m][r]);
        }
        for (int m = 0; m < M_BLOCK; m++) corr[m] = _mm_fmadd_ps(sz, _mm_set1_ps(rows->xsum[m][g]), corr[m]);
    }
    for (int m = 0; m < M_BLOCK; m++) out[m] = _mm_sub_ps(hsum4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]), corr[m]);
}

/* Same for groups of one block (gb = 1): the two halves of every pair have their own scales. */
static __m128 tile_blocks(const weights_t *w, int64_t tile, const int8_t *xq, const float *xd, const float *xsum) {
    const uint8_t *wp = w->wq + tile * w->np * TILE * 32;
    __m256 acc[TILE];
    __m128 corr = _mm_setzero_ps();
    for (int r = 0; r < TILE; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t p = 0; p < w->np; p++, wp += TILE * 32) {
        prefetch_ahead(wp);
        const __m256i xl = _mm256_loadu_si256((const __m256i *)(xq + p * PAIR));
        const __m256i xh = _mm256_loadu_si256((const __m256i *)(xq + p * PAIR + 32));
        const __m256 d = pair_scales(xd, p);
        const __m128 s0 = load_scales(w, tile, 2 * p), s1 = load_scales(w, tile, 2 * p + 1);
        corr = _mm_fmadd_ps(_mm_mul_ps(s0, load_zeros(w, tile, 2 * p)), _mm_set1_ps(xsum[2 * p]), corr);
        corr = _mm_fmadd_ps(_mm_mul_ps(s1, load_zeros(w, tile, 2 * p + 1)), _mm_set1_ps(xsum[2 * p + 1]), corr);
        const __m256 s8 = _mm256_set_m128(s1, s0);
        for (int r = 0; r < TILE; r++) {
            const __m256 sr = _mm256_permutevar8x32_ps(s8, _mm256_setr_epi32(r, r, r, r, 4 + r, 4 + r, 4 + r, 4 + r));
            acc[r] = _mm256_fmadd_ps(pair_dot(wp + r * 32, xl, xh), _mm256_mul_ps(d, sr), acc[r]);
        }
    }
    return _mm_sub_ps(hsum4(acc[0], acc[1], acc[2], acc[3]), corr);
}

/* ------------------------------------------------------------------------------------ batched path (AVX512) */
/* From GEMM_MIN_M activation rows on, the VNNI build runs a register-blocked product instead: per panel of
 * GEMM_ROWS = 32 output rows (8 tiles) the codes are unpacked once per call into the dpbusd layout
 * [block][step][32 rows][4 codes] (step s = inputs 4s..4s+3 of the block), so that one zmm holds 4 codes of 16 rows,
 * and each 4-byte group of an activation row is broadcast against it. A micro-tile of GEMM_M = 4 activation rows x
 * 32 outputs keeps 8 integer, 8 block-float and 8 group-float accumulators in registers:
 *     block sum  = exact integer dot over 32 inputs, times the row's d_b     (per block)
 *     group sum += block sums; y += scale * group sum - scale * zero * xsum  (per group)
 * The integers are those of the one-row path; only the float summation order differs (results agree to float32
 * rounding). Output rows past the last whole panel (N % 32) take the one-row path's tiles. */
#define GEMM_ROWS 32
#if defined(W4A8_VNNI) && defined(__AVX512F__) && defined(__AVX512BW__)
#define W4A8_GEMM 1
#define GEMM_TILES (GEMM_ROWS / TILE)
#define GEMM_M M_BLOCK /* rows_t holds M_BLOCK rows */
#define GEMM_MIN_M 8 /* measured: from 8 rows on it beats the one-row path on 2048/8192 shapes */

/* r[i] (16 dwords each) -> r[j] lane i = old r[i] dword j */
static inline void transpose16(__m512i r[16]) {
    __m512i a[16], b[16];
    for (int i = 0; i < 16; i += 2) {
        a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int q = 0; q < 16; q += 4) {  /* b[q + j], 128-bit lane L: rows q..q+3 of dword 4L + j */
        b[q] = _mm512_unpacklo_epi64(a[q], a[q + 2]);
        b[q + 1] = _mm512_unpackhi_epi64(a[q], a[q + 2]);
        b[q + 2] = _mm512_unpacklo_epi64(a[q + 1], a[q + 3]);
        b[q + 3] = _mm512_unpackhi_epi64(a[q + 1], a[q + 3]);
    }
    for (int j = 0; j < 4; j++) {  /* 4 x 4 transpose of 128-bit lanes among b[j], b[4 + j], b[8 + j], b[12 + j] */
        const __m512i c0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x44), c1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xee);
        const __m512i c2 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x44);
        const __m512i c3 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xee);
        r[j] = _mm512_shuffle_i32x4(c0, c2, 0x88);
        r[4 + j] = _mm512_shuffle_i32x4(c0, c2, 0xdd);
        r[8 + j] = _mm512_shuffle_i32x4(c1, c3, 0x88);
        r[12 + j] = _mm512_shuffle_i32x4(c1, c3, 0xdd);
    }
}

/* One row's 32-byte piece of a pair -> its 64 codes in input order (first block, then second) as 16 dwords. */
static inline __m512i piece_codes(const uint8_t *wp) {
    __m256i lo, hi;
    unpack_piece(wp, &lo, &hi);
    const __m256i first = _mm256_permute2x128_si256(lo, hi, 0x20), second = _mm256_permute2x128_si256(lo, hi, 0x31);
    return _mm512_inserti64x4(_mm512_castsi256_si512(first), second, 1);
}

typedef struct {
    uint32_t *codes; /* [2 * np blocks][8 steps][GEMM_ROWS]: 4 codes of one row */
    float *scale;    /* [Gp][GEMM_ROWS] */
    float *szero;    /* [Gp][GEMM_ROWS]: scale * zero */
} panel_t;

static void unpack_panel(const weights_t *w, int64_t t0, const panel_t *P) {
    for (int h = 0; h < 2; h++) {
        for (int64_t p = 0; p < w->np; p++) {
            __m512i r[16];
            for (int i = 0; i < 16; i++)
                r[i] = piece_codes(w->wq + ((t0 + 4 * h + i / 4) * w->np + p) * TILE * 32 + (i % 4) * 32);
            transpose16(r);
            for (int j = 0; j < 16; j++)
                _mm512_storeu_si512(P->codes + ((2 * p + j / 8) * 8 + j % 8) * GEMM_ROWS + 16 * h, r[j]);
        }
    }
    for (int64_t g = 0; g < w->Gp; g++) {
        for (int n = 0; n < GEMM_ROWS; n++) {
            const int64_t i = ((t0 + n / TILE) * w->Gp + g) * TILE + n % TILE;
            const float s = w->scale_f32 ? ((const float *)w->scale)[i] : _cvtsh_ss(((const uint16_t *)w->scale)[i]);
            P->scale[g * GEMM_ROWS + n] = s;
            P->szero[g * GEMM_ROWS + n] = s * (float)w->zero[i];
        }
    }
}

/* Where the 4 activation codes of step s of block b are in the pair order of quantize_row. */
static inline int64_t act_offset(int64_t b, int s) {
    return (b / 2) * PAIR + (s < 4 ? 0 : 32) + (b % 2) * 16 + (s % 4) * 4;
}

static inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* The 32 outputs of a panel for GEMM_M activation rows: acc[m][h] = outputs 16h..16h+15 of row m. */
static void gemm_tile(const weights_t *w, const panel_t *P, const rows_t *rows, __m512 acc[GEMM_M][2]) {
    for (int m = 0; m < GEMM_M; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < w->Gp; g++) {
        __m512 ga[GEMM_M][2];
        for (int m = 0; m < GEMM_M; m++) ga[m][0] = ga[m][1] = _mm512_setzero_ps();
        for (int64_t b = g * w->gb; b < (g + 1) * w->gb; b++) {
            const uint32_t *pw = P->codes + b * 8 * GEMM_ROWS;
            __m512i ia[GEMM_M][2];
            for (int m = 0; m < GEMM_M; m++) ia[m][0] = ia[m][1] = _mm512_setzero_si512();
            for (int s = 0; s < 8; s++) {
                const __m512i w0 = _mm512_loadu_si512(pw + s * GEMM_ROWS);
                const __m512i w1 = _mm512_loadu_si512(pw + s * GEMM_ROWS + 16);
                const int64_t off = act_offset(b, s);
                for (int m = 0; m < GEMM_M; m++) {
                    const __m512i x = _mm512_set1_epi32(load_i32(rows->xq[m] + off));
                    ia[m][0] = _mm512_dpbusd_epi32(ia[m][0], w0, x);
                    ia[m][1] = _mm512_dpbusd_epi32(ia[m][1], w1, x);
                }
            }
            for (int m = 0; m < GEMM_M; m++) {
                const __m512 d = _mm512_set1_ps(rows->xd[m][b]);
                ga[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[m][0]), d, ga[m][0]);
                ga[m][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[m][1]), d, ga[m][1]);
            }
        }
        for (int h = 0; h < 2; h++) {
            const __m512 s = _mm512_loadu_ps(P->scale + g * GEMM_ROWS + 16 * h);
            const __m512 sz = _mm512_loadu_ps(P->szero + g * GEMM_ROWS + 16 * h);
            for (int m = 0; m < GEMM_M; m++) {
                acc[m][h] = _mm512_fmadd_ps(ga[m][h], s, acc[m][h]);
                acc[m][h] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(rows->xsum[m][g]), acc[m][h]);
            }
        }
    }
}

static inline void store16(void *y, int dt, int64_t i, __m512 v) {
    if (dt == DT_F32) {
        _mm512_storeu_ps((float *)y + i, v);
    } else if (dt == DT_F16) {
        _mm256_storeu_si256((__m256i *)((uint16_t *)y + i), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    } else { /* bfloat16, rounded to nearest even as to_bf16 */
        const __m512i u = _mm512_castps_si512(v);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
        const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
        _mm256_storeu_si256((__m256i *)((uint16_t *)y + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
    }
}

/* All activation rows against panel `panel` (output rows 32 * panel ...). */
static void run_panel(const weights_t *w, const acts_t *a, int64_t panel, const panel_t *P, void *y, int dt) {
    const int64_t t0 = panel * GEMM_TILES, n0 = t0 * TILE;
    unpack_panel(w, t0, P);
    __m512 bias[2];
    for (int h = 0; h < 2; h++) bias[h] = w->bias ? _mm512_loadu_ps(w->bias + n0 + 16 * h) : _mm512_setzero_ps();
    for (int64_t m0 = 0; m0 < a->M; m0 += GEMM_M) {
        const int64_t m1 = m0 + GEMM_M < a->M ? m0 + GEMM_M : a->M;
        rows_t rows;
        for (int m = 0; m < GEMM_M; m++) {
            const int64_t row = m0 + m < m1 ? m0 + m : m1 - 1;
            rows.xq[m] = a->xq + row * w->np * PAIR;
            rows.xd[m] = a->xd + row * w->np * 2;
            rows.xsum[m] = a->xsum + row * w->Gp;
        }
        __m512 acc[GEMM_M][2];
        gemm_tile(w, P, &rows, acc);
        for (int64_t m = m0; m < m1; m++)
            for (int h = 0; h < 2; h++) store16(y, dt, m * w->N + n0 + 16 * h, _mm512_add_ps(acc[m - m0][h], bias[h]));
    }
}
#endif

/* ------------------------------------------------------------------------------------------------- driver */
/* Tiles t0..t1-1 for every activation row, the one-row path. */
static void run_tiles(const weights_t *w, const acts_t *a, int64_t t0, int64_t t1, void *y, int dt) {
    const int64_t xq_row = w->np * PAIR, xd_row = w->np * 2;
    for (int64_t m0 = 0; m0 < a->M; m0 += M_BLOCK) {
        const int64_t m1 = m0 + M_BLOCK < a->M ? m0 + M_BLOCK : a->M;
        if (w->gb > 1 && m1 - m0 > 1) {
            rows_t rows;
            for (int m = 0; m < M_BLOCK; m++) {
                const int64_t row = m0 + m < m1 ? m0 + m : m1 - 1;
                rows.xq[m] = a->xq + row * xq_row;
                rows.xd[m] = a->xd + row * xd_row;
                rows.xsum[m] = a->xsum + row * w->Gp;
            }
            for (int64_t t = t0; t < t1; t++) {
                const __m128 b = w->bias ? _mm_loadu_ps(w->bias + t * TILE) : _mm_setzero_ps();
                __m128 v[M_BLOCK];
                tile_groups_mb(w, t, &rows, v);
                for (int64_t m = m0; m < m1; m++) store4(y, dt, m * w->N + t * TILE, _mm_add_ps(v[m - m0], b));
            }
            continue;
        }
        for (int64_t t = t0; t < t1; t++) {
            const __m128 b = w->bias ? _mm_loadu_ps(w->bias + t * TILE) : _mm_setzero_ps();
            for (int64_t m = m0; m < m1; m++) {
                const int8_t *xq = a->xq + m * xq_row;
                const float *xd = a->xd + m * xd_row, *xs = a->xsum + m * w->Gp;
                const __m128 v = w->gb == 1 ? tile_blocks(w, t, xq, xd, xs) : tile_groups(w, t, xq, xd, xs);
                store4(y, dt, m * w->N + t * TILE, _mm_add_ps(v, b));
            }
        }
    }
}

/* Per-thread scratch for the quantised activations, grown on demand (never shrunk). */
static _Thread_local void *scratch;
static _Thread_local size_t scratch_size;

static void *get_scratch(size_t n) {
    if (n > scratch_size) {
        free(scratch);
        scratch = aligned_alloc(64, (n + 63) / 64 * 64);
        scratch_size = scratch ? n : 0;
    }
    return scratch;
}

typedef struct {
    const weights_t *w;
    const acts_t *a;
    const void *x;
    void *y;
    int dt;
    int64_t panels; /* batched path: whole panels of GEMM_ROWS outputs; the rest is one more item */
    int *failed;    /* set when a thread could not get its panel scratch */
} job_t;

static void quantize_item(const void *ctx, int64_t m) {
    const job_t *j = ctx;
    const size_t elt = j->dt == DT_F32 ? 4 : 2;
    quantize_row((const char *)j->x + m * j->w->K * elt, j->dt, j->w, (int8_t *)j->a->xq + m * j->w->np * PAIR,
                 (float *)j->a->xd + m * j->w->np * 2, (float *)j->a->xsum + m * j->w->Gp);
}

static void chunk_item(const void *ctx, int64_t c) {
    const job_t *j = ctx;
    const int64_t t0 = c * CHUNK_TILES, n_tiles = j->w->N / TILE;
    run_tiles(j->w, j->a, t0, t0 + CHUNK_TILES < n_tiles ? t0 + CHUNK_TILES : n_tiles, j->y, j->dt);
}

#ifdef W4A8_GEMM
/* Per-thread scratch for one unpacked panel, grown on demand (never shrunk). */
static _Thread_local void *panel_scratch;
static _Thread_local size_t panel_scratch_size;

static int get_panel(const weights_t *w, panel_t *P) {
    const size_t code_bytes = (size_t)(w->np * 2 * 8 * GEMM_ROWS) * 4, scale_bytes = (size_t)(w->Gp * GEMM_ROWS) * 4;
    const size_t n = code_bytes + 2 * scale_bytes;
    if (n > panel_scratch_size) {
        free(panel_scratch);
        panel_scratch = aligned_alloc(64, (n + 63) / 64 * 64);
        panel_scratch_size = panel_scratch ? n : 0;
    }
    if (!panel_scratch) return 0;
    P->codes = panel_scratch;
    P->scale = (float *)((char *)panel_scratch + code_bytes);
    P->szero = (float *)((char *)panel_scratch + code_bytes + scale_bytes);
    return 1;
}

static void panel_item(const void *ctx, int64_t i) {
    const job_t *j = ctx;
    if (i == j->panels) {
        run_tiles(j->w, j->a, j->panels * GEMM_TILES, j->w->N / TILE, j->y, j->dt);
        return;
    }
    panel_t P;
    if (!get_panel(j->w, &P)) {
        __atomic_store_n(j->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    run_panel(j->w, j->a, i, &P, j->y, j->dt);
}
#endif

/* What the caller keeps per layer (built once, see native.py). */
typedef struct {
    const uint8_t *wq;
    const void *scale;
    const int8_t *zero;
    int64_t N, K, gb;
    int64_t scale_f32;
} layer_t;

/* y[M, N] (dtype dt) = x[M, K] (dtype dt) W^T + bias on `threads` threads of the given parallel.h mode.
 * Returns 0, or -1 when scratch memory cannot be had. */
int w4a8_linear(const layer_t *L, const float *bias, const void *x, void *y, int64_t M, int dt, int threads,
                int mode) {
    const int64_t K = L->K, N = L->N, gb = L->gb;
    const int64_t np = (K + PAIR - 1) / PAIR, Gp = gb == 1 ? 2 * np : K / (BLOCK * gb);
    const weights_t w = {L->wq, L->scale, L->zero, bias, N, K, gb, np, Gp, (int)L->scale_f32};
    const size_t xq_bytes = (size_t)(M * np * PAIR), xd_bytes = (size_t)(M * np * 2) * sizeof(float);
    char *buf = get_scratch(xq_bytes + xd_bytes + (size_t)(M * Gp) * sizeof(float));
    if (!buf) return -1;
    const acts_t a = {(int8_t *)buf, (float *)(buf + xq_bytes), (float *)(buf + xq_bytes + xd_bytes), M};
    int failed = 0;
    const job_t job = {&w, &a, x, y, dt, N / GEMM_ROWS, &failed};
    parallel_run(mode, M >= 4 ? threads : 1, M, quantize_item, &job);
#ifdef W4A8_GEMM
    if (M >= GEMM_MIN_M && job.panels > 0) {
        parallel_run(mode, threads, job.panels + (N % GEMM_ROWS != 0), panel_item, &job);
        return failed ? -1 : 0;
    }
#endif
    parallel_run(mode, threads, (N / TILE + CHUNK_TILES - 1) / CHUNK_TILES, chunk_item, &job);
    return 0;
}

/* From how many activation rows on this build takes the batched path (0: it has none). */
int w4a8_batched_from(void) {
#ifdef W4A8_GEMM
    return GEMM_MIN_M;
#else
    return 0;
#endif
}

/* Which integer dot this build does: 1 = AVX512-VNNI dpbusd, 0 = AVX2 maddubs. */
int w4a8_vnni(void) {
#ifdef W4A8_VNNI
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------------------------------------------- self-test */
typedef struct {
    pthread_t caller;
    int32_t *runs, *by_worker;
    int sleep_us;
} check_t;

static void check_item(const void *ctx, int64_t i) {
    const check_t *c = ctx;
    __atomic_fetch_add(&c->runs[i], 1, __ATOMIC_RELAXED);
    c->by_worker[i] = !pthread_equal(pthread_self(), c->caller);
    if (c->sleep_us) usleep((useconds_t)c->sleep_us);
}

/* For tests: run n_items items on `threads` threads of parallel.h `mode`; runs[i] counts the executions of item i,
 * by_worker[i] says whether another thread than the caller ran it. Each item sleeps sleep_us microseconds, giving
 * the other threads time to join. */
void w4a8_parallel_check(int mode, int threads, int64_t n_items, int sleep_us, int32_t *runs, int32_t *by_worker) {
    const check_t c = {pthread_self(), runs, by_worker, sleep_us};
    parallel_run(mode, threads, n_items, check_item, &c);
}
