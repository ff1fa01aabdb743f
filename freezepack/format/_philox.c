/* freezepack's compiled CPU kernel for the spec'd generator (spec/RNG.md, "philox4x32-10/v1").
 *
 * It must produce the same bits as the numpy reference in freezepack/format/rng.py and freezepack/format/init.py:
 *   element i of stream s under seed k:  word = Philox4x32-10(ctr=(i/4 lo, i/4 hi, s lo, s hi), key=k)[i%4]
 *   uniform  u = (2*(w>>9)+1) * 2^-24
 *   normal   octave table: mag = A[idx] + f*D[idx], negated when the top bit is set
 *   sign     +1 / -1 by the top bit
 *   output   normal/uniform: a + b*x ;  sign: a*s ;  then optionally * scale (frozen_scale)
 * Every float operation is one correctly rounded IEEE float32 multiply or add. Built with -ffp-contract=off and
 * without -ffast-math, so the compiler may not fuse a multiply and an add into an FMA or reassociate anything;
 * int -> float conversions are exact (values < 2^24). Integer work is exact uint32/uint64 arithmetic.
 *
 * Each element depends only on (seed, stream, index), so the split across threads cannot change a bit.
 * Loaded with ctypes by freezepack/format/native.py; compiled on first use.
 */
#include <float.h>
#include <stdint.h>
#include <stddef.h>
#include <pthread.h>

/* float expressions must be evaluated in float (not x87 extended precision, which rounds twice): otherwise refuse
 * to build, and freezepack uses the torch path. */
#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "float arithmetic is not evaluated in float32 (FLT_EVAL_METHOD != 0)"
#endif

#define FP_ABI_VERSION 2

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u
#define NORMAL_K 7

/* Blocks of 4 words computed together: independent lanes the compiler can keep in vector registers. */
#define BATCH 16
#define WORDS (4 * BATCH)

enum { DIST_NORMAL = 0, DIST_UNIFORM = 1, DIST_SIGN = 2 };

typedef struct {
    uint32_t k0[10], k1[10];
    uint32_t s0, s1;
} fp_key;

static void key_init(fp_key *k, uint64_t seed, uint64_t stream) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; r++) {
        k->k0[r] = k0;
        k->k1[r] = k1;
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
    k->s0 = (uint32_t)stream;
    k->s1 = (uint32_t)(stream >> 32);
}

/* Words of blocks [block, block+BATCH) into w[0..WORDS), in element order. */
static inline void philox_batch(const fp_key *k, uint64_t block, uint32_t *restrict w) {
    uint32_t c0[BATCH], c1[BATCH], c2[BATCH], c3[BATCH];
    for (int i = 0; i < BATCH; i++) {
        uint64_t b = block + (uint64_t)i;
        c0[i] = (uint32_t)b;
        c1[i] = (uint32_t)(b >> 32);
        c2[i] = k->s0;
        c3[i] = k->s1;
    }
    for (int r = 0; r < 10; r++) {
        uint32_t k0 = k->k0[r], k1 = k->k1[r];
        for (int i = 0; i < BATCH; i++) {
            uint64_t p0 = (uint64_t)c0[i] * PHILOX_M0;
            uint64_t p1 = (uint64_t)c2[i] * PHILOX_M1;
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1[i] ^ k0;
            uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3[i] ^ k1;
            c1[i] = (uint32_t)p1;
            c3[i] = (uint32_t)p0;
            c0[i] = n0;
            c2[i] = n2;
        }
    }
    for (int i = 0; i < BATCH; i++) {
        w[4 * i + 0] = c0[i];
        w[4 * i + 1] = c1[i];
        w[4 * i + 2] = c2[i];
        w[4 * i + 3] = c3[i];
    }
}

/* 2^-k for k in [0, 31], exact float32 (products with it are exact scalings). */
static const float POW2NEG[32] = {
    0x1p-0f,  0x1p-1f,  0x1p-2f,  0x1p-3f,  0x1p-4f,  0x1p-5f,  0x1p-6f,  0x1p-7f,
    0x1p-8f,  0x1p-9f,  0x1p-10f, 0x1p-11f, 0x1p-12f, 0x1p-13f, 0x1p-14f, 0x1p-15f,
    0x1p-16f, 0x1p-17f, 0x1p-18f, 0x1p-19f, 0x1p-20f, 0x1p-21f, 0x1p-22f, 0x1p-23f,
    0x1p-24f, 0x1p-25f, 0x1p-26f, 0x1p-27f, 0x1p-28f, 0x1p-29f, 0x1p-30f, 0x1p-31f,
};

