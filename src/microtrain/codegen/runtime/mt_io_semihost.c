/* Cortex-M side of the harness: ARM semihosting (bkpt 0xAB) for files, console, command line and exit, under QEMU
 * `-semihosting`. No stdio, so no heap: the RAM the program uses is .data + .bss + the measured stack. */
#include <string.h>

#include "mt_io.h"

enum { SYS_OPEN = 0x01, SYS_CLOSE = 0x02, SYS_WRITE0 = 0x04, SYS_WRITE = 0x05, SYS_READ = 0x06, SYS_SEEK = 0x0A, SYS_FLEN = 0x0C,
       SYS_GET_CMDLINE = 0x15, SYS_EXIT_EXTENDED = 0x20 };

static int semihost(int op, void *arg) {
  register int r0 __asm__("r0") = op;
  register void *r1 __asm__("r1") = arg;
  __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
  return r0;
}

int io_open(const char *path, int mode) {
  uint32_t args[3] = {(uint32_t)path, mode == 1 ? 5u : mode == 2 ? 3u : 1u, (uint32_t)strlen(path)}; /* wb r+b rb */
  int h = semihost(SYS_OPEN, args);
  if (h < 0 && mode == 2) {
    args[1] = 7u; /* "w+b": create */
    h = semihost(SYS_OPEN, args);
  }
  return h;
}

int io_read(int h, void *data, uint32_t n) {
  uint32_t args[3] = {(uint32_t)h, (uint32_t)data, n};
  return semihost(SYS_READ, args) == 0 ? 0 : -1;  /* returns the number of bytes NOT read */
}

int io_write(int h, const void *data, uint32_t n) {
  uint32_t args[3] = {(uint32_t)h, (uint32_t)data, n};
  return semihost(SYS_WRITE, args) == 0 ? 0 : -1;
}

int io_seek(int h, uint32_t pos) {
  uint32_t args[2] = {(uint32_t)h, pos};
  return semihost(SYS_SEEK, args) == 0 ? 0 : -1;
}

int64_t io_size(int h) {
  uint32_t args[1] = {(uint32_t)h};
  return semihost(SYS_FLEN, args);
}

int io_sync(int h) { return h < 0 ? -1 : 0; } /* semihosting writes are synchronous */

void io_close(int h) {
  uint32_t args[1] = {(uint32_t)h};
  semihost(SYS_CLOSE, args);
}

void io_print(const char *s) { semihost(SYS_WRITE0, (void *)s); }

void mt_exit(int code) {
  uint32_t args[2] = {0x20026u, (uint32_t)code};  /* ADP_Stopped_ApplicationExit, exit status */
  semihost(SYS_EXIT_EXTENDED, args);
  for (;;) {
  }
}

/* The command line QEMU passes (-append): split on spaces into argv. */
static char cmdline[256];
static char *args[16];

int main(void) {
  uint32_t block[2] = {(uint32_t)cmdline, sizeof cmdline - 1};
  int argc = 0;
  if (semihost(SYS_GET_CMDLINE, block) == 0) {
    for (char *p = cmdline; *p && argc < 16;) {
      while (*p == ' ') *p++ = 0;
      if (*p) args[argc++] = p;
      while (*p && *p != ' ') p++;
    }
  }
  mt_exit(harness_main(argc, args));
  return 0;
}
