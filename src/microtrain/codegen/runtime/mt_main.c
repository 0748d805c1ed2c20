/* Training harness: reads a stream of (image, label, lr) records, trains one step per record and prints the loss,
 * then optionally saves the trainable state and predicts a held-out set. The same file runs on the host and, through
 * semihosting, on the Cortex-M4 in QEMU.
 *
 *   prog [-i STATE_IN] [-o STATE_OUT] [-t TRACE_OUT [-k STEP]] [-e EVAL_IN -p PRED_OUT] [-n MAX_STEPS] [-q] STREAM
 *
 * Record files: header uint32 {magic "MTD1", count, image bytes}, then per record int32 label, float32 lr, int8
 * image (CHW); the file is exactly that long, every training label is in [0, MT_NUM_CLASSES) and every learning rate
 * finite and >= 0, or the program stops with one error line before the step. Predictions: per image int32 class,
 * float32 logits[MT_NUM_CLASSES]. Trace (of step STEP, default 1): per tensor the step writes, uint32 name length,
 * name, uint32 bytes, data. All little-endian. State files: the two-slot store of mt_state.h on pages of
 * STATE_FILE_PAGE bytes (slot 1 at mt_state_slot_bytes()); -o writes the slot that does not hold the newest valid
 * state, so the file always holds the old or the new state, whenever the program stops; -i and -o may name the same
 * file. */
#include <string.h>

#include "model.h"
#include "mt_io.h"

#define RECORD_MAGIC 0x3144544Du

/* ---- printing without printf (no heap, identical text on every target) ---------------------------------------- */
static char line[160];
static int len;

static void put(const char *s) {
  while (*s && len < (int)sizeof line - 1) line[len++] = *s++;
  line[len] = 0;
}

static void put_u64(uint64_t v) {
  char b[24];
  int n = 0;
  do b[n++] = (char)('0' + v % 10); while ((v /= 10) && n < 23);
  while (n) { char s[2] = {b[--n], 0}; put(s); }
}

static void put_i64(int64_t v) {
  if (v < 0) put("-");
  put_u64(v < 0 ? (uint64_t)(-(v + 1)) + 1u : (uint64_t)v);
}

static void put_hex(uint32_t v) {
  char s[11] = "0x";
  for (int i = 0; i < 8; i++) s[2 + i] = "0123456789abcdef"[(v >> (28 - 4 * i)) & 15];
  s[10] = 0;
  put(s);
}

static void put_float(float f) {  /* 6 decimals, then the exact bits */
  uint32_t bits;
  memcpy(&bits, &f, 4);
  if (f != f) {
    put("nan");
  } else {
    if (f < 0) { put("-"); f = -f; }
    if (f > 4e9f) {
      put("inf");
    } else {
      uint32_t ip = (uint32_t)f;
      uint32_t frac = (uint32_t)((f - (float)ip) * 1e6f + 0.5f);
      if (frac >= 1000000u) { ip++; frac -= 1000000u; }
      put_u64(ip);
      put(".");
      for (uint32_t d = 100000u; d; d /= 10) { char s[2] = {(char)('0' + frac / d % 10), 0}; put(s); }
    }
  }
  put(" ");
  put_hex(bits);
}

static void flush(void) {
  put("\n");
  io_print(line);
  len = 0;
  line[0] = 0;
}

static int fail(const char *what, const char *arg) {
  put("error: ");
  put(what);
  put(arg ? arg : "");
  flush();
  return 1;
}

/* A record that cannot be trained on: one line naming the record, the value and the rule. */
static int bad_record(const char *file, uint32_t i, const char *what, int64_t v, const char *rule) {
  put("error: ");
  put(file);
  put(": record ");
  put_u64(i + 1u);
  put(": ");
  put(what);
  put(" ");
  put_i64(v);
  put(rule);
  flush();
  return 1;
}

/* ---- state and trace through the io layer --------------------------------------------------------------------- */
#define STATE_FILE_PAGE 256u /* codegen/statefile.py FILE_PAGE */
static uint32_t state_slot_bytes(void) { return mt_state_slot_bytes(STATE_FILE_PAGE, MT_STATE_PAYLOAD_BYTES); }

