/* Two-slot, CRC-checked, header-last state storage (see mt_state.h). No heap; one page of static buffer. */
#include <string.h>

#include "mt_state.h"

static uint8_t page[MT_STATE_PAGE_MAX];

uint32_t mt_crc32(uint32_t crc, const void *data, uint32_t n) {
  static const uint32_t nibble[16] = {
      0x00000000u, 0x1DB71064u, 0x3B6E20C8u, 0x26D930ACu, 0x76DC4190u, 0x6B6B51F4u, 0x4DB26158u, 0x5005713Cu,
      0xEDB88320u, 0xF00F9344u, 0xD6D6A3E8u, 0xCB61B38Cu, 0x9B64C2B0u, 0x86D3D2D4u, 0xA00AE278u, 0xBDBDF21Cu};
  const uint8_t *p = (const uint8_t *)data;
  crc = ~crc;
  for (uint32_t i = 0; i < n; i++) {
    crc ^= p[i];
    crc = (crc >> 4) ^ nibble[crc & 15u];
    crc = (crc >> 4) ^ nibble[crc & 15u];
  }
  return ~crc;
}

static uint32_t header_region(uint32_t page_bytes) {
  return (MT_STATE_HEADER_BYTES + page_bytes - 1) / page_bytes * page_bytes;
}

uint32_t mt_state_slot_bytes(uint32_t page_bytes, uint32_t payload_bytes) {
  if (!page_bytes) return 0;
  return header_region(page_bytes) + (payload_bytes + page_bytes - 1) / page_bytes * page_bytes;
}

static uint32_t payload_of(const mt_state_part *parts, uint32_t count) {
  uint32_t n = 0;
  for (uint32_t i = 0; i < count; i++) n += parts[i].nbytes;
  return n;
}

