/* Power-cut test of save_state / load_state (mt_state.c) on a simulated store: the save is cut after every possible
 * number of written bytes (a torn write keeps its first bytes, then nothing is written any more), the device
 * "reboots" with its live state scribbled over, and load_state must give exactly the old or the new state, never a
 * mix; when the store held nothing valid before the save, a cut save must leave "no valid state" and the live state
 * untouched.
 *
 *   state_powercut PAGE FLASH   (FLASH 1: NOR flash, erase sets 0xFF and a write can only clear bits; 0: a file)
 *
 * Prints one line per scenario: "save <k> cuts <n> old <a> new <b> none <c> bad <d>"; exit status 1 if any bad. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

static uint8_t *mem;   /* the store under test */
static uint32_t slot;  /* bytes per slot */
static long budget;    /* bytes the device may still write before the cut; < 0: no cut */
static int flash;

static int rd(void *ctx, uint32_t s, uint32_t off, void *d, uint32_t n) {
  (void)ctx;
  if (s > 1 || off > slot || n > slot - off) return -1;
  memcpy(d, mem + s * slot + off, n);
  return 0;
}

static int program(uint8_t *dst, const uint8_t *src, uint32_t n) {
  uint32_t k = n;
  if (budget >= 0 && (long)n > budget) k = (uint32_t)budget;
  for (uint32_t i = 0; i < k; i++) dst[i] = flash ? (uint8_t)(dst[i] & src[i]) : src[i];
  if (budget >= 0) budget -= (long)k;
  return k == n ? 0 : -1;
}

static int wr(void *ctx, uint32_t s, uint32_t off, const void *d, uint32_t n) {
  (void)ctx;
  if (s > 1 || off > slot || n > slot - off) return -1;
  return program(mem + s * slot + off, (const uint8_t *)d, n);
}

static int er(void *ctx, uint32_t s) {
  (void)ctx;
  if (s > 1) return -1;
  uint8_t *p = mem + s * slot;
  for (uint32_t i = 0; i < slot; i++) {  /* erasing sets bits: 0xFF regardless of what was there */
    if (budget == 0) return -1;
    p[i] = 0xFF;
    if (budget > 0) budget--;
  }
  return 0;
}

static mt_store store_of(uint8_t *m, uint32_t page) {
  mt_store s = {m, page, 0, rd, wr, flash ? er : 0, 0};
  s.slot_bytes = slot;
  (void)m;
  return s;
}

/* The live state's payload (what a save writes), via a save into a scratch store. */
static void snapshot(uint8_t *out, uint32_t page, uint8_t *scratch) {
  uint8_t *keep = mem;
  long b = budget;
  mem = scratch, budget = -1;
  memset(scratch, flash ? 0xFF : 0, 2 * (size_t)slot);
  mt_store s = store_of(scratch, page);
  if (save_state(&s)) { fprintf(stderr, "snapshot save failed\n"); exit(2); }
  uint32_t head = (32u + page - 1) / page * page;
  memcpy(out, scratch + head, MT_STATE_PAYLOAD_BYTES);
  mem = keep, budget = b;
}

/* Make `image` (a store holding exactly one slot with `payload`) the live state. */
static void set_live(const uint8_t *image, uint32_t page, uint8_t *scratch) {
  uint8_t *keep = mem;
  mem = scratch, budget = -1;
  memcpy(scratch, image, 2 * (size_t)slot);
  mt_store s = store_of(scratch, page);
  if (load_state(&s)) { fprintf(stderr, "set_live failed\n"); exit(2); }
  mem = keep;
}

