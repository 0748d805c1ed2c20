/* Device state that survives power cuts: the trainable state in two slots of a store (flash pages, a file).
 *
 * A slot is a header region (one page, at least MT_STATE_HEADER_BYTES) followed by the payload, padded to whole
 * pages. The header is {u32 magic "MTS2", u32 layout fingerprint, u32 sequence number, u32 payload bytes, u32 CRC-32
 * of the payload, u32 page bytes, u32 0, u32 CRC-32 of the 28 bytes before it}, little-endian.
 *
 * mt_state_save writes the slot that does not hold the newest valid state: it first invalidates that slot (erase, or
 * zeroes over its header page), then writes the payload page by page, then syncs, then writes the header (the
 * commit), then syncs. A power cut at any point leaves the other slot as it was, so the store always holds the old
 * or the new state. mt_state_load checks both slots (header, then the CRC-32 over the stored payload, read through
 * one page of buffer: nothing of the live state is touched while checking), takes the newest valid one and only
 * then copies it into the live state; when no slot is valid it returns MT_STATE_NONE and the live state is as it
 * was.
 *
 * A store for flash: page_bytes = the program granularity (<= MT_STATE_PAGE_MAX), slot_bytes = the bytes reserved
 * for one slot (mt_state_slot_bytes), read / write at byte offsets inside slot 0 or 1 (every write starts at a page
 * boundary and is page_bytes long), erase = erase a slot's pages (all bytes 0xFF; NULL where a write may overwrite,
 * e.g. a file), sync = wait until everything written is durable (NULL where writes are synchronous). Callbacks
 * return 0 on success. */
#ifndef MT_STATE_H
#define MT_STATE_H

#include <stdint.h>

#ifndef MT_STATE_PAGE_MAX
#define MT_STATE_PAGE_MAX 256u /* the largest page a store may use: the one page buffer save and load need */
#endif
#define MT_STATE_MAGIC 0x3253544Du /* "MTS2" */
#define MT_STATE_HEADER_BYTES 32u

enum { MT_STATE_OK = 0, MT_STATE_IO = -1, MT_STATE_NONE = -2, MT_STATE_CONFIG = -3, MT_STATE_CHANGED = -4 };

typedef struct {
  void *ctx;
  uint32_t page_bytes;
  uint32_t slot_bytes;
  int (*read)(void *ctx, uint32_t slot, uint32_t offset, void *data, uint32_t n);
  int (*write)(void *ctx, uint32_t slot, uint32_t offset, const void *data, uint32_t n);
  int (*erase)(void *ctx, uint32_t slot);
  int (*sync)(void *ctx);
} mt_store;

/* One piece of the live state (the step counter, a tensor), saved in table order. A slot whose MT_STATE_F32 part
 * holds a NaN or an infinity is not valid (a state no training step can produce: it would poison every step). */
enum { MT_STATE_RAW = 0, MT_STATE_F32 = 1 };
typedef struct {
  void *data;
  uint32_t nbytes;
  uint32_t kind;
} mt_state_part;

/* Bytes one slot needs for `payload_bytes` of state on pages of `page_bytes`. */
uint32_t mt_state_slot_bytes(uint32_t page_bytes, uint32_t payload_bytes);
/* CRC-32 (IEEE 802.3, as zlib's crc32) of n bytes, continuing from crc (0 to start). */
uint32_t mt_crc32(uint32_t crc, const void *data, uint32_t n);

/* MT_STATE_OK, or MT_STATE_IO (a callback failed: the old state is still the newest valid one), MT_STATE_CONFIG. */
int mt_state_save(const mt_store *s, uint32_t fingerprint, const mt_state_part *parts, uint32_t count);
/* MT_STATE_OK, MT_STATE_NONE (no valid slot: live state untouched), MT_STATE_CONFIG, or MT_STATE_CHANGED (the
 * store read back differently while copying: the live state may be partly overwritten; load again). */
int mt_state_load(const mt_store *s, uint32_t fingerprint, const mt_state_part *parts, uint32_t count);
/* The sequence number of the newest valid slot (0 when none): the number of saves into this store. */
uint32_t mt_state_sequence(const mt_store *s, uint32_t fingerprint, uint32_t payload_bytes);

#endif
