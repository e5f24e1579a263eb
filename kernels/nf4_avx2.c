/* NF4 x fp32 matmul on AVX2 + FMA CPUs: lorad.kernels.nf4_avx2 builds and calls it (contract
   there). bitsandbytes has a fused NF4 CPU kernel only for AVX512-BF16; on AVX2 it dequantizes
   the whole weight on every call, and a kept fp32 copy reads 8x the NF4 bytes. This reads the
   packed bytes once per call and decodes them in registers: for up to 4 rows of x straight into
   the dot products, for more into a small buffer per 3 weight rows that a 4 x 3 tile reads. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 64 /* weights per absmax scale (bitsandbytes' default blocksize) */
#define ROWS 4   /* rows of x per pass: sharing one decode (few rows) or a micro-kernel tile (more) */
#define COLS 3   /* weight rows per micro-kernel tile: 4 x 3 accumulators + 3 weights + x = 16 ymm */
#define FEW_ROWS 4 /* up to this many rows of x, decode in registers; above, decode once into a buffer */

/* The 32 weights of 16 packed bytes (high nibble first) as 4 x 8 fp32 codes, each group of 8 in
   the order [0, 2, 4, 6, 1, 3, 5, 7] (x is permuted to match): one vpshufb per byte of the fp32
   code value, then two unpack rounds put the 4 bytes of each value together. */
static inline void decode32(const uint8_t* p, const __m256i table[4], __m256 out[4]) {
    __m128i b = _mm_loadu_si128((const __m128i*)p);
    __m128i low4 = _mm_set1_epi8(0x0F);
    /* lane 0: high nibbles = elements 0, 2, .., 30; lane 1: low nibbles = elements 1, 3, .., 31 */
    __m256i idx = _mm256_set_m128i(_mm_and_si128(b, low4), _mm_and_si128(_mm_srli_epi16(b, 4), low4));
    __m256i b0 = _mm256_shuffle_epi8(table[0], idx), b1 = _mm256_shuffle_epi8(table[1], idx);
    __m256i b2 = _mm256_shuffle_epi8(table[2], idx), b3 = _mm256_shuffle_epi8(table[3], idx);
    __m256i lo01 = _mm256_unpacklo_epi8(b0, b1), hi01 = _mm256_unpackhi_epi8(b0, b1);
    __m256i lo23 = _mm256_unpacklo_epi8(b2, b3), hi23 = _mm256_unpackhi_epi8(b2, b3);
    out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));
    out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));
    out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));
    out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));
}

static inline float hsum(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* y[i * ldy] = dot(xp row i, weight row) for i < MM; one decode per 64 weights serves MM rows.
   Within a block the sum runs in two chains (a, c), then is scaled once and added to acc. */
#define ROW_KERNEL(MM)                                                                              \
    static inline void rows_##MM(int64_t K, const float* xp, const uint8_t* w, const float* scale,  \
                                 const __m256i table[4], float* y, int64_t ldy) {                   \
        __m256 acc[MM];                                                                             \
        for (int i = 0; i < MM; i++) acc[i] = _mm256_setzero_ps();                                  \
        for (int64_t k0 = 0; k0 < K; k0 += BLOCK) {                                                 \
            __m256 f[4], g[4], s = _mm256_set1_ps(scale[k0 / BLOCK]);                               \
            decode32(w + k0 / 2, table, f);                                                         \
            decode32(w + k0 / 2 + 16, table, g);                                                    \
            for (int i = 0; i < MM; i++) {                                                          \
                const float* xi = xp + i * K + k0;                                                  \
                __m256 a = _mm256_mul_ps(f[0], _mm256_loadu_ps(xi));                                \
                __m256 c = _mm256_mul_ps(f[1], _mm256_loadu_ps(xi + 8));                            \
                a = _mm256_fmadd_ps(f[2], _mm256_loadu_ps(xi + 16), a);                             \
                c = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(xi + 24), c);                             \
                a = _mm256_fmadd_ps(g[0], _mm256_loadu_ps(xi + 32), a);                             \
                c = _mm256_fmadd_ps(g[1], _mm256_loadu_ps(xi + 40), c);                             \
                a = _mm256_fmadd_ps(g[2], _mm256_loadu_ps(xi + 48), a);                             \
                c = _mm256_fmadd_ps(g[3], _mm256_loadu_ps(xi + 56), c);                             \
                acc[i] = _mm256_fmadd_ps(_mm256_add_ps(a, c), s, acc[i]);                           \
            }                                                                                       \
        }                                                                                           \
        for (int i = 0; i < MM; i++) y[i * ldy] = hsum(acc[i]);                                     \
    }
ROW_KERNEL(1)
ROW_KERNEL(2)
ROW_KERNEL(3)
ROW_KERNEL(4)

/* More rows: y[i * ldy + j] = dot(xp row i, wbuf row j) for i < MM, j < NN, the NN weight rows
   decoded and scaled into wbuf [NN, K] once. A 4 x 3 tile loads 4 + 3 vectors per 12 FMAs: the
   one-row loop above loads one x vector per FMA and is bound by loads, not by decoding. */
