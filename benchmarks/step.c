/* The C reference for edgeseq's benchmarks: one model step, built "the fast way" (DESIGN.md).
 *
 * It runs exactly the program edgeseq's Numba kernels run (the same opcodes, the same packed
 * float32 parameters, dumped by edgeseq.bench), with one fused matrix-vector product for all
 * gates ([inputs + H, gates * H], transposed so the inner loop is a contiguous, vectorisable
 * axpy) and the same rational tanh, no allocation per step. Build (as edgeseq.bench does):
 *   cc -O3 -march=native -fno-math-errno -fno-trapping-math -fno-signed-zeros \
 *      -fassociative-math -freciprocal-math
 * i.e. the kernels' own fast-math licence; without -fno-trapping-math (which LLVM, and so
 * Numba, always assumes) GCC leaves the clamps in tanh scalar and the step runs 1.7x slower.
 *
 * Usage: step PROGRAM.bin STEPS  ->  prints "median_ns mean_ns checksum": after 500 warm-up
 * steps, STEPS single steps each timed on its own, median less the clock's own cost (the same
 * protocol as edgeseq.bench times stream.step from Python), and the mean over the whole loop.
 * PROGRAM.bin: int64 n_ops, width, n_features, n_params; int64 code[n_ops][CODE_WIDTH];
 *              float params[n_params]; int64 state_size; float initial_state[state_size]
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The program's layout (opcodes, each field's index in a row), written by edgeseq.bench from
 * edgeseq/runtime/program.py, the one place that defines it. */
#include "program.h"

enum { A_RELU, A_TANH, A_SIGMOID, A_LEAKY, A_IDENTITY };

static inline float tanh_fast(float x) {
  const float clamp = 7.90531110763549805f; /* ternaries vectorise; fminf/fmaxf do not */
  x = x < -clamp ? -clamp : x;
  x = x > clamp ? clamp : x;
  float x2 = x * x;
  float p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = x2 * p + -8.60467152213735e-11f;
  p = x2 * p + 5.12229709037114e-08f;
  p = x2 * p + 1.48572235717979e-05f;
  p = x2 * p + 6.37261928875436e-04f;
  p = x2 * p + 4.89352455891786e-03f;
  p = x * p;
  float q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = x2 * q + 2.26843463243900e-03f;
  q = x2 * q + 4.89352518554385e-03f;
  return p / q;
}
static inline float sigmoid_fast(float x) { return 0.5f + 0.5f * tanh_fast(0.5f * x); }

/* acc[0:n_out] += v[0:n_in] @ w (w row-major n_in x n_out); four input rows per pass over
 * acc, so the sums are loaded and stored once per four FMAs (as edgeseq's kernel does). */
static inline void matvec(float *restrict acc, const float *restrict w, int64_t n_in,
                          int64_t n_out, const float *restrict v) {
  int64_t k = 0;
  for (; k + 4 <= n_in; k += 4) {
    const float v0 = v[k], v1 = v[k + 1], v2 = v[k + 2], v3 = v[k + 3];
    const float *restrict w0 = w + k * n_out, *restrict w1 = w0 + n_out;
    const float *restrict w2 = w1 + n_out, *restrict w3 = w2 + n_out;
    for (int64_t j = 0; j < n_out; j++)
      acc[j] += w0[j] * v0 + w1[j] * v1 + w2[j] * v2 + w3[j] * v3;
  }
  for (; k < n_in; k++) {
    const float vk = v[k];
    const float *restrict row = w + k * n_out;
    for (int64_t j = 0; j < n_out; j++) acc[j] += row[j] * vk;
  }
}

static float activate(int64_t kind, float alpha, float v) {
  switch (kind) {
    case A_TANH: return tanh_fast(v);
    case A_SIGMOID: return sigmoid_fast(v);
    case A_RELU: return v > 0 ? v : 0;
    case A_LEAKY: return v >= 0 ? v : alpha * v;
    default: return v;
  }
}