static int store_read(void *ctx, uint32_t slot, uint32_t off, void *data, uint32_t n) {
  const int h = *(int *)ctx;
  return io_seek(h, slot * state_slot_bytes() + off) || io_read(h, data, n) ? -1 : 0;
}

static int store_write(void *ctx, uint32_t slot, uint32_t off, const void *data, uint32_t n) {
  const int h = *(int *)ctx;
  return io_seek(h, slot * state_slot_bytes() + off) || io_write(h, data, n) ? -1 : 0;
}

static int store_sync(void *ctx) { return io_sync(*(int *)ctx); }

static mt_store file_store(int *h) {
  mt_store s = {h, STATE_FILE_PAGE, 0, store_read, store_write, 0, store_sync};
  s.slot_bytes = state_slot_bytes();
  return s;
}

static int trace_file = -1;
static void trace(const char *name, const void *data, uint32_t nbytes) {
  uint32_t n = (uint32_t)strlen(name);
  io_write(trace_file, &n, 4);
  io_write(trace_file, name, n);
  io_write(trace_file, &nbytes, 4);
  io_write(trace_file, data, nbytes);
}

/* One record's image, read where it lies in the record file: with MT_STREAM_INPUT the program asks for each patch's
 * input region (seek + read per row segment), so the harness holds no image either; otherwise the whole image is
 * read into the program's input slot. */
#define RECORD_HEAD 12u
#define RECORD_BYTES (8u + MT_IMAGE_BYTES)
typedef struct { int h; uint32_t pos; int failed; } file_image;

#if MT_STREAM_INPUT
static int read_file_image(void *ctx, int8_t *dst, int32_t ch, int32_t row, int32_t col, int32_t n) {
  file_image *f = (file_image *)ctx;
  if (io_seek(f->h, f->pos + (uint32_t)((ch * MT_IMAGE_H + row) * MT_IMAGE_W + col)) || io_read(f->h, dst, (uint32_t)n))
    f->failed = 1;
  return f->failed;
}
#endif

/* Reads record i's label and lr and positions `img` on its image; then train / predict from it. */
static int read_record(int h, uint32_t i, int32_t *label, float *lr, file_image *img) {
  img->h = h;
  img->pos = RECORD_HEAD + i * RECORD_BYTES + 8u;
  img->failed = 0;
  if (io_seek(h, img->pos - 8u) || io_read(h, label, 4) || io_read(h, lr, 4)) return -1;
#if MT_STREAM_INPUT
  return 0;
#else
  return io_read(h, input_buffer(), MT_IMAGE_BYTES);
#endif
}

static float train_record(file_image *img, int32_t label, float lr) {
#if MT_STREAM_INPUT
  return train_step_from(read_file_image, img, label, lr);
#else
  (void)img;
  return train_step(input_buffer(), label, lr);
#endif
}

static int predict_record(file_image *img, float *logits) {
#if MT_STREAM_INPUT
  return predict_from(read_file_image, img, logits);
#else
  (void)img;
  return predict(input_buffer(), logits);
#endif
}

/* A record file whose header is this program's and whose size is exactly header + count records; -1 when it cannot
 * be opened, -2 for a foreign header, -3 for a size that does not match (truncated, or trailing bytes). */
static int open_records(const char *path, uint32_t *count) {
  uint32_t head[3];
  int h = io_open(path, 0);
  if (h < 0) return -1;
  if (io_read(h, head, sizeof head) || head[0] != RECORD_MAGIC || head[2] != MT_IMAGE_BYTES) {
    io_close(h);
    return -2;
  }
  const int64_t size = io_size(h);
  if (size < 0 || (uint64_t)size != RECORD_HEAD + (uint64_t)head[1] * RECORD_BYTES) {
    io_close(h);
    return -3;
  }
  *count = head[1];
  return h;
}

static int records_error(int rc, const char *path) {
  if (rc == -1) return fail("cannot open ", path);
  if (rc == -2) return fail("not a record file of this program (magic, image size): ", path);
  return fail("record file size does not match its header (truncated or trailing bytes): ", path);
}

static uint32_t parse_u32(const char *p) {
  uint32_t v = 0;
  for (; *p >= '0' && *p <= '9'; p++) v = v * 10 + (uint32_t)(*p - '0');
  return v;
}

