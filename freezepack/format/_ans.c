/* freezepack's compiled decoder for the ANS core of spec/FORMAT.md §6.3, and the context ranking of §12.7.2.
 *
 * ANS: 32-bit words, 64-bit state, 24-bit quantiles; the stack is popped from the END of `words`. One call decodes
 * a run of n symbols with one model given by its cdf table (cdf[0] = 0 < cdf[1] < ... < cdf[m] = 2^24), exactly:
 *     q = state mod 2^24;  s = the symbol with cdf[s] <= q < cdf[s+1]
 *     state = (state >> 24) * (cdf[s+1] - cdf[s]) + (q - cdf[s])
 *     if state < 2^32 and words are left: state = (state << 32) | next word
 * Only integer arithmetic, so it equals constriction's AnsCoder.decode bit for bit (freezepack/format/ans.py checks
 * that on first use). The caller keeps (words left, state) between calls and judges the end of the stream.
 *
 * Context bins: bin[i] = floor(rank[i] * bins / n), rank = position of i when sorted by (key[i], i), without sorting
 * all n keys (fp_ctx_bins).
 *
 * Loaded with ctypes by freezepack/format/ans.py; built on first use by freezepack/format/native.py's builder.
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#define FP_ANS_ABI_VERSION 3  /* 2: fp_score_hist, fp_score_mask; 3: fp_score_split */
#define PRECISION 24
#define QMASK ((1u << PRECISION) - 1u)
#define SLOT_BITS 12                       /* quantile -> symbol table: at most 4096 slots (32 KiB) */
#define SLOTS (1u << SLOT_BITS)
#define MAX_SYMBOLS 65536u

int fp_ans_abi_version(void) { return FP_ANS_ABI_VERSION; }

/* sha256 of this file as it was built by the package installer (setup.py passes it), "" when built elsewhere: a
 * library installed with the package is only used while it matches the installed source. */
#ifndef FP_SOURCE_SHA256
#define FP_SOURCE_SHA256 ""
#endif
const char *fp_ans_source_sha256(void) { return FP_SOURCE_SHA256; }

/* words[1 .. left] is the rest of the stream (popped from the end), words[0] a readable pad: the refill is a
 * conditional move, not a branch that mispredicts every few symbols. */
static inline uint64_t refill(uint64_t state, const uint32_t *words, uint64_t *left) {
    uint64_t l = *left, need = (state < ((uint64_t)1 << 32)) & (l != 0);
    uint64_t refilled = (state << 32) | words[l];
    *left = l - need;
    return need ? refilled : state;
}

/* the largest s in [lo, hi] with cdf[s] <= q (the caller guarantees cdf[lo] <= q) */
static inline uint32_t find(const uint32_t *cdf, uint32_t q, uint32_t lo, uint32_t hi) {
    if (hi - lo <= 8) {
        while (lo < hi && cdf[lo + 1] <= q) lo++;
        return lo;
    }
    while (lo < hi) {
        uint32_t mid = lo + ((hi - lo + 1) >> 1);
        if (cdf[mid] <= q) lo = mid; else hi = mid - 1;
    }
    return lo;
}

static inline void put(uint8_t *out, uint64_t i, const uint32_t *index, int64_t stride, int width,
                       const uint8_t *values, uint32_t s) {
    int64_t at = (int64_t)(index ? index[i] : i) * stride;
    if (width == 1) out[at] = values ? values[s] : (uint8_t)s;
    else *(int64_t *)(out + at) = (int64_t)s;
}

/* Decode n symbols with the model cdf[0..m] into out: symbol i goes to element index[i] (or i when index is NULL)
 * at out + element*stride bytes; width 1: a byte, values[s] when values is given, else s; width 8: an int64 s.
 * io = {words left, state}, updated; words as refill() says. Returns 0, or -1 for an invalid model or output
 * description (nothing decoded then). */