static int64_t lstm(const int64_t *r, const float *p, const float *cur, float *nxt, float *s,
                    float *g) {
  int64_t n_in = r[LSTM_N_IN], h = r[LSTM_HID], g4 = 4 * h;
  float *hs = s + r[LSTM_OFF_H], *cs = s + r[LSTM_OFF_C];
  memcpy(g, p + r[LSTM_OFF_B], g4 * sizeof(float));
  matvec(g, p + r[LSTM_OFF_WT], n_in, g4, cur);
  matvec(g, p + r[LSTM_OFF_WT] + n_in * g4, h, g4, hs);
  for (int64_t j = 0; j < h; j++) {
    float c = sigmoid_fast(g[2 * h + j]) * cs[j] + sigmoid_fast(g[j]) * tanh_fast(g[3 * h + j]);
    cs[j] = c;
    hs[j] = sigmoid_fast(g[h + j]) * tanh_fast(c);
  }
  memcpy(nxt, hs, h * sizeof(float));
  return h;
}

static int64_t gru(const int64_t *r, const float *p, const float *cur, float *nxt, float *s,
                   float *g) {  /* linear_before_reset = 1, as PyTorch exports */
  int64_t n_in = r[GRU_N_IN], h = r[GRU_HID], g3 = 3 * h;
  float *hs = s + r[GRU_OFF_H], *gx = g, *gh = g + g3;
  memcpy(gx, p + r[GRU_OFF_WB], g3 * sizeof(float));
  memcpy(gh, p + r[GRU_OFF_RB], g3 * sizeof(float));
  matvec(gx, p + r[GRU_OFF_WX], n_in, g3, cur);
  matvec(gh, p + r[GRU_OFF_RH], h, g3, hs);
  for (int64_t j = 0; j < h; j++) {
    float z = sigmoid_fast(gx[j] + gh[j]), rr = sigmoid_fast(gx[h + j] + gh[h + j]);
    float n = tanh_fast(gx[2 * h + j] + rr * gh[2 * h + j]);
    nxt[j] = (1.0f - z) * n + z * hs[j];
  }
  memcpy(hs, nxt, h * sizeof(float));
  return h;
}

static int64_t rnn(const int64_t *r, const float *p, const float *cur, float *nxt, float *s,
                   float *g) {
  int64_t n_in = r[RNN_N_IN], h = r[RNN_HID];
  float *hs = s + r[RNN_OFF_H];
  memcpy(g, p + r[RNN_OFF_B], h * sizeof(float));
  matvec(g, p + r[RNN_OFF_WT], n_in, h, cur);
  matvec(g, p + r[RNN_OFF_WT] + n_in * h, h, h, hs);
  for (int64_t j = 0; j < h; j++) hs[j] = activate(r[RNN_ACT], p[r[RNN_OFF_ALPHA]], g[j]);
  memcpy(nxt, hs, h * sizeof(float));
  return h;
}

static void step(const int64_t *code, int64_t n_ops, const float *p, const float *x,
                 int64_t n, float *s, float *buf0, float *buf1, float *g) {
  float *cur = buf0, *nxt = buf1, *t;
  memcpy(cur, x, n * sizeof(float));
  for (int64_t i = 0; i < n_ops; i++) {
    const int64_t *r = code + i * CODE_WIDTH;
    switch (r[0]) {
      case OP_LSTM: n = lstm(r, p, cur, nxt, s, g); break;
      case OP_GRU: n = gru(r, p, cur, nxt, s, g); break;
      case OP_RNN: n = rnn(r, p, cur, nxt, s, g); break;
      case OP_DENSE:
        n = r[DENSE_N_OUT];
        memcpy(nxt, p + r[DENSE_OFF_B], n * sizeof(float));
        matvec(nxt, p + r[DENSE_OFF_W], r[DENSE_N_IN], n, cur);
        break;
      case OP_AFFINE:
        for (int64_t j = 0; j < n; j++)
          nxt[j] = cur[j] * p[r[AFFINE_OFF_SCALE] + j] + p[r[AFFINE_OFF_SHIFT] + j];
        break;
      case OP_ACT:
        for (int64_t j = 0; j < n; j++) nxt[j] = activate(r[ACT_KIND], p[r[ACT_OFF_ALPHA]], cur[j]);
        break;
      default: { /* softmax */
        float peak = cur[0], total = 0;
        for (int64_t j = 0; j < n; j++) peak = cur[j] > peak ? cur[j] : peak;
        for (int64_t j = 0; j < n; j++) total += (nxt[j] = expf(cur[j] - peak));
        for (int64_t j = 0; j < n; j++) nxt[j] /= total;
      }
    }
    t = cur; cur = nxt; nxt = t;
  }
  buf0[0] = cur[0];
}

