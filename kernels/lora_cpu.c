/* add_lora for the CPU decode layout, fp32: lorad.kernels.lora_cpu builds and calls it (contract
   there). The PyTorch twin runs this layout as bmm, mul, bmm + add: three passes and MKL's
   batched-GEMM setup for [2, 576] x [576, 16]-sized problems, 210 times a step. Here each
   adapter's A and B rows are read once per pair of its tokens (decode has two per adapter at
   batch 16 over 8), straight from memory into FMAs.
   At batch 16 over 8 rank-16 adapters a step reads 156 MB of adapter weights: ~8 ms on one core
   of this project's machine, the floor; the kernel takes ~14 ms (kernels/README.md says where
   the rest goes). */
#include <immintrin.h>
#include <stdint.h>

#define MAX_RANK 256
#define TOK 2 /* tokens per pass over an adapter's rows */

static inline float hsum(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* v[t * r + j] = scale * dot(a row j, x row t), for TT tokens. Four accumulators per token:
   one chain of dependent FMAs would wait on each FMA's latency (a 576-long dot: 72 in a row). */
static void shrink(int64_t TT, int64_t r, int64_t H_in, const float* x, int64_t ldx, const float* a, float scale,
                   float* v) {
    for (int64_t j = 0; j < r; j++) {
        const float* arow = a + j * H_in;
        for (int64_t t0 = 0; t0 < TT; t0 += TOK) {
            int64_t tt = TT - t0 < TOK ? TT - t0 : TOK;
            __m256 p[4], q[4];
            for (int i = 0; i < 4; i++) {
                p[i] = _mm256_setzero_ps();
                q[i] = _mm256_setzero_ps();
            }
            const float* x0 = x + t0 * ldx;
            const float* x1 = x0 + (tt > 1 ? ldx : 0);
            int64_t k = 0;
            for (; k + 32 <= H_in; k += 32)
                for (int i = 0; i < 4; i++) {
                    __m256 av = _mm256_loadu_ps(arow + k + 8 * i);
                    p[i] = _mm256_fmadd_ps(av, _mm256_loadu_ps(x0 + k + 8 * i), p[i]);
                    q[i] = _mm256_fmadd_ps(av, _mm256_loadu_ps(x1 + k + 8 * i), q[i]);
                }
            for (; k + 8 <= H_in; k += 8) {
                __m256 av = _mm256_loadu_ps(arow + k);
                p[0] = _mm256_fmadd_ps(av, _mm256_loadu_ps(x0 + k), p[0]);
                q[0] = _mm256_fmadd_ps(av, _mm256_loadu_ps(x1 + k), q[0]);
            }
            float s0 = hsum(_mm256_add_ps(_mm256_add_ps(p[0], p[1]), _mm256_add_ps(p[2], p[3])));
            float s1 = hsum(_mm256_add_ps(_mm256_add_ps(q[0], q[1]), _mm256_add_ps(q[2], q[3])));
            for (; k < H_in; k++) {
                s0 += arow[k] * x0[k];
                s1 += arow[k] * x1[k];
            }
            v[t0 * r + j] = s0 * scale;
            if (tt > 1) v[(t0 + 1) * r + j] = s1 * scale;
        }
    }
}

/* y row t += sum_j v[t * r + j] * b row j, for TT tokens. B is streamed row after row (one pass
   over memory, in order); the TT rows of y being accumulated stay in L1. */
static void expand(int64_t TT, int64_t r, int64_t H_out, const float* v, const float* b, float* y, int64_t ldy) {
    for (int64_t t0 = 0; t0 < TT; t0 += TOK) {
        int64_t tt = TT - t0 < TOK ? TT - t0 : TOK;
        float* y0 = y + t0 * ldy;
        float* y1 = y0 + (tt > 1 ? ldy : 0);
        const float* v0 = v + t0 * r;
        const float* v1 = v0 + (tt > 1 ? r : 0);
        for (int64_t j = 0; j < r; j++) {
            const float* brow = b + j * H_out;
            __m256 s0 = _mm256_set1_ps(v0[j]), s1 = _mm256_set1_ps(v1[j]);
            int64_t c = 0;
            if (tt > 1) {
                for (; c + 8 <= H_out; c += 8) {
                    __m256 bv = _mm256_loadu_ps(brow + c);
                    _mm256_storeu_ps(y0 + c, _mm256_fmadd_ps(s0, bv, _mm256_loadu_ps(y0 + c)));
                    _mm256_storeu_ps(y1 + c, _mm256_fmadd_ps(s1, bv, _mm256_loadu_ps(y1 + c)));
                }
                for (; c < H_out; c++) {
                    y0[c] += v0[j] * brow[c];
                    y1[c] += v1[j] * brow[c];
                }
            } else {
                for (; c + 8 <= H_out; c += 8)
                    _mm256_storeu_ps(y0 + c, _mm256_fmadd_ps(s0, _mm256_loadu_ps(brow + c), _mm256_loadu_ps(y0 + c)));
                for (; c < H_out; c++) y0[c] += v0[j] * brow[c];
            }
        }
    }
}

/* For adapter i < n: its L token rows x[i*L .. i*L+L) (row stride ldx), its A [r, H_in] at
   a + i * a_stride and B [r, H_out] at b + i * b_stride (rows contiguous), scale[i]:
   y[row] += scale[i] * (x[row] @ A^T) @ B. Returns 0, or 1 when r > MAX_RANK. */
int lorad_lora_decode_f32(int64_t n, int64_t L, int64_t r, int64_t H_in, int64_t H_out, const float* x, int64_t ldx,
                          const float* a, int64_t a_stride, const float* b, int64_t b_stride, const float* scale,
                          float* y, int64_t ldy, int64_t threads) {
    if (r > MAX_RANK) return 1;
    if (n <= 0 || L <= 0 || r <= 0) return 0;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        for (int64_t t0 = 0; t0 < L; t0 += 16) { /* v for up to 16 tokens at a time: [16, r] on the stack */
            int64_t tt = L - t0 < 16 ? L - t0 : 16;
            float v[16 * MAX_RANK];
            const float* xi = x + (i * L + t0) * ldx;
            shrink(tt, r, H_in, xi, ldx, a + i * a_stride, scale[i], v);
            expand(tt, r, H_out, v, b + i * b_stride, y + (i * L + t0) * ldy, ldy);
        }
    }
    return 0;
}
