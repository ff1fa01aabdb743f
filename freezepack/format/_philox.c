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

#define FP_ABI_VERSION 1

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

/* Elements [start, start+count) of the stream into out[0..count). */
static void fill_range(const fp_key *k, float *out, uint64_t start, uint64_t count, int dist, float a, float b,
                       int use_scale, float scale, const float *A, const float *D) {
    uint32_t w[WORDS];
    uint64_t done = 0;
    uint64_t block = start >> 2;
    unsigned off = (unsigned)(start & 3);          /* first batch may begin mid-block */
    while (done < count) {
        philox_batch(k, block, w);
        uint64_t take = WORDS - off;
        if (take > count - done) take = count - done;
        convert(w + off, out + done, (int)take, dist, a, b, use_scale, scale, A, D);
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
        philox_batch(k, block, w);
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
    for (uint64_t done = 0; done < count; done += WORDS) {
        uint64_t take = count - done < WORDS ? count - done : WORDS;
        convert(w + done, out + done, (int)take, dist, a, b, use_scale, scale, A, D);
    }
    return 0;
}
