/* The FFN over quantized neuron records, straight from their bytes (flashllm.native).
 *
 * A record holds a neuron's gate row, up row and down column, each int4 (k/2 code bytes, then a float16
 * scale and a float16 minimum per group of 32 values: v = q * s + m) or int8 (k code bytes, then a float16
 * scale per group of 32: v = q * s), at the byte offsets the caller gives. For every record r and token t:
 *     a = act(gate_r . x_t) * (up_r . x_t),  kept if keep[t, r] and (no threshold or |a| > threshold),
 *     y_t += a * down_r.
 * Float32 throughout (the Python path computes the same sums in float32), or, with `xq`, the gate and up dot
 * products over x quantized per group of 32 to int8 (scale max |x| / 127, round to nearest even, as
 * llama.cpp's q8 blocks): integer sums of codes x int8 values, exact, times both scales (the int4 minimum
 * term keeps x's float32 group sums). No allocation, no global state: callers split the records between
 * threads, each with its own y.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#ifdef __F16C__
#include <immintrin.h>
#endif

#define GROUP 32
#define KIND_INT4 1
#define KIND_INT8 2
#define ACT_SILU 0
#define ACT_GELU_TANH 1
#define ACT_GELU 2
#define MAX_THREADS 16
/* per thread and token: x split (k), group sums and int8 scales (2k / 32), gate and up products (2), token list
 * (one int64 = 2 floats), x as int8 in both orders (2k bytes = k / 2 floats) */
#define X_FLOATS(k, T) (((k) + (k) / 2 + 2 * ((k) / GROUP)) * (T))
#define WORK_FLOATS(k, T) ((X_FLOATS(k, T) + 4 * (T) + 2 + 16) & ~(int64_t)1) /* even: int64 aligned; 16: a cache
                                                                                  line between threads' areas */

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF, bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else { /* subnormal: normalize */
            exponent = 127 - 15 + 1;
            while (!(mantissa & 0x400)) { mantissa <<= 1; exponent--; }
            bits = sign | (exponent << 23) | ((mantissa & 0x3FF) << 13);
        }
    } else if (exponent == 31) {
        bits = sign | 0x7F800000 | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float half_at(const uint8_t *p, int64_t i) {
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
#ifdef __F16C__
    return _cvtsh_ss(h); /* one instruction against the branches above: a scale per 32 values adds up */
#else
    return half_to_float(h);
#endif
}

/* x_t split for int4 rows: even [k/2], odd [k/2] values and per-group sums [k/32], per token */
static void split_tokens(const float *x, int64_t T, int64_t k, float *even, float *odd, float *sums) {
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * k;
        for (int64_t j = 0; j < k / 2; j++) {
            even[t * (k / 2) + j] = xt[2 * j];
            odd[t * (k / 2) + j] = xt[2 * j + 1];
        }
        for (int64_t g = 0; g < k / GROUP; g++) {
            float s = 0.f;
            for (int j = 0; j < GROUP; j++) s += xt[g * GROUP + j];
            sums[t * (k / GROUP) + g] = s;
        }
    }
}

/* x_t as int8 per group of 32: scales [k/32] (max |x| / 127), values in natural order [k] and, for int4 rows,
 * in even/odd order per group [k] (a group's 16 even values, then its 16 odd ones: the order of its low and
 * high nibbles) */
static void quantize_tokens(const float *x, int64_t T, int64_t k, float *scales, int8_t *natural, int8_t *paired) {
    for (int64_t t = 0; t < T; t++) {
        for (int64_t g = 0; g < k / GROUP; g++) {
            const float *xg = x + t * k + g * GROUP;
            float amax = 0.f;
            for (int j = 0; j < GROUP; j++) amax = fmaxf(amax, fabsf(xg[j]));
            float s = amax / 127.f;
            scales[t * (k / GROUP) + g] = s;
            int8_t *n = natural + t * k + g * GROUP, *p = paired + t * k + g * GROUP;
            for (int j = 0; j < GROUP; j++) {
                float v = s > 0.f ? nearbyintf(xg[j] / s) : 0.f;
                n[j] = (int8_t)(v > 127.f ? 127.f : v < -127.f ? -127.f : v);
            }
            for (int j = 0; j < GROUP / 2; j++) { p[j] = n[2 * j]; p[GROUP / 2 + j] = n[2 * j + 1]; }
        }
    }
}

