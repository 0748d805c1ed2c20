/* The harness's view of the outside world: files, console, exit, stack measurement. Implemented with stdio on the
 * host (mt_io_host.c) and with ARM semihosting calls on the Cortex-M4 (mt_io_semihost.c), no heap on either. */
#ifndef MT_IO_H
#define MT_IO_H

#include <stdint.h>

int io_open(const char *path, int mode);  /* 0 read, 1 write (truncate), 2 read + write (create if missing):
                                              a handle >= 0, or -1 */
int io_read(int h, void *data, uint32_t n);  /* 0 when all n bytes were read */
int io_write(int h, const void *data, uint32_t n);
int io_seek(int h, uint32_t pos);  /* 0 when the next read starts at byte `pos` */
int64_t io_size(int h);  /* bytes in the file, or -1 */
int io_sync(int h);  /* 0 when everything written to h is handed to the file system */
void io_close(int h);
void io_print(const char *s);
uint64_t io_time_ns(void);  /* monotonic wall time, 0 where there is none */
uint32_t io_stack_used(void);  /* high-water mark of the painted stack, bytes */

int harness_main(int argc, char **argv);

#endif