/* x, negated when the top bit of w is set. IEEE negation is exactly a sign-bit flip; done on the bits so that
 * an unpredictable branch does not cost a misprediction per element. */
static inline float with_sign_of(float x, uint32_t w) {
    union { float f; uint32_t u; } v = {x};
    v.u ^= w & 0x80000000u;
    return v.f;
}

/* Standard normal of one word (rng.normal_np). */
static inline float normal_word(uint32_t w, const float *restrict A, const float *restrict D) {
    uint32_t n = ((w & 0x7FFFFFFFu) << 1) | 1u;   /* odd, in [1, 2^32): tail mass n / 2^32 */
    int e = 31 - __builtin_clz(n);                /* bit_length(n) - 1; n != 0 */
    uint64_t r = (uint64_t)(n - (1u << e)) << NORMAL_K;
    uint32_t j = (uint32_t)(r >> e);              /* cell in [0, 128) */
    uint64_t rem = r - ((uint64_t)j << e);        /* < 2^e */
    int sh = e > 24 ? e - 24 : 0;
    float f = (float)(uint32_t)(rem >> sh) * POW2NEG[e - sh]; /* exact: < 2^24 times a power of two */
    int idx = (e << NORMAL_K) + (int)j;
    float p = f * D[idx];
    float mag = A[idx] + p;
    return with_sign_of(mag, w);
}

/* Convert words w[0..count) into out[0..count). Loops are kept separate per distribution so each vectorizes. */
static inline void convert(const uint32_t *restrict w, float *restrict out, int count, int dist, float a, float b,
                           int use_scale, float scale, const float *restrict A, const float *restrict D) {
    if (dist == DIST_NORMAL) {
        for (int i = 0; i < count; i++) {
            float z = normal_word(w[i], A, D);
            float p = b * z;
            out[i] = a + p;
        }
    } else if (dist == DIST_UNIFORM) {
        for (int i = 0; i < count; i++) {
            float u = (float)(int32_t)(((w[i] >> 9) << 1) | 1u) * 0x1p-24f;
            float p = b * u;
            out[i] = a + p;
        }
    } else {
        for (int i = 0; i < count; i++) {
            float s = with_sign_of(1.0f, w[i]);
            out[i] = a * s;
        }
    }
    if (use_scale) {
        for (int i = 0; i < count; i++) out[i] = out[i] * scale;
    }
}

/* ---------------------------------------------------------------------------------------------------------------
 * AVX2 paths (x86-64, chosen at run time when the CPU has AVX2): the same integer operations on 8 lanes, and the
 * same float32 operations (separate multiplies and adds: no FMA is enabled for them, and contraction is off), so
 * the same bits. The normal conversion uses an equivalent 32-bit form of normal_word, exact step by step:
 *   e = bit_length(n >> 1)  (n odd: bit_length(n) - 1), from the float exponent of n >> 1, corrected down by one
 *       when the conversion rounded up to the next power of two;
 *   j = the 7 bits below n's leading one;  frac = the e - 7 bits below those (0 when e < 7);
 *   f = float(frac) * 2^-(e-7)  -- normal_word's (rem >> sh) * 2^-(e-sh) is the same exact value.
 * ------------------------------------------------------------------------------------------------------------- */
static int simd = -1;  /* -1: not decided yet; 0: scalar; 1: AVX2; 2: AVX-512F (Philox, normal conversion) */

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FP_AVX2 1

__attribute__((target("avx2"))) static inline void mulhilo8(__m256i a, __m256i m, __m256i *hi, __m256i *lo) {
    __m256i even = _mm256_mul_epu32(a, m);                          /* lanes 0,2,4,6: 64-bit products */
    __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);    /* lanes 1,3,5,7 */
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