/* sum of codes x int8 values over one group, exact in int32 */
static inline int32_t isum_int4(const uint8_t *c, const int8_t *paired) {
    int32_t s = 0;
    for (int j = 0; j < GROUP / 2; j++) s += (int32_t)(c[j] & 0x0F) * paired[j] + (int32_t)(c[j] >> 4) * paired[GROUP / 2 + j];
    return s;
}

static inline int32_t isum_int8(const int8_t *c, const int8_t *natural) {
    int32_t s = 0;
    for (int j = 0; j < GROUP; j++) s += (int32_t)c[j] * natural[j];
    return s;
}

static inline float dot_int4(const uint8_t *codes, const uint8_t *scales, const uint8_t *mins, int64_t k,
                             const float *even, const float *odd, const float *sums) {
    float total = 0.f;
    for (int64_t g = 0; g < k / GROUP; g++) {
        const uint8_t *c = codes + g * (GROUP / 2);
        const float *e = even + g * (GROUP / 2), *o = odd + g * (GROUP / 2);
        float s = 0.f;
        for (int j = 0; j < GROUP / 2; j++) s += (float)(c[j] & 0x0F) * e[j] + (float)(c[j] >> 4) * o[j];
        total += half_at(scales, g) * s + half_at(mins, g) * sums[g];
    }
    return total;
}

static inline float dot_int8(const uint8_t *bytes, const uint8_t *scales, int64_t k, const float *x) {
    const int8_t *codes = (const int8_t *)bytes;
    float total = 0.f;
    for (int64_t g = 0; g < k / GROUP; g++) {
        const int8_t *c = codes + g * GROUP;
        const float *xg = x + g * GROUP;
        float s = 0.f;
        for (int j = 0; j < GROUP; j++) s += (float)c[j] * xg[j];
        total += half_at(scales, g) * s;
    }
    return total;
}

static inline void add_int4(const uint8_t *row, int64_t k, float a, float *y) {
    const uint8_t *codes = row, *scales = row + k / 2, *mins = row + k / 2 + 2 * (k / GROUP);
    for (int64_t g = 0; g < k / GROUP; g++) {
        const uint8_t *c = codes + g * (GROUP / 2);
        float s = a * half_at(scales, g), m = a * half_at(mins, g);
        float *yg = y + g * GROUP;
        for (int j = 0; j < GROUP / 2; j++) {
            yg[2 * j] += (float)(c[j] & 0x0F) * s + m;
            yg[2 * j + 1] += (float)(c[j] >> 4) * s + m;
        }
    }
}

static inline void add_int8(const uint8_t *row, int64_t k, float a, float *y) {
    const int8_t *codes = (const int8_t *)row;
    const uint8_t *scales = row + k;
    for (int64_t g = 0; g < k / GROUP; g++) {
        const int8_t *c = codes + g * GROUP;
        float s = a * half_at(scales, g);
        float *yg = y + g * GROUP;
        for (int j = 0; j < GROUP; j++) yg[j] += (float)c[j] * s;
    }
}

