/* The profile build (make profile, -DMT_PROFILE): the generated forward() / backward() mark the end of every op
 * with MT_PROF(kind); each mark charges the time since the previous one (io_time_ns: instructions under
 * `qemu -icount shift=0`) to that op kind, and after each training step the harness's console gets one line per
 * kind, `profile KIND TOTAL_NS` (totals since the program started; microtrain compile --profile reads them). A
 * mark costs a few dozen instructions, charged to the next op. Without MT_PROFILE this file is empty. */
#include "mt_runtime.h"

typedef int mt_profile_unused;  /* ISO C: a translation unit declares something */

#ifdef MT_PROFILE
#include "mt_io.h"

#define MT_PROF_KINDS 64
static uint64_t prof_last, prof_total[MT_PROF_KINDS];

void mt_prof_mark(int32_t kind) {
  const uint64_t t = io_time_ns();
  if (kind >= 0 && kind < MT_PROF_KINDS) prof_total[kind] += t - prof_last;
  prof_last = t;
}

static char *put_u64(char *p, uint64_t v) {
  char d[24];
  int n = 0;
  do d[n++] = (char)('0' + v % 10u); while ((v /= 10u) != 0);
  while (n) *p++ = d[--n];
  return p;
}

void mt_prof_report(const char *const *names, int32_t n) {
  char line[128];
  for (int32_t k = 0; k < n && k < MT_PROF_KINDS; k++) {
    char *p = line;
    for (const char *s = "profile "; *s;) *p++ = *s++;
    for (const char *s = names[k]; *s && p < line + 96;) *p++ = *s == ' ' ? '_' : *s, s++;
    *p++ = ' ';
    p = put_u64(p, prof_total[k]);
    *p++ = '\n';
    *p = 0;
    io_print(line);
  }
}
#endif