__attribute__((target("avx2"))) static void philox_batch_avx2(const fp_key *k, uint64_t block, uint32_t *restrict w) {
    const __m256i m0 = _mm256_set1_epi32((int)PHILOX_M0), m1 = _mm256_set1_epi32((int)PHILOX_M1);
    for (int g = 0; g < BATCH; g += 8) {
        uint32_t lo32[8], hi32[8];
        for (int i = 0; i < 8; i++) {
            uint64_t b = block + (uint64_t)(g + i);
            lo32[i] = (uint32_t)b;
            hi32[i] = (uint32_t)(b >> 32);
        }
        __m256i c0 = _mm256_loadu_si256((const __m256i *)lo32), c1 = _mm256_loadu_si256((const __m256i *)hi32);
        __m256i c2 = _mm256_set1_epi32((int)k->s0), c3 = _mm256_set1_epi32((int)k->s1);
        for (int r = 0; r < 10; r++) {
            __m256i hi0, lo0, hi1, lo1;
            mulhilo8(c0, m0, &hi0, &lo0);
            mulhilo8(c2, m1, &hi1, &lo1);
            __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32((int)k->k0[r]));
            __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32((int)k->k1[r]));
            c1 = lo1;
            c3 = lo0;
            c0 = n0;
            c2 = n2;
        }
        uint32_t o0[8], o1[8], o2[8], o3[8];
        _mm256_storeu_si256((__m256i *)o0, c0);
        _mm256_storeu_si256((__m256i *)o1, c1);
        _mm256_storeu_si256((__m256i *)o2, c2);
        _mm256_storeu_si256((__m256i *)o3, c3);
        for (int i = 0; i < 8; i++) {
            w[4 * (g + i) + 0] = o0[i];
            w[4 * (g + i) + 1] = o1[i];
            w[4 * (g + i) + 2] = o2[i];
            w[4 * (g + i) + 3] = o3[i];
        }
    }
}

__attribute__((target("avx2"))) static void convert_avx2(const uint32_t *restrict w, float *restrict out, int count,
                                                         int dist, float a, float b, int use_scale, float scale,
                                                         const float *restrict A, const float *restrict D) {
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b), vs = _mm256_set1_ps(scale);
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u), one = _mm256_set1_epi32(1);
    const __m256i seven = _mm256_set1_epi32(NORMAL_K), zero = _mm256_setzero_si256();
    int i = 0;
    for (; i + 8 <= count; i += 8) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(w + i));
        __m256 y;
        if (dist == DIST_NORMAL) {
            __m256i n = _mm256_or_si256(_mm256_slli_epi32(x, 1), one);         /* odd, in [1, 2^32) */
            __m256i m = _mm256_srli_epi32(n, 1);                               /* < 2^31 */
            __m256i t = _mm256_sub_epi32(_mm256_srli_epi32(_mm256_castps_si256(_mm256_cvtepi32_ps(m)), 23),
                                         _mm256_set1_epi32(127));              /* floor(log2(float(m))) */
            __m256i up = _mm256_cmpeq_epi32(_mm256_srlv_epi32(m, t), zero);    /* rounded up to a power of 2 */
            __m256i e = _mm256_max_epi32(_mm256_add_epi32(_mm256_add_epi32(t, one), up), zero);
            __m256i down = _mm256_max_epi32(_mm256_sub_epi32(e, seven), zero); /* e - 7, or 0 */
            __m256i left = _mm256_max_epi32(_mm256_sub_epi32(seven, e), zero); /* 7 - e, or 0 */
            __m256i j = _mm256_and_si256(_mm256_sllv_epi32(_mm256_srlv_epi32(n, down), left),
                                         _mm256_set1_epi32(127));
            __m256i frac = _mm256_and_si256(n, _mm256_sub_epi32(_mm256_sllv_epi32(one, down), one));
            __m256 pw = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_sub_epi32(_mm256_set1_epi32(127), down), 23));
            __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(frac), pw);           /* exact */
            __m256i idx = _mm256_add_epi32(_mm256_slli_epi32(e, NORMAL_K), j);
            __m256 p = _mm256_mul_ps(f, _mm256_i32gather_ps(D, idx, 4));
            __m256 mag = _mm256_add_ps(_mm256_i32gather_ps(A, idx, 4), p);
            __m256 z = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(mag), _mm256_and_si256(x, sign)));
            y = _mm256_add_ps(va, _mm256_mul_ps(vb, z));
        } else if (dist == DIST_UNIFORM) {
            __m256i k24 = _mm256_or_si256(_mm256_slli_epi32(_mm256_srli_epi32(x, 9), 1), one);
            __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(k24), _mm256_set1_ps(0x1p-24f));
            y = _mm256_add_ps(va, _mm256_mul_ps(vb, u));
        } else {
            __m256 s = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(_mm256_set1_ps(1.0f)),
                                                            _mm256_and_si256(x, sign)));
            y = _mm256_mul_ps(va, s);
        }
        if (use_scale) y = _mm256_mul_ps(y, vs);
        _mm256_storeu_ps(out + i, y);
    }
    if (i < count) convert(w + i, out + i, count - i, dist, a, b, use_scale, scale, A, D);
}