static void train(int steps) {
  for (int i = 0; i < steps; i++) {
#if MT_STREAM_INPUT
    static int8_t image[MT_IMAGE_BYTES];
    int8_t *x = image;
#else
    int8_t *x = input_buffer();
#endif
    for (uint32_t j = 0; j < MT_IMAGE_BYTES; j++) x[j] = (int8_t)((j * 37u + (uint32_t)i * 11u) & 0x7F);
    train_step(x, i % MT_NUM_CLASSES, 0.05f);
  }
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IONBF, 0);
  const uint32_t page = argc > 1 ? (uint32_t)atoi(argv[1]) : 256u;
  flash = argc > 2 ? atoi(argv[2]) : 0;
  slot = mt_state_slot_bytes(page, MT_STATE_PAYLOAD_BYTES);
  const size_t store_bytes = 2 * (size_t)slot, n = MT_STATE_PAYLOAD_BYTES;
  uint8_t *scratch = malloc(store_bytes), *base = malloc(store_bytes), *img[4], *ref[4], *live = malloc(n),
          *poison = malloc(store_bytes);
  mem = malloc(store_bytes);
  /* four distinct states: A, B, C to save, P to scribble over the live state before each load */
  for (int k = 0; k < 4; k++) {
    img[k] = malloc(store_bytes), ref[k] = malloc(n);
    if (k) train(3);
    snapshot(ref[k], page, scratch);
    memcpy(img[k], scratch, store_bytes);
  }
  memcpy(poison, img[3], store_bytes);
  int bad_total = 0;
  /* save k (0: A into an empty store, 1: B over {A}, 2: C over {A, B}: into A's slot) */
  for (int k = 0; k < 3; k++) {
    memset(base, flash ? 0xFF : 0, store_bytes);
    mem = base, budget = -1;
    for (int j = 0; j < k; j++) {
      set_live(img[j], page, scratch);
      mt_store s = store_of(base, page);
      if (save_state(&s)) { fprintf(stderr, "setup save failed\n"); return 2; }
    }
    /* how many bytes the uncut save writes */
    uint8_t *work = malloc(store_bytes), *tmp = malloc(store_bytes);
    set_live(img[k], page, tmp);
    memcpy(work, base, store_bytes);
    mem = work, budget = 1L << 40;
    mt_store s0 = store_of(work, page);
    if (save_state(&s0)) { fprintf(stderr, "uncut save failed\n"); return 2; }
    const long total = (1L << 40) - budget;
    long old = 0, neu = 0, none = 0, bad = 0;
    for (long cut = 0; cut <= total; cut++) {
      set_live(img[k], page, tmp);
      memcpy(work, base, store_bytes);
      mem = work, budget = cut;
      mt_store s = store_of(work, page);
      const int saved = save_state(&s);
      budget = -1;
      set_live(poison, page, tmp);  /* the reboot: live state is something else entirely */
      mem = work;
      const int rc = load_state(&s);
      snapshot(live, page, tmp);
      mem = work;
      if (rc == 0 && k > 0 && !memcmp(live, ref[k - 1], n)) old++;
      else if (rc == 0 && !memcmp(live, ref[k], n)) neu++;
      else if (rc == MT_STATE_NONE && k == 0 && !memcmp(live, ref[3], n)) none++;
      else {
        bad++;
        if (bad < 5) fprintf(stderr, "save %d cut %ld: rc %d saved %d, live state is neither old nor new\n", k, cut, rc,
                             saved);
      }
      if (cut == total && (saved || rc || memcmp(live, ref[k], n))) bad++, fprintf(stderr, "uncut save not loaded\n");
    }
    printf("save %d cuts %ld old %ld new %ld none %ld bad %ld\n", k + 1, total + 1, old, neu, none, bad);
    bad_total += bad > 0;
    free(work), free(tmp);
  }
  /* a store with nothing valid: load fails and the live state is untouched */
  memset(base, 0x5A, store_bytes);
  mem = base;
  mt_store s = store_of(base, page);
  snapshot(ref[0], page, scratch);
  const int rc = load_state(&s);
  snapshot(live, page, scratch);
  printf("garbage store rc %d untouched %d\n", rc, !memcmp(live, ref[0], n));
  bad_total += rc != MT_STATE_NONE || memcmp(live, ref[0], n);
  return bad_total ? 1 : 0;
}