static inline float activate(float v, int act) {
    if (act == ACT_SILU) return v / (1.f + expf(-v));
    if (act == ACT_GELU_TANH) return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    return 0.5f * v * (1.f + erff(v * 0.7071067811865476f));
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define VECTOR 1

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 halves8(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* the 32 codes of a group as 4 x 8 floats: int4 in (even 0-7, even 8-15, odd 0-7, odd 8-15) order */
static inline void codes_int4(const uint8_t *c, __m256 v[4]) {
    __m128i bytes = _mm_loadu_si128((const __m128i *)c), nib = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(bytes, nib), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib);
    v[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    v[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    v[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    v[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

static inline void codes_int8(const int8_t *c, __m256 v[4]) {
    for (int i = 0; i < 4; i++) v[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(c + 8 * i))));
}
#endif

/* x_t in the forms the dot products take: float32 (even/odd split and group sums for int4 rows) and, when
 * `xs` is not NULL, int8 per group (quantize_tokens) */
struct xforms {
    const float *x, *even, *odd, *sums, *xs;
    const int8_t *natural, *paired;
};

#ifdef VECTOR
/* group g's codes for int8 dot products: int4 rows their 32 nibbles (low ones, then high ones: x's paired
 * order); int8 rows their codes in `w` and |codes| in `c` (unsigned, for vpmaddubsw; w's signs go onto x) */
static inline __m256i group_codes(const uint8_t *row, int kind, int64_t g, __m256i *w) {
    if (kind == KIND_INT4) {
        __m128i bytes = _mm_loadu_si128((const __m128i *)(row + g * (GROUP / 2))), nib = _mm_set1_epi8(0x0F);
        return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), nib), _mm_and_si128(bytes, nib));
    }
    *w = _mm256_loadu_si256((const __m256i *)(row + g * GROUP));
    return _mm256_sign_epi8(*w, *w);
}

/* those codes times one token's 32 int8 values of the group (paired order for int4, natural for int8), as 8
 * int32 sums, exact: pairs of (0..128) x (-127..127) products stay within int16 */
static inline __m256i group_sums(int kind, __m256i c, __m256i w, const int8_t *values) {
    __m256i v = _mm256_loadu_si256((const __m256i *)values);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(c, kind == KIND_INT4 ? v : _mm256_sign_epi8(v, w)),
                             _mm256_set1_epi16(1));
}

/* group g of token 0 */
static inline __m256 group_q8(const uint8_t *row, int kind, const struct xforms *f, int64_t g) {
    __m256i w = _mm256_setzero_si256(), c = group_codes(row, kind, g, &w);
    return _mm256_cvtepi32_ps(group_sums(kind, c, w, (kind == KIND_INT4 ? f->paired : f->natural) + g * GROUP));
}
#endif