/* AVX-512F Philox: the AVX2 rounds on 16 lanes (all BATCH blocks at once); words back to element order by a 4x4
 * transpose in each 128-bit lane, then one of the 128-bit lanes across the four registers. The conversion stays
 * AVX2 (its table gathers, not the lane count, bound it). */
#define FP_AVX512 1

__attribute__((target("avx512f"))) static inline void mulhilo16(__m512i a, __m512i m, __m512i *hi, __m512i *lo) {
    __m512i even = _mm512_mul_epu32(a, m);                          /* lanes 0,2,..,14: 64-bit products */
    __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);    /* lanes 1,3,..,15 */
    *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
    *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

__attribute__((target("avx512f"))) static void philox_batch_avx512(const fp_key *k, uint64_t block,
                                                                   uint32_t *restrict w) {
    const __m512i m0 = _mm512_set1_epi32((int)PHILOX_M0), m1 = _mm512_set1_epi32((int)PHILOX_M1);
    __m512i c0, c1;
    if ((uint32_t)block <= 0xFFFFFFFFu - (BATCH - 1)) {  /* no carry into the high word within the batch */
        c0 = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)block),
                              _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        c1 = _mm512_set1_epi32((int)(uint32_t)(block >> 32));
    } else {
        uint32_t lo32[BATCH], hi32[BATCH];
        for (int i = 0; i < BATCH; i++) {
            uint64_t b = block + (uint64_t)i;
            lo32[i] = (uint32_t)b;
            hi32[i] = (uint32_t)(b >> 32);
        }
        c0 = _mm512_loadu_si512((const void *)lo32);
        c1 = _mm512_loadu_si512((const void *)hi32);
    }
    __m512i c2 = _mm512_set1_epi32((int)k->s0), c3 = _mm512_set1_epi32((int)k->s1);
    for (int r = 0; r < 10; r++) {
        __m512i hi0, lo0, hi1, lo1;
        mulhilo16(c0, m0, &hi0, &lo0);
        mulhilo16(c2, m1, &hi1, &lo1);
        __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32((int)k->k0[r]));
        __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32((int)k->k1[r]));
        c1 = lo1;
        c3 = lo0;
        c0 = n0;
        c2 = n2;
    }
    __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
    __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
    __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);  /* 128-bit lane j: block 4j, 4j+1 */
    __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);  /* 4j+2, 4j+3 */
    __m512i a = _mm512_shuffle_i32x4(u0, u1, 0x44), b = _mm512_shuffle_i32x4(u2, u3, 0x44);
    __m512i c = _mm512_shuffle_i32x4(u0, u1, 0xEE), d = _mm512_shuffle_i32x4(u2, u3, 0xEE);
    _mm512_storeu_si512((void *)(w + 0), _mm512_shuffle_i32x4(a, b, 0x88));   /* blocks 0-3 */
    _mm512_storeu_si512((void *)(w + 16), _mm512_shuffle_i32x4(a, b, 0xDD));  /* blocks 4-7 */
    _mm512_storeu_si512((void *)(w + 32), _mm512_shuffle_i32x4(c, d, 0x88));  /* blocks 8-11 */
    _mm512_storeu_si512((void *)(w + 48), _mm512_shuffle_i32x4(c, d, 0xDD));  /* blocks 12-15 */
}

/* The normal conversion on 16 lanes, step by step convert_avx2's (the comparison gives a mask, turned back into
 * the 0 / -1 vector the AVX2 form adds); uniform and sign stay on convert_avx2. */