static void put32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get32(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int config_ok(const mt_store *s, uint32_t payload) {
  return s && s->read && s->write && s->page_bytes && s->page_bytes <= MT_STATE_PAGE_MAX &&
         s->slot_bytes >= mt_state_slot_bytes(s->page_bytes, payload);
}

/* Walks the payload byte stream part by part: 0 when a float32 part holds a NaN or an infinity. */
typedef struct {
  const mt_state_part *parts;
  uint32_t count, part, at, word;
} finite_walk;

static int finite_bytes(finite_walk *w, const uint8_t *p, uint32_t n) {
  for (uint32_t i = 0; i < n; i++) {
    while (w->part < w->count && w->at == w->parts[w->part].nbytes) w->part++, w->at = 0;
    if (w->part == w->count) return 1;
    if (w->parts[w->part].kind == MT_STATE_F32) {
      w->word |= (uint32_t)p[i] << (8 * (w->at & 3u));
      if ((w->at & 3u) == 3u) {
        if ((w->word & 0x7F800000u) == 0x7F800000u) return 0;
        w->word = 0;
      }
    }
    w->at++;
  }
  return 1;
}

/* The slot's sequence number if its header and payload CRC check out and its float32 parts are finite; *valid = 0
 * otherwise. Reads through `page`. */
static uint32_t check_slot(const mt_store *s, uint32_t slot, uint32_t fingerprint, const mt_state_part *parts,
                           uint32_t count, uint32_t payload, int *valid) {
  uint8_t h[MT_STATE_HEADER_BYTES];
  *valid = 0;
  if (s->read(s->ctx, slot, 0, h, sizeof h)) return 0;
  if (get32(h) != MT_STATE_MAGIC || get32(h + 4) != fingerprint || get32(h + 12) != payload ||
      get32(h + 20) != s->page_bytes || get32(h + 28) != mt_crc32(0, h, 28))
    return 0;
  uint32_t crc = 0, base = header_region(s->page_bytes);
  finite_walk walk = {parts, count, 0, 0, 0};
  int finite = 1;
  for (uint32_t off = 0; off < payload; off += s->page_bytes) {
    uint32_t n = payload - off < s->page_bytes ? payload - off : s->page_bytes;
    if (s->read(s->ctx, slot, base + off, page, n)) return 0;
    crc = mt_crc32(crc, page, n);
    if (parts) finite = finite && finite_bytes(&walk, page, n);
  }
  if (!finite) return 0;
  if (crc != get32(h + 16)) return 0;
  *valid = 1;
  return get32(h + 8);
}

/* The newest valid slot (-1 if none) and its sequence number. */
static int newest(const mt_store *s, uint32_t fingerprint, const mt_state_part *parts, uint32_t count,
                  uint32_t payload, uint32_t *seq) {
  int v0, v1;
  uint32_t s0 = check_slot(s, 0, fingerprint, parts, count, payload, &v0);
  uint32_t s1 = check_slot(s, 1, fingerprint, parts, count, payload, &v1);
  if (v0 && v1) {
    int second = (int32_t)(s1 - s0) > 0;
    *seq = second ? s1 : s0;
    return second;
  }
  *seq = v0 ? s0 : v1 ? s1 : 0;
  return v0 ? 0 : v1 ? 1 : -1;
}

uint32_t mt_state_sequence(const mt_store *s, uint32_t fingerprint, uint32_t payload_bytes) {
  uint32_t seq = 0;
  if (!config_ok(s, payload_bytes)) return 0;
  return newest(s, fingerprint, 0, 0, payload_bytes, &seq) < 0 ? 0 : seq;
}

static int sync(const mt_store *s) { return s->sync ? s->sync(s->ctx) : 0; }

int mt_state_save(const mt_store *s, uint32_t fingerprint, const mt_state_part *parts, uint32_t count) {
  const uint32_t payload = payload_of(parts, count);
  if (!config_ok(s, payload)) return MT_STATE_CONFIG;
  const uint32_t pg = s->page_bytes, base = header_region(pg);
  uint32_t seq;
  const int live = newest(s, fingerprint, parts, count, payload, &seq);
  const uint32_t slot = live == 0 ? 1u : 0u;
  /* 1. the target slot stops being valid before any of its payload changes */
  if (s->erase) {
    if (s->erase(s->ctx, slot)) return MT_STATE_IO;
  } else {
    memset(page, 0, pg);
    for (uint32_t off = 0; off < base; off += pg)
      if (s->write(s->ctx, slot, off, page, pg)) return MT_STATE_IO;
  }
  if (sync(s)) return MT_STATE_IO;
  /* 2. the payload, page by page, gathered from the parts */
  uint32_t crc = 0, fill = 0, off = base;
  for (uint32_t i = 0; i < count; i++) {
    const uint8_t *p = (const uint8_t *)parts[i].data;
    for (uint32_t left = parts[i].nbytes; left;) {
      uint32_t n = pg - fill < left ? pg - fill : left;
      memcpy(page + fill, p, n);
      crc = mt_crc32(crc, p, n);
      fill += n, p += n, left -= n;
      if (fill == pg) {
        if (s->write(s->ctx, slot, off, page, pg)) return MT_STATE_IO;
        off += pg, fill = 0;
      }
    }
  }
  if (fill) {
    memset(page + fill, 0xFF, pg - fill);
    if (s->write(s->ctx, slot, off, page, pg)) return MT_STATE_IO;
  }
  if (sync(s)) return MT_STATE_IO;
  /* 3. the commit: the header (page by page where a page is smaller than the header; its CRC catches a torn one) */
  uint8_t h[MT_STATE_HEADER_BYTES];
  put32(h, MT_STATE_MAGIC);
  put32(h + 4, fingerprint);
  put32(h + 8, seq + 1u);
  put32(h + 12, payload);
  put32(h + 16, crc);
  put32(h + 20, pg);
  put32(h + 24, 0);
  put32(h + 28, mt_crc32(0, h, 28));
  for (uint32_t o = 0; o < base; o += pg) {
    for (uint32_t i = 0; i < pg; i++) page[i] = o + i < sizeof h ? h[o + i] : 0xFFu;
    if (s->write(s->ctx, slot, o, page, pg)) return MT_STATE_IO;
  }
  return sync(s) ? MT_STATE_IO : MT_STATE_OK;
}

int mt_state_load(const mt_store *s, uint32_t fingerprint, const mt_state_part *parts, uint32_t count) {
  const uint32_t payload = payload_of(parts, count);
  if (!config_ok(s, payload)) return MT_STATE_CONFIG;
  uint32_t seq;
  const int slot = newest(s, fingerprint, parts, count, payload, &seq);
  if (slot < 0) return MT_STATE_NONE;
  uint8_t h[MT_STATE_HEADER_BYTES];
  if (s->read(s->ctx, (uint32_t)slot, 0, h, sizeof h)) return MT_STATE_CHANGED;
  uint32_t crc = 0, off = header_region(s->page_bytes);
  for (uint32_t i = 0; i < count; i++) {
    if (parts[i].nbytes && s->read(s->ctx, (uint32_t)slot, off, parts[i].data, parts[i].nbytes))
      return MT_STATE_CHANGED;
    crc = mt_crc32(crc, parts[i].data, parts[i].nbytes);
    off += parts[i].nbytes;
  }
  return crc == get32(h + 16) && get32(h + 8) == seq ? MT_STATE_OK : MT_STATE_CHANGED;
}