/* out[t * step] = row . x_t for T tokens, the row's codes, float16 scales (and int4 minimums) where given */
static void dots(const uint8_t *row, const uint8_t *scales, const uint8_t *mins, int kind, int64_t k,
                 const struct xforms *f, int64_t T, float *out, int64_t step) {
    int64_t G = k / GROUP;
    const float *x = f->x, *even = f->even, *odd = f->odd, *sums = f->sums;
#ifdef VECTOR
    if (f->xs && T == 1) { /* one token (decode): two independent sums in registers */
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        int64_t g = 0;
        for (; g + 2 <= G; g += 2) {
            acc0 = _mm256_fmadd_ps(group_q8(row, kind, f, g),
                                   _mm256_set1_ps(half_at(scales, g) * f->xs[g]), acc0);
            acc1 = _mm256_fmadd_ps(group_q8(row, kind, f, g + 1),
                                   _mm256_set1_ps(half_at(scales, g + 1) * f->xs[g + 1]), acc1);
        }
        if (g < G)
            acc0 = _mm256_fmadd_ps(group_q8(row, kind, f, g),
                                   _mm256_set1_ps(half_at(scales, g) * f->xs[g]), acc0);
        out[0] = hsum(_mm256_add_ps(acc0, acc1));
    } else if (T == 1 && !f->xs) { /* one token, float32: short dependency chains, two sums in registers */
        __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t g = 0; g < G; g++) {
            __m256 c[4];
            const float *a, *b;
            if (kind == KIND_INT4) { codes_int4(row + g * (GROUP / 2), c); a = even + g * 16; b = odd + g * 16; }
            else { codes_int8((const int8_t *)row + g * GROUP, c); a = x + g * GROUP; b = a + 16; }
            __m256 p0 = _mm256_fmadd_ps(c[1], _mm256_loadu_ps(a + 8), _mm256_mul_ps(c[0], _mm256_loadu_ps(a)));
            __m256 p1 = _mm256_fmadd_ps(c[3], _mm256_loadu_ps(b + 8), _mm256_mul_ps(c[2], _mm256_loadu_ps(b)));
            acc[g & 1] = _mm256_fmadd_ps(_mm256_add_ps(p0, p1), _mm256_set1_ps(half_at(scales, g)), acc[g & 1]);
        }
        out[0] = hsum(_mm256_add_ps(acc[0], acc[1]));
    } else if (f->xs) { /* blocks of four tokens: a group's codes prepared once for them */
        const int8_t *values = kind == KIND_INT4 ? f->paired : f->natural;
        for (int64_t t0 = 0; t0 < T; t0 += 4) {
            int64_t tb = T - t0 < 4 ? T - t0 : 4;
            __m256 total[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t g = 0; g < G; g++) {
                __m256i w = _mm256_setzero_si256(), c = group_codes(row, kind, g, &w);
                float sw = half_at(scales, g);
                for (int64_t i = 0; i < tb; i++) {
                    int64_t t = t0 + i;
                    total[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(group_sums(kind, c, w, values + t * k + g * GROUP)),
                                               _mm256_set1_ps(sw * f->xs[t * G + g]), total[i]);
                }
            }
            for (int64_t i = 0; i < tb; i++) out[(t0 + i) * step] = hsum(total[i]);
        }
    } else {
        for (int64_t t0 = 0; t0 < T; t0 += 4) {
            int64_t tb = T - t0 < 4 ? T - t0 : 4;
            __m256 total[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t g = 0; g < G; g++) {
                __m256 c[4];
                if (kind == KIND_INT4) codes_int4(row + g * (GROUP / 2), c);
                else codes_int8((const int8_t *)row + g * GROUP, c);
                __m256 scale = _mm256_set1_ps(half_at(scales, g));
                for (int64_t i = 0; i < tb; i++) {
                    int64_t t = t0 + i;
                    const float *a, *b;
                    if (kind == KIND_INT4) { a = even + t * (k / 2) + g * 16; b = odd + t * (k / 2) + g * 16; }
                    else { a = x + t * k + g * GROUP; b = a + 16; }
                    __m256 acc = _mm256_mul_ps(c[0], _mm256_loadu_ps(a));
                    acc = _mm256_fmadd_ps(c[1], _mm256_loadu_ps(a + 8), acc);
                    acc = _mm256_fmadd_ps(c[2], _mm256_loadu_ps(b), acc);
                    acc = _mm256_fmadd_ps(c[3], _mm256_loadu_ps(b + 8), acc);
                    total[i] = _mm256_fmadd_ps(acc, scale, total[i]);
                }
            }
            for (int64_t i = 0; i < tb; i++) out[(t0 + i) * step] = hsum(total[i]);
        }
    }
    if (kind == KIND_INT4) { /* + sum_g min_g * (sum of x over group g) */
        for (int64_t t = 0; t < T; t++) {
            __m256 m = _mm256_setzero_ps();
            int64_t g = 0;
            for (; g + 8 <= G; g += 8) m = _mm256_fmadd_ps(halves8(mins + 2 * g), _mm256_loadu_ps(sums + t * G + g), m);
            float extra = hsum(m);
            for (; g < G; g++) extra += half_at(mins, g) * sums[t * G + g];
            out[t * step] += extra;
        }
    }
#else
    for (int64_t t = 0; t < T; t++) {
        if (f->xs) {
            float total = 0.f;
            for (int64_t g = 0; g < G; g++) {
                float s = half_at(scales, g) * f->xs[t * G + g];
                if (kind == KIND_INT4) total += (float)isum_int4(row + g * (GROUP / 2), f->paired + t * k + g * GROUP) * s
                                                + half_at(mins, g) * sums[t * G + g];
                else total += (float)isum_int8((const int8_t *)row + g * GROUP, f->natural + t * k + g * GROUP) * s;
            }
            out[t * step] = total;
        } else {
            out[t * step] = kind == KIND_INT4 ? dot_int4(row, scales, mins, k, even + t * (k / 2), odd + t * (k / 2),
                                                         sums + t * G)
                                              : dot_int8(row, scales, k, x + t * k);
        }
    }