__attribute__((target("avx512f,avx2"))) static void convert_avx512(const uint32_t *restrict w, float *restrict out,
                                                                   int count, int dist, float a, float b,
                                                                   int use_scale, float scale,
                                                                   const float *restrict A, const float *restrict D) {
    if (dist != DIST_NORMAL) {
        convert_avx2(w, out, count, dist, a, b, use_scale, scale, A, D);
        return;
    }
    const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b), vs = _mm512_set1_ps(scale);
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u), one = _mm512_set1_epi32(1);
    const __m512i seven = _mm512_set1_epi32(NORMAL_K), zero = _mm512_setzero_si512();
    const __m512i minus_one = _mm512_set1_epi32(-1);
    int i = 0;
    for (; i + 16 <= count; i += 16) {
        __m512i x = _mm512_loadu_si512((const void *)(w + i));
        __m512i n = _mm512_or_si512(_mm512_slli_epi32(x, 1), one);
        __m512i m = _mm512_srli_epi32(n, 1);
        __m512i t = _mm512_sub_epi32(_mm512_srli_epi32(_mm512_castps_si512(_mm512_cvtepi32_ps(m)), 23),
                                     _mm512_set1_epi32(127));
        __m512i up = _mm512_mask_blend_epi32(_mm512_cmpeq_epi32_mask(_mm512_srlv_epi32(m, t), zero), zero, minus_one);
        __m512i e = _mm512_max_epi32(_mm512_add_epi32(_mm512_add_epi32(t, one), up), zero);
        __m512i down = _mm512_max_epi32(_mm512_sub_epi32(e, seven), zero);
        __m512i left = _mm512_max_epi32(_mm512_sub_epi32(seven, e), zero);
        __m512i j = _mm512_and_si512(_mm512_sllv_epi32(_mm512_srlv_epi32(n, down), left), _mm512_set1_epi32(127));
        __m512i frac = _mm512_and_si512(n, _mm512_sub_epi32(_mm512_sllv_epi32(one, down), one));
        __m512 pw = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_sub_epi32(_mm512_set1_epi32(127), down), 23));
        __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(frac), pw);
        __m512i idx = _mm512_add_epi32(_mm512_slli_epi32(e, NORMAL_K), j);
        __m512 p = _mm512_mul_ps(f, _mm512_i32gather_ps(idx, D, 4));
        __m512 mag = _mm512_add_ps(_mm512_i32gather_ps(idx, A, 4), p);
        __m512 z = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(mag), _mm512_and_si512(x, sign)));
        __m512 y = _mm512_add_ps(va, _mm512_mul_ps(vb, z));
        if (use_scale) y = _mm512_mul_ps(y, vs);
        _mm512_storeu_ps(out + i, y);
    }
    if (i < count) convert_avx2(w + i, out + i, count - i, dist, a, b, use_scale, scale, A, D);
}
#endif

static void choose_simd(void) {
    if (simd >= 0) return;
#ifdef FP_AVX2
    __builtin_cpu_init();
    simd = __builtin_cpu_supports("avx2") ? (__builtin_cpu_supports("avx512f") ? 2 : 1) : 0;
#else
    simd = 0;
#endif
}

static inline void batch_words(const fp_key *k, uint64_t block, uint32_t *w) {
#ifdef FP_AVX2
    if (simd == 2) { philox_batch_avx512(k, block, w); return; }
    if (simd == 1) { philox_batch_avx2(k, block, w); return; }
#endif
    philox_batch(k, block, w);
}

static inline void convert_any(const uint32_t *w, float *out, int count, int dist, float a, float b, int use_scale,
                               float scale, const float *A, const float *D) {
#ifdef FP_AVX2
    if (simd == 2) { convert_avx512(w, out, count, dist, a, b, use_scale, scale, A, D); return; }
    if (simd == 1) { convert_avx2(w, out, count, dist, a, b, use_scale, scale, A, D); return; }
#endif
    convert(w, out, count, dist, a, b, use_scale, scale, A, D);
}

/* Elements [start, start+count) of the stream into out[0..count). */
static void fill_range(const fp_key *k, float *out, uint64_t start, uint64_t count, int dist, float a, float b,
                       int use_scale, float scale, const float *A, const float *D) {
    uint32_t w[WORDS];
    uint64_t done = 0;
    uint64_t block = start >> 2;
    unsigned off = (unsigned)(start & 3);          /* first batch may begin mid-block */
    while (done < count) {
        batch_words(k, block, w);
        uint64_t take = WORDS - off;
        if (take > count - done) take = count - done;
        convert_any(w + off, out + done, (int)take, dist, a, b, use_scale, scale, A, D);
        done += take;
        block += BATCH;
        off = 0;
    }
}

static void words_range(const fp_key *k, uint32_t *out, uint64_t start, uint64_t count) {
    uint32_t w[WORDS];
    uint64_t done = 0;
    uint64_t block = start >> 2;
    unsigned off = (unsigned)(start & 3);
    while (done < count) {
        batch_words(k, block, w);
        uint64_t take = WORDS - off;
        if (take > count - done) take = count - done;
        for (uint64_t i = 0; i < take; i++) out[done + i] = w[off + i];
        done += take;
        block += BATCH;
        off = 0;
    }
}

typedef struct {
    const fp_key *k;
    float *out;
    uint64_t start, count;
    int dist, use_scale;
    float a, b, scale;
    const float *A, *D;
} fp_job;