int harness_main(int argc, char **argv) {
  const char *state_in = 0, *state_out = 0, *trace_out = 0, *eval_in = 0, *pred_out = 0, *stream = 0;
  uint32_t max_steps = 0xFFFFFFFFu, trace_step = 1;
  int quiet = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (a[0] == '-' && a[1] && !a[2] && a[1] != 'q' && i + 1 >= argc) return fail("missing value after ", a);
    if (!strcmp(a, "-i")) state_in = argv[++i];
    else if (!strcmp(a, "-o")) state_out = argv[++i];
    else if (!strcmp(a, "-t")) trace_out = argv[++i];
    else if (!strcmp(a, "-e")) eval_in = argv[++i];
    else if (!strcmp(a, "-p")) pred_out = argv[++i];
    else if (!strcmp(a, "-n")) max_steps = parse_u32(argv[++i]);
    else if (!strcmp(a, "-k")) trace_step = parse_u32(argv[++i]);
    else if (!strcmp(a, "-q")) quiet = 1;
    else if (a[0] == '-') return fail("unknown option ", a);
    else stream = a;
  }
  if (state_in) {
    int h = io_open(state_in, 0);
    if (h < 0) return fail("cannot open ", state_in);
    const mt_store store = file_store(&h);
    int rc = load_state(&store);
    io_close(h);
    if (rc) return fail("state file does not match this program or is corrupt (no valid slot): ", state_in);
  }
  uint64_t train_ns = 0;
  uint32_t done = 0;
  if (stream) {
    uint32_t count;
    int h = open_records(stream, &count);
    if (h < 0) return records_error(h, stream);
    if (trace_out) {
      trace_file = io_open(trace_out, 1);
      if (trace_file < 0) return fail("cannot write ", trace_out);
    }
    for (; done < count && done < max_steps; done++) {
      if (trace_file >= 0 && done + 1 == trace_step) mt_trace = trace;
      int32_t label;
      float lr;
      file_image img;
      if (read_record(h, done, &label, &lr, &img)) return fail("truncated record file ", stream);
      if (label < 0 || label >= MT_NUM_CLASSES) return bad_record(stream, done, "label", label, " is not a class");
      if (!(lr >= 0.0f && lr <= 3.4028234e38f)) {
        uint32_t bits;
        memcpy(&bits, &lr, 4);
        return bad_record(stream, done, "learning rate with bits", bits, " is not finite and >= 0");
      }
      const uint64_t t0 = io_time_ns();
      const float loss = train_record(&img, label, lr);
      train_ns += io_time_ns() - t0;
      if (img.failed) return fail("truncated record file ", stream);
      if (mt_trace) {
        mt_trace = 0;
        io_close(trace_file);
        trace_file = -1;
      }
      if (!quiet) {
        put("step ");
        put_u64(done + 1);
        put(" loss ");
        put_float(loss);
        flush();
      }
    }
    io_close(h);
    if (trace_file >= 0) io_close(trace_file);
  }
  if (state_out) {
    int h = io_open(state_out, 2);
    if (h < 0) return fail("cannot write ", state_out);
    const mt_store store = file_store(&h);
    int rc = save_state(&store);
    io_close(h);
    if (rc) return fail("cannot write ", state_out);
  }
  if (eval_in && pred_out) {
    uint32_t count;
    int h = open_records(eval_in, &count);
    if (h < 0) return records_error(h, eval_in);
    int o = io_open(pred_out, 1);
    if (o < 0) return fail("cannot write ", pred_out);
    for (uint32_t i = 0; i < count; i++) {
      int32_t label;
      float lr, logits[MT_NUM_CLASSES];
      file_image img;
      if (read_record(h, i, &label, &lr, &img)) return fail("truncated record file ", eval_in);
      const int32_t cls = predict_record(&img, logits);
      if (img.failed) return fail("truncated record file ", eval_in);
      io_write(o, &cls, 4);
      io_write(o, logits, sizeof logits);
    }
    io_close(h);
    io_close(o);
  }
  put("summary steps ");
  put_u64(done);
  put(" train_ns ");
  put_u64(train_ns);
  put(" stack_bytes ");
  put_u64(io_stack_used());
  put(" arena_bytes ");
  put_u64(MT_ARENA_BYTES);
  flush();
  return 0;
}
