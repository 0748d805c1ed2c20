/* Host side of the harness: stdio files, and the training run on a thread whose stack is a painted mapping, so its
 * high-water mark can be measured like on the device (and it stays out of the program's .bss). */
#define _DEFAULT_SOURCE
#include <pthread.h>
#include <sys/mman.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "mt_io.h"

#define MAX_FILES 8
#define STACK_BYTES (1u << 20)
#define PAINT 0xA5u

static FILE *files[MAX_FILES];
static unsigned char *stack;

int io_open(const char *path, int mode) {
  for (int h = 0; h < MAX_FILES; h++) {
    if (files[h]) continue;
    files[h] = fopen(path, mode == 1 ? "wb" : mode == 2 ? "r+b" : "rb");
    if (!files[h] && mode == 2) files[h] = fopen(path, "w+b");
    return files[h] ? h : -1;
  }
  return -1;
}

int io_read(int h, void *data, uint32_t n) { return fread(data, 1, n, files[h]) == n ? 0 : -1; }
int io_write(int h, const void *data, uint32_t n) { return fwrite(data, 1, n, files[h]) == n ? 0 : -1; }
int io_seek(int h, uint32_t pos) { return fseek(files[h], (long)pos, SEEK_SET) ? -1 : 0; }

int64_t io_size(int h) {
  long here = ftell(files[h]);
  if (here < 0 || fseek(files[h], 0, SEEK_END)) return -1;
  long end = ftell(files[h]);
  if (fseek(files[h], here, SEEK_SET)) return -1;
  return end;
}

int io_sync(int h) { return fflush(files[h]) ? -1 : 0; }

void io_close(int h) {
  fclose(files[h]);
  files[h] = 0;
}

void io_print(const char *s) {
  fputs(s, stdout);
  fflush(stdout);
}

uint64_t io_time_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

uint32_t io_stack_used(void) {
  uint32_t i = 0;
  while (stack && i < STACK_BYTES && stack[i] == PAINT) i++;
  return STACK_BYTES - i;
}

typedef struct { int argc; char **argv; int rc; } run_args;

static void *run(void *p) {
  run_args *a = (run_args *)p;
  a->rc = harness_main(a->argc, a->argv);
  return 0;
}

int main(int argc, char **argv) {
  run_args a = {argc, argv, 1};
  pthread_attr_t attr;
  pthread_t t;
  stack = mmap(0, STACK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (stack == MAP_FAILED) return 1;
  memset(stack, PAINT, STACK_BYTES);
  if (pthread_attr_init(&attr) || pthread_attr_setstack(&attr, stack, STACK_BYTES) ||
      pthread_create(&t, &attr, run, &a) || pthread_join(t, 0)) {
    fputs("cannot start the training thread\n", stderr);
    return 1;
  }
  return a.rc;
}