/* n zeroed floats starting on a 64-byte cache line, as edgeseq aligns its parameters and
 * scratch (edgeseq/runtime/aligned.py), so both walk the same rows the same way. */
static float *lines(int64_t n) {
  size_t bytes = ((size_t)n * sizeof(float) + 63) / 64 * 64;
  float *p = aligned_alloc(64, bytes ? bytes : 64);
  if (!p) { perror("aligned_alloc"); exit(2); }
  memset(p, 0, bytes);
  return p;
}

static double now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e9 + t.tv_nsec;
}

static int by_value(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double median(double *v, long n) {
  qsort(v, n, sizeof *v, by_value);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int main(int argc, char **argv) {
  if (argc != 3) { fprintf(stderr, "usage: %s PROGRAM.bin STEPS\n", argv[0]); return 2; }
  FILE *f = fopen(argv[1], "rb");
  if (!f) { perror(argv[1]); return 2; }
  int64_t head[4], state_size;
  if (fread(head, sizeof head, 1, f) != 1) return 2;
  int64_t n_ops = head[0], width = head[1], n_features = head[2], n_params = head[3];
  int64_t *code = malloc(n_ops * CODE_WIDTH * sizeof(int64_t));
  float *params = lines(n_params);
  if (fread(code, sizeof(int64_t), n_ops * CODE_WIDTH, f) != (size_t)(n_ops * CODE_WIDTH))
    return 2;
  if (fread(params, sizeof(float), n_params, f) != (size_t)n_params) return 2;
  if (fread(&state_size, sizeof state_size, 1, f) != 1) return 2;
  float *state = lines(state_size);
  if (fread(state, sizeof(float), state_size, f) != (size_t)state_size) return 2;
  fclose(f);
  long steps = atol(argv[2]);
  float *b0 = lines(width), *b1 = lines(width), *g = lines(3 * width);
  float *xs = malloc(1024 * n_features * sizeof(float)); /* inputs made before timing */
  for (int64_t i = 0; i < 1024 * n_features; i++) xs[i] = (float)sin(0.01 * i);
  if (steps < 1) { fprintf(stderr, "STEPS must be >= 1\n"); return 2; }
  double checksum = 0, *lap = malloc(steps * sizeof(double));
  long n_empty = steps < 5000 ? steps : 5000;
  double *empty = malloc(n_empty * sizeof(double));
  for (long t = 0; t < (steps < 500 ? steps : 500); t++) {
    step(code, n_ops, params, xs + (t & 1023) * n_features, n_features, state, b0, b1, g);
    checksum += b0[0];
  }
  double start = now_ns();
  for (long t = 0; t < steps; t++) {
    double t0 = now_ns();
    step(code, n_ops, params, xs + (t & 1023) * n_features, n_features, state, b0, b1, g);
    lap[t] = now_ns() - t0;
    checksum += b0[0];
  }
  double mean = (now_ns() - start) / steps;
  for (long i = 0; i < n_empty; i++) {
    double t0 = now_ns();
    empty[i] = now_ns() - t0;
  }
  double ns = median(lap, steps) - median(empty, n_empty);
  printf("%.1f %.1f %.6f\n", ns > 0 ? ns : 0.0, mean, checksum);
  return 0;
}