#define TILE_KERNEL(MM, NN)                                                                         \
    static void tile_##MM##_##NN(int64_t K, const float* xp, const float* wbuf, float* y, int64_t ldy) { \
        __m256 acc[MM][NN];                                                                         \
        for (int i = 0; i < MM; i++)                                                                \
            for (int j = 0; j < NN; j++) acc[i][j] = _mm256_setzero_ps();                           \
        for (int64_t k = 0; k < K; k += 8) {                                                        \
            __m256 wv[NN];                                                                          \
            for (int j = 0; j < NN; j++) wv[j] = _mm256_loadu_ps(wbuf + j * K + k);                 \
            for (int i = 0; i < MM; i++) {                                                          \
                __m256 xv = _mm256_loadu_ps(xp + i * K + k);                                        \
                for (int j = 0; j < NN; j++) acc[i][j] = _mm256_fmadd_ps(wv[j], xv, acc[i][j]);     \
            }                                                                                       \
        }                                                                                           \
        for (int i = 0; i < MM; i++)                                                                \
            for (int j = 0; j < NN; j++) y[i * ldy + j] = hsum(acc[i][j]);                          \
    }
TILE_KERNEL(1, 1) TILE_KERNEL(2, 1) TILE_KERNEL(3, 1) TILE_KERNEL(4, 1)
TILE_KERNEL(1, 2) TILE_KERNEL(2, 2) TILE_KERNEL(3, 2) TILE_KERNEL(4, 2)
TILE_KERNEL(1, 3) TILE_KERNEL(2, 3) TILE_KERNEL(3, 3) TILE_KERNEL(4, 3)
typedef void (*tile_fn)(int64_t, const float*, const float*, float*, int64_t);
static const tile_fn TILES[ROWS][COLS] = {{tile_1_1, tile_1_2, tile_1_3}, {tile_2_1, tile_2_2, tile_2_3},
                                          {tile_3_1, tile_3_2, tile_3_3}, {tile_4_1, tile_4_2, tile_4_3}};

/* One weight row, decoded and scaled (code * absmax, as bitsandbytes dequantizes), in decode32's order. */
static inline void decode_row(int64_t K, const uint8_t* w, const float* scale, const __m256i table[4], float* out) {
    for (int64_t k0 = 0; k0 < K; k0 += 32) {
        __m256 f[4], s = _mm256_set1_ps(scale[k0 / BLOCK]);
        decode32(w + k0 / 2, table, f);
        for (int j = 0; j < 4; j++) _mm256_storeu_ps(out + k0 + 8 * j, _mm256_mul_ps(f[j], s));
    }
}

/* Returns 0 (nothing to do for M or N <= 0), 1 when K is not a positive multiple of 64, 2 when out of memory. */
int lorad_nf4_matmul_f32(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const uint8_t* w,
                         const float* absmax, const float* code, float* y, int64_t ldy, int64_t threads) {
    if (M <= 0 || N <= 0) return 0;
    if (K <= 0 || K % BLOCK) return 1;
    float* xp = malloc(sizeof(float) * (size_t)(M * K)); /* [M, K]: x in decode32's order */
    if (!xp) return 2;
    static const int order[8] = {0, 2, 4, 6, 1, 3, 5, 7};
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k += 8)
            for (int i = 0; i < 8; i++) xp[m * K + k + i] = x[m * ldx + k + order[i]];
    uint8_t bytes[4][16]; /* byte b of each of the 16 fp32 code values */
    for (int j = 0; j < 16; j++) {
        uint32_t u;
        memcpy(&u, code + j, 4);
        for (int b = 0; b < 4; b++) bytes[b][j] = (uint8_t)(u >> (8 * b));
    }
    __m256i table[4];
    for (int b = 0; b < 4; b++) table[b] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)bytes[b]));
    int failed = 0;
    if (M <= FEW_ROWS) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t* w_row = w + n * K / 2;
            const float* scale = absmax + n * K / BLOCK;
            const float* xm = xp;
            float* ym = y + n;
            switch (M) {
                case 1: rows_1(K, xm, w_row, scale, table, ym, ldy); break;
                case 2: rows_2(K, xm, w_row, scale, table, ym, ldy); break;
                case 3: rows_3(K, xm, w_row, scale, table, ym, ldy); break;
                default: rows_4(K, xm, w_row, scale, table, ym, ldy); break;
            }
        }
    } else {
#pragma omp parallel num_threads(threads) if (threads > 1)
        {
            float* wbuf = malloc(sizeof(float) * (size_t)(COLS * K)); /* this thread's decoded weight rows */
            if (!wbuf) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(static)
            for (int64_t n0 = 0; n0 < N; n0 += COLS) {
                if (!wbuf) continue;
                int nn = N - n0 < COLS ? (int)(N - n0) : COLS;
                for (int j = 0; j < nn; j++)
                    decode_row(K, w + (n0 + j) * K / 2, absmax + (n0 + j) * K / BLOCK, table, wbuf + j * K);
                for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
                    int mm = M - m0 < ROWS ? (int)(M - m0) : ROWS;
                    TILES[mm - 1][nn - 1](K, xp + m0 * K, wbuf, y + m0 * ldy + n0, ldy);
                }
            }
            free(wbuf);
        }
    }
    free(xp);
    return failed ? 2 : 0;
}