#endif
}

/* y_t += a_t * row for the tokens in `chosen` (count of them) */
static void adds(const uint8_t *row, int kind, int64_t k, const float *a, const int64_t *chosen, int64_t count,
                 float *y) {
#ifdef VECTOR
    if (kind == KIND_INT8) {
        const uint8_t *scales = row + k;
        for (int64_t g = 0; g < k / GROUP; g++) {
            __m256 c[4];
            codes_int8((const int8_t *)row + g * GROUP, c);
            float s = half_at(scales, g);
            for (int64_t i = 0; i < count; i++) {
                float *yg = y + chosen[i] * k + g * GROUP;
                __m256 f = _mm256_set1_ps(a[chosen[i]] * s);
                for (int j = 0; j < 4; j++) _mm256_storeu_ps(yg + 8 * j, _mm256_fmadd_ps(c[j], f, _mm256_loadu_ps(yg + 8 * j)));
            }
        }
        return;
    }
#endif
    for (int64_t i = 0; i < count; i++) {
        if (kind == KIND_INT4) add_int4(row, k, a[chosen[i]], y + chosen[i] * k);
        else add_int8(row, k, a[chosen[i]], y + chosen[i] * k);
    }
}

#define BATCH 8 /* down columns added per pass over y (one token) */

/* y += sum over p < count of a[p] * column p, for one token: y's groups loaded and stored once per batch
 * instead of once per column */
static void adds_batch(const uint8_t *const *columns, const float *a, int count, int kind, int64_t k, float *y) {
#ifdef VECTOR
    for (int64_t g = 0; g < k / GROUP; g++) {
        float *yg = y + g * GROUP, m = 0.f;
        __m256 acc[4];
        for (int j = 0; j < 4; j++) acc[j] = _mm256_loadu_ps(yg + 8 * j);
        for (int p = 0; p < count; p++) {
            __m256 c[4];
            float f;
            if (kind == KIND_INT4) {
                const uint8_t *scales = columns[p] + k / 2, *mins = scales + 2 * (k / GROUP);
                __m128i bytes = _mm_loadu_si128((const __m128i *)(columns[p] + g * (GROUP / 2))), nib = _mm_set1_epi8(0x0F);
                __m128i lo = _mm_and_si128(bytes, nib), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib);
                __m128i first = _mm_unpacklo_epi8(lo, hi), second = _mm_unpackhi_epi8(lo, hi); /* natural order */
                c[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(first));
                c[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(first, 8)));
                c[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(second));
                c[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(second, 8)));
                f = a[p] * half_at(scales, g);
                m += a[p] * half_at(mins, g);
            } else {
                codes_int8((const int8_t *)columns[p] + g * GROUP, c);
                f = a[p] * half_at(columns[p] + k, g);
            }
            __m256 fv = _mm256_set1_ps(f);
            for (int j = 0; j < 4; j++) acc[j] = _mm256_fmadd_ps(c[j], fv, acc[j]);
        }
        __m256 mv = _mm256_set1_ps(m);
        for (int j = 0; j < 4; j++) _mm256_storeu_ps(yg + 8 * j, kind == KIND_INT4 ? _mm256_add_ps(acc[j], mv) : acc[j]);
    }
#else
    for (int p = 0; p < count; p++) {
        if (kind == KIND_INT4) add_int4(columns[p], k, a[p], y);
        else add_int8(columns[p], k, a[p], y);
    }
#endif
}

/* x's forms in X_FLOATS(k, T) floats of work: the float32 ones where a part is int4, the int8 ones with xq */
static struct xforms x_forms(const float *x, int64_t T, int64_t k, int any_int4, int xq, float *work) {
    int64_t G = k / GROUP;
    float *even = work, *odd = even + T * (k / 2), *sums = even + T * k, *xs = sums + T * G;
    int8_t *natural = (int8_t *)(xs + T * G), *paired = natural + T * k;
    struct xforms f = {x, even, odd, sums, xq ? xs : NULL, natural, paired};
    if (any_int4) split_tokens(x, T, k, even, odd, sums);
    if (xq) quantize_tokens(x, T, k, xs, natural, paired);
    return f;
}

