/* The host's plain read bandwidth: THREADS threads each summing its share of a MIB-MiB buffer (on huge
   pages where Linux allows), 7 times; prints GB/s per pass. The ceiling a decode step's weight streaming
   is compared with in docs/benchmarks.md#why-int4-decode-is-level-not-ahead.

     gcc -O3 -march=native -pthread benchmarks/stream_bw.c -o /tmp/stream_bw && /tmp/stream_bw 1024 2
*/
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static size_t words;
static const uint64_t* buf;
static int threads;

static void* part(void* arg) {
  const size_t id = (size_t)arg, n = words / threads;
  const uint64_t* p = buf + id * n;
  uint64_t s = 0;
  for (size_t i = 0; i < n; ++i) s += p[i];
  return (void*)(uintptr_t)s;
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: stream_bw MIB THREADS\n");
    return 2;
  }
  const size_t bytes = (size_t)atol(argv[1]) << 20;
  threads = atoi(argv[2]);
  if (bytes == 0 || threads < 1 || threads > 256) {
    fprintf(stderr, "stream_bw: MIB and THREADS must be positive (THREADS at most 256)\n");
    return 2;
  }
  uint64_t* b = aligned_alloc(1 << 21, (bytes + (1 << 21) - 1) >> 21 << 21);
  if (!b) {
    fprintf(stderr, "stream_bw: cannot allocate %zu MiB\n", bytes >> 20);
    return 1;
  }
  madvise(b, bytes, MADV_HUGEPAGE);
  memset(b, 1, bytes);
  buf = b;
  words = bytes / 8;
  uint64_t check = 0;
  for (int pass = 0; pass < 7; ++pass) {
    pthread_t t[256];
    const double t0 = now();
    for (int i = 0; i < threads; ++i) pthread_create(&t[i], NULL, part, (void*)(size_t)i);
    for (int i = 0; i < threads; ++i) {
      void* s;
      pthread_join(t[i], &s);
      check += (uintptr_t)s;
    }
    printf("%d thread(s), %zu MiB: %.1f GB/s\n", threads, bytes >> 20, bytes / (now() - t0) / 1e9);
  }
  return check == 42;  /* keeps the sums */
}