static void *run_job(void *arg) {
    fp_job *j = (fp_job *)arg;
    fill_range(j->k, j->out, j->start, j->count, j->dist, j->a, j->b, j->use_scale, j->scale, j->A, j->D);
    return NULL;
}

#define MAX_THREADS 256
#define MIN_PER_THREAD (1u << 16)  /* below this a thread costs more than it saves */

int fp_abi_version(void) { return FP_ABI_VERSION; }

/* sha256 of this file as it was built by the package installer (setup.py passes it), "" when built elsewhere: a
 * library installed with the package is only used while it matches the installed source. */
#ifndef FP_SOURCE_SHA256
#define FP_SOURCE_SHA256 ""
#endif
const char *fp_source_sha256(void) { return FP_SOURCE_SHA256; }

/* out[i] = element (start + i) for i < count. dist: 0 normal, 1 uniform, 2 sign. Returns 0, or -1 on bad args.
 * nthreads <= 1 runs on the calling thread; thread creation failure falls back to the calling thread. */
int fp_fill(float *out, uint64_t start, uint64_t count, uint64_t seed, uint64_t stream, int dist, float a, float b,
            int use_scale, float scale, const float *A, const float *D, int nthreads) {
    if (dist < DIST_NORMAL || dist > DIST_SIGN) return -1;
    if (dist == DIST_NORMAL && (A == NULL || D == NULL)) return -1;
    if (count == 0) return 0;
    if (out == NULL) return -1;
    choose_simd();  /* before any thread starts */
    fp_key k;
    key_init(&k, seed, stream);
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    uint64_t most = count / MIN_PER_THREAD;
    if ((uint64_t)nthreads > most) nthreads = (int)most;
    if (nthreads <= 1) {
        fill_range(&k, out, start, count, dist, a, b, use_scale, scale, A, D);
        return 0;
    }
    fp_job jobs[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS];
    /* Pieces are multiples of WORDS elements so every thread but the last runs whole batches; ceil(count / n)
     * rounded up, so the n pieces always cover count (a floor here once left up to n - 1 elements unwritten). */
    uint64_t per = ((count + (uint64_t)nthreads - 1) / (uint64_t)nthreads + WORDS - 1) / WORDS * WORDS;
    uint64_t pos = 0;
    int n = 0;
    for (; n < nthreads && pos < count; n++) {
        uint64_t c = count - pos < per ? count - pos : per;
        jobs[n] = (fp_job){&k, out + pos, start + pos, c, dist, use_scale, a, b, scale, A, D};
        pos += c;
    }
    for (int t = 1; t < n; t++) started[t] = pthread_create(&tids[t], NULL, run_job, &jobs[t]) == 0;
    run_job(&jobs[0]);
    for (int t = 1; t < n; t++) {
        if (started[t]) pthread_join(tids[t], NULL);
        else run_job(&jobs[t]);
    }
    return 0;
}

/* Raw uint32 words of elements [start, start+count) (for tests and tools). */
int fp_words(uint32_t *out, uint64_t start, uint64_t count, uint64_t seed, uint64_t stream) {
    if (count == 0) return 0;
    if (out == NULL) return -1;
    choose_simd();
    fp_key k;
    key_init(&k, seed, stream);
    words_range(&k, out, start, count);
    return 0;
}

/* The conversion alone, on given words (tests reach every octave of the normal table this way). */
int fp_convert(const uint32_t *w, float *out, uint64_t count, int dist, float a, float b, int use_scale, float scale,
               const float *A, const float *D) {
    if (dist < DIST_NORMAL || dist > DIST_SIGN) return -1;
    if (dist == DIST_NORMAL && (A == NULL || D == NULL)) return -1;
    choose_simd();
    for (uint64_t done = 0; done < count; done += WORDS) {
        uint64_t take = count - done < WORDS ? count - done : WORDS;
        convert_any(w + done, out + done, (int)take, dist, a, b, use_scale, scale, A, D);
    }
    return 0;
}

/* The vector path in use (2: AVX-512F, 1: AVX2, 0: scalar); with on = 0, 1 or 2, switch to it first (tests compare
 * them; each only where the CPU has it). Not for use while a fill runs on another thread. */
int fp_simd(int on) {
    choose_simd();
#ifdef FP_AVX2
    if (on == 0) simd = 0;
    if (on == 1) simd = __builtin_cpu_supports("avx2") ? 1 : 0;
    if (on == 2) simd = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avx512f") ? 2 : 0;
#else
    (void)on;
#endif
    return simd;
}