/* dots over a record's part: codes, then float16 scales, then (int4) float16 minimums */
static void part_dots(const uint8_t *part, int kind, int64_t k, const struct xforms *f, int64_t T, float *out) {
    int64_t codes = kind == KIND_INT4 ? k / 2 : k;
    dots(part, part + codes, part + codes + 2 * (k / GROUP), kind, k, f, T, out, 1);
}

struct job {
    const uint8_t *rows;
    int64_t n, stride;
    const int64_t *index;
    int64_t gate_offset, up_offset, down_offset;
    int gate_kind, up_kind, down_kind, act;
    int64_t k, T;
    const float *x;
    const uint8_t *keep;
    float threshold;
    int xq;
    int64_t record_end; /* bytes of a record the parts span */
    int64_t begin, end; /* this job's records */
    float *work, *y;
    int64_t kept;
};

static void *run_job(void *arg) {
    struct job *j = arg;
    int64_t k = j->k, T = j->T;
    struct xforms f = x_forms(j->x, T, k, j->gate_kind == KIND_INT4 || j->up_kind == KIND_INT4, j->xq, j->work);
    float *g = j->work + X_FLOATS(k, T), *u = g + T;
    int64_t at = X_FLOATS(k, T) + 2 * T;
    int64_t *chosen = (int64_t *)(j->work + at + (at & 1));
    const uint8_t *pending[BATCH];
    float coefficients[BATCH];
    int waiting = 0;
    for (int64_t r = j->begin; r < j->end; r++) {
        const uint8_t *record = j->rows + (j->index ? j->index[r] : r) * j->stride;
        if (r + 2 < j->end) { /* the record after next into cache while this one computes (DRAM-bound otherwise) */
            const uint8_t *ahead = j->rows + (j->index ? j->index[r + 2] : r + 2) * j->stride;
            for (int64_t b = 0; b < j->record_end; b += 64) __builtin_prefetch(ahead + b);
        }
        part_dots(record + j->gate_offset, j->gate_kind, k, &f, T, g);
        part_dots(record + j->up_offset, j->up_kind, k, &f, T, u);
        int64_t count = 0;
        for (int64_t t = 0; t < T; t++) {
            if (j->keep && !j->keep[t * j->n + r]) continue;
            float a = activate(g[t], j->act) * u[t];
            if (j->threshold >= 0.f && !(fabsf(a) > j->threshold)) continue;
            g[t] = a;
            chosen[count++] = t;
        }
        j->kept += count;
        if (T == 1) { /* one token: columns wait for a batch */
            if (count) { pending[waiting] = record + j->down_offset; coefficients[waiting++] = g[0]; }
            if (waiting == BATCH) { adds_batch(pending, coefficients, waiting, j->down_kind, k, j->y); waiting = 0; }
        } else {
            adds(record + j->down_offset, j->down_kind, k, g, chosen, count, j->y);
        }
    }
    if (waiting) adds_batch(pending, coefficients, waiting, j->down_kind, k, j->y);
    return NULL;
}

/* rows: n records (record r at rows + index[r] * stride, or rows + r * stride when index is NULL);
 * gate/up/down: byte offset and kind of each part in a record, record_end the bytes they span (prefetched);
 * x [T, k] float32; keep [T, n] bytes or NULL; threshold < 0: no threshold; xq: gate and up dot products
 * over x as int8 groups; threads >= 1 split the records, each with WORK_FLOATS(k, T) floats of `work`;
 * y [T, k] float32 is added to; partial [threads - 1, T, k] float32 holds the other threads' sums.
 * Returns the number of (token, record) coefficients kept. */