int fp_ans_decode(const uint32_t *words, uint64_t *io, const uint32_t *cdf, uint32_t m, uint64_t n,
                  uint8_t *out, int64_t stride, int width, const uint8_t *values, const uint32_t *index) {
    if (m < 1 || m > MAX_SYMBOLS || cdf[0] != 0 || cdf[m] != (1u << PRECISION)) return -1;
    for (uint32_t s = 0; s < m; s++)
        if (cdf[s + 1] <= cdf[s]) return -1;
    if (!(width == 1 || width == 8) || (width == 1 && !values && m > 256)) return -1;
    uint64_t left = io[0], state = io[1];
    /* the slot tables below: no larger than the run, so a short run does not pay for 4096 slots */
    uint32_t bits = SLOT_BITS;
    while (bits > 4 && ((uint64_t)1 << bits) > n) bits--;
    const uint32_t shift = PRECISION - bits, slots = 1u << bits;
    if (m == 2) {  /* binary models (every mask symbol): one comparison */
        const uint32_t c1 = cdf[1];
        for (uint64_t i = 0; i < n; i++) {
            uint32_t q = (uint32_t)state & QMASK;
            uint32_t s = q >= c1;
            uint32_t lo = s ? c1 : 0, prob = s ? (1u << PRECISION) - c1 : c1;
            state = refill((state >> PRECISION) * prob + (q - lo), words, &left);
            put(out, i, index, stride, width, values, s);
        }
    } else if (m <= 256) {
        /* slot[j] describes quantiles [j << shift, (j + 1) << shift): when one symbol s holds them all,
         * cdf[s] | s << 24 and prob[s] (one load instead of table, then cdf); else IMPURE | the first symbol, and
         * the symbol is searched between it and the next slot's first symbol. */
        uint64_t slot[SLOTS + 1];
        const uint64_t IMPURE = (uint64_t)1 << 63;
        uint32_t s = 0;
        for (uint32_t j = 0; j <= slots; j++) {
            uint32_t q = j < slots ? j << shift : (1u << PRECISION) - 1;
            while (cdf[s + 1] <= q) s++;
            uint64_t first = cdf[s] | (uint64_t)s << 24;
            uint32_t last_q = j < slots ? q + (1u << shift) - 1 : q;
            slot[j] = cdf[s + 1] > last_q ? first | (uint64_t)(cdf[s + 1] - cdf[s]) << 32 : IMPURE | first;
        }
        for (uint64_t i = 0; i < n; i++) {
            uint32_t q = (uint32_t)state & QMASK;
            uint64_t e = slot[q >> shift];
            uint32_t t = (uint32_t)(e >> 24) & 255u, lo = (uint32_t)e & QMASK, prob = (uint32_t)(e >> 32);
            if (e & IMPURE) {
                t = find(cdf, q, t, (uint32_t)(slot[(q >> shift) + 1] >> 24) & 255u);
                lo = cdf[t];
                prob = cdf[t + 1] - lo;
            }
            state = refill((state >> PRECISION) * prob + (q - lo), words, &left);
            put(out, i, index, stride, width, values, t);
        }
    } else {
        /* lut[j] = the symbol holding quantile j << shift; the symbol of q lies in [lut[j], lut[j + 1]] */
        uint16_t lut[SLOTS + 1];
        uint32_t s = 0;
        for (uint32_t j = 0; j < slots; j++) {
            uint32_t q = j << shift;
            while (cdf[s + 1] <= q) s++;
            lut[j] = (uint16_t)s;
        }
        lut[slots] = (uint16_t)(m - 1);
        for (uint64_t i = 0; i < n; i++) {
            uint32_t q = (uint32_t)state & QMASK, j = q >> shift;
            uint32_t t = find(cdf, q, lut[j], lut[j + 1]);
            state = refill((state >> PRECISION) * (cdf[t + 1] - cdf[t]) + (q - cdf[t]), words, &left);
            put(out, i, index, stride, width, values, t);
        }
    }
    io[0] = left;
    io[1] = state;
    return 0;
}

/* bins_out[i] = floor(rank[i] * bins / n), rank by (key[i], i), 1 <= bins <= 256, in two passes over the keys:
 * a histogram of the top 16 bits gives every bucket's first rank; a bucket whose ranks all fall in one bin gives its
 * entries that bin at once; the (at most bins - 1) buckets holding a bin boundary collect their entries in index
 * order and rank them by the low 16 bits with a stable radix sort (two 8-bit passes), so ties keep index order.
 * Returns 0, -1 for bad arguments, -2 when memory runs out. */
int fp_ctx_bins(const uint32_t *keys, uint64_t n, uint32_t bins, uint8_t *bins_out) {
    if (n == 0) return 0;
    if (bins < 1 || bins > 256 || n >= ((uint64_t)1 << 32)) return -1;
    uint32_t *first = calloc(65536, sizeof(uint32_t));  /* count, then first rank, of each top-16-bit bucket */
    uint16_t *tab = malloc(65536 * sizeof(uint16_t));    /* bin of the bucket, or 256 + its boundary number */
    if (!first || !tab) { free(first); free(tab); return -2; }
    for (uint64_t i = 0; i < n; i++) first[keys[i] >> 16]++;
    uint32_t nb = 0, bstart[258], brank[257];
    uint64_t r = 0, bsize = 0;
    for (uint32_t b = 0; b < 65536; b++) {
        uint64_t c = first[b];
        first[b] = (uint32_t)r;
        if (c) {
            uint64_t b0 = r * bins / n, b1 = (r + c - 1) * bins / n;
            if (b0 == b1) {
                tab[b] = (uint16_t)b0;
            } else {  /* each such bucket holds the start of a bin > 0: at most bins - 1 of them */
                tab[b] = (uint16_t)(256 + nb);
                bstart[nb] = (uint32_t)bsize;
                brank[nb++] = (uint32_t)r;
                bsize += c;
            }
        }
        r += c;
    }
    bstart[nb] = (uint32_t)bsize;
    free(first);
    uint32_t *idx = malloc((bsize ? bsize : 1) * 2 * sizeof(uint32_t)), fill[258];
    if (!idx) { free(tab); return -2; }
    memcpy(fill, bstart, sizeof(uint32_t) * (nb + 1));
    for (uint64_t i = 0; i < n; i++) {
        uint16_t v = tab[keys[i] >> 16];
        if (v < 256) bins_out[i] = (uint8_t)v;
        else idx[fill[v - 256]++] = (uint32_t)i;
    }
    free(tab);
    for (uint32_t s = 0; s < nb; s++) {
        uint32_t *a = idx + bstart[s], *t = idx + bsize + bstart[s], m = bstart[s + 1] - bstart[s];
        for (int sh = 0; sh < 16; sh += 8) {
            uint32_t cnt[256] = {0}, sum = 0;
            for (uint32_t j = 0; j < m; j++) cnt[(keys[a[j]] >> sh) & 255u]++;
            for (int d = 0; d < 256; d++) { uint32_t c = cnt[d]; cnt[d] = sum; sum += c; }
            for (uint32_t j = 0; j < m; j++) t[cnt[(keys[a[j]] >> sh) & 255u]++] = a[j];
            uint32_t *x = a; a = t; t = x;
        }
        for (uint32_t j = 0; j < m; j++) bins_out[a[j]] = (uint8_t)((uint64_t)(brank[s] + j) * bins / n);
    }
    free(idx);
    return 0;
}

