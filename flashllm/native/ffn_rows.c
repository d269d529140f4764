/* The FFN over quantized neuron records, straight from their bytes (flashllm.native).
 *
 * A record holds a neuron's gate row, up row and down column, each int4 (k/2 code bytes, then a float16
 * scale and a float16 minimum per group of 32 values: v = q * s + m) or int8 (k code bytes, then a float16
 * scale per group of 32: v = q * s), at the byte offsets the caller gives. For every record r and token t:
 *     a = act(gate_r . x_t) * (up_r . x_t),  kept if keep[t, r] and (no threshold or |a| > threshold),
 *     y_t += a * down_r.
 * Float32 throughout (the Python path computes the same sums in float32). No allocation, no global state:
 * callers split the records between threads, each with its own y.
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
/* per thread: x split (k), group sums (k / 32), gate and up products (2T), token list (2T int64 = 2T floats) */
#define WORK_FLOATS(k, T) ((((k) + (k) / GROUP + 5) * (T) + 2) & ~(int64_t)1) /* even: int64 stays aligned */

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

/* out[t * step] = row . x_t for T tokens, the row's codes, float16 scales (and int4 minimums) where given;
 * int4 rows take the tokens' even/odd split and group sums */
static void dots(const uint8_t *row, const uint8_t *scales, const uint8_t *mins, int kind, int64_t k, const float *x,
                 const float *even, const float *odd, const float *sums, int64_t T, float *out, int64_t step) {
    int64_t G = k / GROUP;
#ifdef VECTOR
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
    for (int64_t t = 0; t < T; t++)
        out[t * step] = kind == KIND_INT4 ? dot_int4(row, scales, mins, k, even + t * (k / 2), odd + t * (k / 2),
                                                     sums + t * G)
                                          : dot_int8(row, scales, k, x + t * k);
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

/* dots over a record's part: codes, then float16 scales, then (int4) float16 minimums */
static void part_dots(const uint8_t *part, int kind, int64_t k, const float *x, const float *even, const float *odd,
                      const float *sums, int64_t T, float *out) {
    int64_t codes = kind == KIND_INT4 ? k / 2 : k;
    dots(part, part + codes, part + codes + 2 * (k / GROUP), kind, k, x, even, odd, sums, T, out, 1);
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
    int64_t begin, end; /* this job's records */
    float *work, *y;
    int64_t kept;
};

static void *run_job(void *arg) {
    struct job *j = arg;
    int64_t k = j->k, T = j->T, G = k / GROUP;
    float *even = j->work, *odd = even + T * (k / 2), *sums = even + T * k;
    float *g = sums + T * G, *u = g + T;
    int64_t at = T * k + T * G + 2 * T;
    int64_t *chosen = (int64_t *)(j->work + at + (at & 1));
    if (j->gate_kind == KIND_INT4 || j->up_kind == KIND_INT4) split_tokens(j->x, T, k, even, odd, sums);
    for (int64_t r = j->begin; r < j->end; r++) {
        const uint8_t *record = j->rows + (j->index ? j->index[r] : r) * j->stride;
        part_dots(record + j->gate_offset, j->gate_kind, k, j->x, even, odd, sums, T, g);
        part_dots(record + j->up_offset, j->up_kind, k, j->x, even, odd, sums, T, u);
        int64_t count = 0;
        for (int64_t t = 0; t < T; t++) {
            if (j->keep && !j->keep[t * j->n + r]) continue;
            float a = activate(g[t], j->act) * u[t];
            if (j->threshold >= 0.f && !(fabsf(a) > j->threshold)) continue;
            g[t] = a;
            chosen[count++] = t;
        }
        adds(record + j->down_offset, j->down_kind, k, g, chosen, count, j->y);
        j->kept += count;
    }
    return NULL;
}

/* rows: n records (record r at rows + index[r] * stride, or rows + r * stride when index is NULL);
 * gate/up/down: byte offset and kind of each part in a record; x [T, k] float32; keep [T, n] bytes or NULL;
 * threshold < 0: no threshold; threads >= 1 split the records, each with WORK_FLOATS(k, T) floats of
 * `work`; y [T, k] float32 is added to; partial [threads - 1, T, k] float32 holds the other threads' sums.
 * Returns the number of (token, record) coefficients kept. */
int64_t ffn_rows(const uint8_t *rows, int64_t n, int64_t stride, const int64_t *index,
                 int64_t gate_offset, int gate_kind, int64_t up_offset, int up_kind, int64_t down_offset, int down_kind,
                 int64_t k, int act, const float *x, int64_t T, const uint8_t *keep, float threshold,
                 int threads, float *work, float *partial, float *y) {
    struct job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n) threads = n > 0 ? (int)n : 1;
    for (int i = 0; i < threads; i++) {
        struct job j = {rows, n, stride, index, gate_offset, up_offset, down_offset, gate_kind, up_kind, down_kind,
                        act, k, T, x, keep, threshold, n * i / threads, n * (i + 1) / threads,
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

/* y [T, n] = x [T, k] @ W.T for quantized rows W: row r's codes at codes + r * codes_stride, its float16 scales
 * at scales + r * scales_stride (int4: minimums at mins + r * mins_stride); the rows split between threads.
 * work: (k + k / 32) * T floats (int4: x's even/odd split and group sums). */
struct rows_job {
    const uint8_t *codes, *scales, *mins;
    int64_t codes_stride, scales_stride, mins_stride, k, T, n, begin, end;
    int kind;
    const float *x, *work;
    float *y;
};

static void *run_rows(void *arg) {
    struct rows_job *j = arg;
    int64_t k = j->k, T = j->T;
    const float *even = j->work, *odd = even + T * (k / 2), *sums = even + T * k;
    for (int64_t r = j->begin; r < j->end; r++)
        dots(j->codes + r * j->codes_stride, j->scales + r * j->scales_stride,
             j->mins ? j->mins + r * j->mins_stride : NULL, j->kind, k, j->x, even, odd, sums, T, j->y + r, j->n);
    return NULL;
}

void rows_matmul(const uint8_t *codes, int64_t codes_stride, const uint8_t *scales, int64_t scales_stride,
                 const uint8_t *mins, int64_t mins_stride, int kind, int64_t n, int64_t k, const float *x, int64_t T,
                 int threads, float *work, float *y) {
    struct rows_job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    if (kind == KIND_INT4) split_tokens(x, T, k, work, work + T * (k / 2), work + T * k);
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n) threads = n > 0 ? (int)n : 1;
    for (int i = 0; i < threads; i++) {
        struct rows_job j = {codes, scales, mins, codes_stride, scales_stride, mins_stride, k, T, n,
                             n * i / threads, n * (i + 1) / threads, kind, x, work, y};
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