int64_t ffn_rows(const uint8_t *rows, int64_t n, int64_t stride, const int64_t *index,
                 int64_t gate_offset, int gate_kind, int64_t up_offset, int up_kind, int64_t down_offset, int down_kind,
                 int64_t record_end, int64_t k, int act, const float *x, int64_t T, const uint8_t *keep,
                 float threshold, int xq, int threads, float *work, float *partial, float *y) {
    struct job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n) threads = n > 0 ? (int)n : 1;
    for (int i = 0; i < threads; i++) {
        struct job j = {rows, n, stride, index, gate_offset, up_offset, down_offset, gate_kind, up_kind, down_kind,
                        act, k, T, x, keep, threshold, xq, record_end, n * i / threads, n * (i + 1) / threads,
                        work + i * WORK_FLOATS(k, T), i == 0 ? y : partial + (int64_t)(i - 1) * T * k, 0};
        jobs[i] = j;
        if (i > 0) memset(jobs[i].y, 0, sizeof(float) * T * k);
    }
    int started = 1;
    for (int i = 1; i < threads; i++, started++)
        if (pthread_create(&ids[i], NULL, run_job, &jobs[i]) != 0) break;
    for (int i = started; i < threads; i++) run_job(&jobs[i]); /* a thread that could not start: done here */
    run_job(&jobs[0]);
    int64_t kept = jobs[0].kept;
    for (int i = 1; i < threads; i++) {
        if (i < started) pthread_join(ids[i], NULL);
        kept += jobs[i].kept;
        for (int64_t v = 0; v < T * k; v++) y[v] += jobs[i].y[v];
    }
    return kept;
}

/* floats of `work` each thread takes, for Python's allocation */
int64_t ffn_rows_work_floats(int64_t k, int64_t T) { return WORK_FLOATS(k, T); }

/* floats of rows_matmul's `work` */
int64_t rows_matmul_work_floats(int64_t k, int64_t T) { return X_FLOATS(k, T); }

/* y [T, n] = x [T, k] @ W.T for quantized rows W: row r's codes at codes + r * codes_stride, its float16 scales
 * at scales + r * scales_stride (int4: minimums at mins + r * mins_stride); the rows split between threads.
 * work: rows_matmul_work_floats(k, T) floats (x's forms). xq: the dot products over x as int8 groups. */
struct rows_job {
    const uint8_t *codes, *scales, *mins;
    int64_t codes_stride, scales_stride, mins_stride, k, T, n, begin, end;
    int kind;
    const struct xforms *f;
    float *y;
};

static void *run_rows(void *arg) {
    struct rows_job *j = arg;
    for (int64_t r = j->begin; r < j->end; r++)
        dots(j->codes + r * j->codes_stride, j->scales + r * j->scales_stride,
             j->mins ? j->mins + r * j->mins_stride : NULL, j->kind, j->k, j->f, j->T, j->y + r, j->n);
    return NULL;
}

void rows_matmul(const uint8_t *codes, int64_t codes_stride, const uint8_t *scales, int64_t scales_stride,
                 const uint8_t *mins, int64_t mins_stride, int kind, int64_t n, int64_t k, const float *x, int64_t T,
                 int xq, int threads, float *work, float *y) {
    struct rows_job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    struct xforms f = x_forms(x, T, k, kind == KIND_INT4, xq, work);
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n) threads = n > 0 ? (int)n : 1;
    for (int i = 0; i < threads; i++) {
        struct rows_job j = {codes, scales, mins, codes_stride, scales_stride, mins_stride, k, T, n,
                             n * i / threads, n * (i + 1) / threads, kind, &f, y};
        jobs[i] = j;
    }
    int started = 1;
    for (int i = 1; i < threads; i++, started++)
        if (pthread_create(&ids[i], NULL, run_rows, &jobs[i]) != 0) break;
    for (int i = started; i < threads; i++) run_rows(&jobs[i]);
    run_rows(&jobs[0]);
    for (int i = 1; i < started; i++) pthread_join(ids[i], NULL);
}

/* whether this build took the AVX2/FMA/F16C path (for tests and --verbose) */
int ffn_rows_vector(void) {
#ifdef VECTOR
    return 1;
#else
    return 0;
#endif
}