/* order: the positions i < n with active[i] (all when active is NULL), grouped by key[i] < groups, ascending i
 * within a group (a stable counting sort); sizes[g] = the group's size. Returns the number of positions, or -1 when
 * a key is out of range or n > 2^32. */
int64_t fp_group(const uint8_t *key, const uint8_t *active, uint64_t n, uint32_t groups, uint32_t *order,
                 uint64_t *sizes) {
    if (groups < 1 || groups > 256 || n > ((uint64_t)1 << 32)) return -1;
    uint64_t at[256] = {0};
    for (uint64_t i = 0; i < n; i++)
        if (!active || active[i]) at[key[i]]++;
    uint64_t sum = 0;
    for (uint32_t g = 0; g < 256; g++) {
        if (g >= groups && at[g]) return -1;
        uint64_t c = at[g];
        if (g < groups) sizes[g] = c;
        at[g] = sum;
        sum += c;
    }
    for (uint64_t i = 0; i < n; i++)
        if (!active || active[i]) order[at[key[i]]++] = (uint32_t)i;
    return (int64_t)sum;
}

/* ---------------------------------------------------------------------------------------------------------------
 * Top-k selection over float32 scores (freezepack/method/topk.py, which holds the numpy twin and the definition):
 * each score's order key is its bit pattern with the sign folded (uint32, ordered as the floats), with -0.0 made
 * +0.0 and every NaN the smallest key, 0.
 * ------------------------------------------------------------------------------------------------------------- */
static inline uint32_t score_key(float x) {
    if (x != x) return 0u;
    union { float f; uint32_t u; } v;
    v.f = x + 0.0f;                                       /* -0.0 + 0.0 = +0.0 (IEEE, round to nearest) */
    return v.u ^ ((uint32_t)((int32_t)v.u >> 31) | 0x80000000u);
}

/* hist[(key >> shift) & 0xffff] += 1 for every score whose key >> (shift + 16) equals prefix (all of them when
 * shift == 16). Returns 0, or -1 for a bad shift. */
int fp_score_hist(const float *x, uint64_t n, uint32_t shift, uint32_t prefix, int64_t *hist) {
    if (shift != 0 && shift != 16) return -1;
    if (shift == 16) {
        for (uint64_t i = 0; i < n; i++) hist[score_key(x[i]) >> 16]++;
    } else {
        for (uint64_t i = 0; i < n; i++) {
            uint32_t k = score_key(x[i]);
            if ((k >> 16) == prefix) hist[k & 0xFFFFu]++;
        }
    }
    return 0;
}

/* out[i] = key > t, and the first `left` scores (by position) whose key equals t; returns how many of those
 * `left` were not used here (the next chunk's share). */
uint64_t fp_score_mask(const float *x, uint64_t n, uint32_t t, uint64_t left, uint8_t *out) {
    for (uint64_t i = 0; i < n; i++) {
        uint32_t k = score_key(x[i]);
        uint8_t eq = (uint8_t)(k == t && left != 0);
        out[i] = (uint8_t)(k > t) | eq;
        left -= eq;
    }
    return left;
}

/* One pass for a threshold bucket b of the top 16 key bits: out[i] = (key >> 16) > b, and the scores with
 * (key >> 16) == b listed (pos[j] = i, keys[j] = key, in position order, at most cap of them). Returns how many
 * there were (the caller sized cap from the histogram; a larger count means the scores changed). */
uint64_t fp_score_split(const float *x, uint64_t n, uint32_t b, uint8_t *out, int64_t *pos, uint32_t *keys,
                        uint64_t cap) {
    uint64_t c = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint32_t k = score_key(x[i]), top = k >> 16;
        out[i] = (uint8_t)(top > b);
        if (top == b) {
            if (c < cap) {
                pos[c] = (int64_t)i;
                keys[c] = k;
            }
            c++;
        }
    }
    return c;
}
