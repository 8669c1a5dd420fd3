/* Advancing torch's CPU Mersenne Twister in bulk (dgemma/native.py loads this; dgemma/fastrand.py uses it).
 *
 * torch.multinomial(probs [R, V], 1) on the CPU draws one 64-bit value per probability (two consecutive 32-bit
 * MT19937 outputs, high word first) and dgemma's sampler reads the samples of a few rows only. Here the generator's
 * state is advanced past all R*V draws, but the 32-bit outputs are tempered and stored only for the rows that are
 * needed; for the others only the state twists are computed. The state layout and the stepping rule are
 * at::mt19937's (ATen/core/MT19937RNGEngine.h): 624 words, `left` counts down to the next twist, `next` indexes the
 * next word, and a call that finds `--left == 0` twists first and then reads word 0.
 *
 * The state arrives as torch's serialised generator state keeps it: 624 words widened to 64 bits.
 */
#include <stdint.h>

#define N 624
#define M 397
#define MATRIX_A 0x9908b0dfU
#define UPPER 0x80000000U
#define LOWER 0x7fffffffU

static inline uint32_t twist(uint32_t u, uint32_t v) {
    return (((u & UPPER) | (v & LOWER)) >> 1) ^ ((v & 1U) ? MATRIX_A : 0U);
}

/* at::mt19937::next_state: every word is replaced in order; word i reads words i+1 and i+M (mod N), the latter
 * already replaced once i+M >= N. Three plain loops: the first has no carried dependency, the second reads words
 * replaced 227 iterations earlier, a distance the compiler's vectoriser can take. */
static void next_state(uint32_t *s) {
    int i;
    for (i = 0; i < N - M; i++) s[i] = s[i + M] ^ twist(s[i], s[i + 1]);
    for (; i < N - 1; i++) s[i] = s[i + M - N] ^ twist(s[i], s[i + 1]);
    s[N - 1] = s[M - 1] ^ twist(s[N - 1], s[0]);
}

static inline uint32_t temper(uint32_t y) {
    y ^= (y >> 11);
    y ^= (y << 7) & 0x9d2c5680U;
    y ^= (y << 15) & 0xefc60000U;
    y ^= (y >> 18);
    return y;
}

typedef struct {
    uint32_t s[N];
    int64_t left;
    int64_t next;
} mt_t;

/* Consume k outputs without looking at them. */
static void skip(mt_t *g, int64_t k) {
    while (k > 0) {
        int64_t avail = g->left - 1; /* outputs before the call that twists */
        int64_t take = avail < k ? avail : k;
        g->next += take;
        g->left -= take;
        k -= take;
        if (k > 0) { /* this call twists, then reads word 0 */
            next_state(g->s);
            g->left = N;
            g->next = 1;
            k -= 1;
        }
    }
}

static inline uint32_t draw(mt_t *g) {
    if (--g->left == 0) {
        next_state(g->s);
        g->left = N;
        g->next = 0;
    }
    return temper(g->s[g->next++]);
}

/* Advance the generator over rows*vocab 64-bit draws (torch's random64(), high word first). For each row with
 * need[r] != 0, its vocab draws are written to out (row after row, in row order) as torch's int64 random_() leaves
 * them: the 64-bit value modulo 2^63. state: 624 words as uint64; left/next: the engine's counters. */
void dgemma_mt_rows(uint64_t *state, int64_t *left, int64_t *next, int64_t rows, int64_t vocab,
                    const uint8_t *need, int64_t *out) {
    mt_t g;
    for (int i = 0; i < N; i++) g.s[i] = (uint32_t)state[i];
    g.left = *left;
    g.next = *next;
    for (int64_t r = 0; r < rows; r++) {
        if (!need[r]) {
            skip(&g, 2 * vocab);
            continue;
        }
        for (int64_t j = 0; j < vocab; j++) {
            uint64_t hi = draw(&g);
            uint64_t lo = draw(&g);
            *out++ = (int64_t)(((hi << 32) | lo) & 0x7fffffffffffffffULL);
        }
    }
    for (int i = 0; i < N; i++) state[i] = g.s[i];
    *left = g.left;
    *next = g.next;
}
