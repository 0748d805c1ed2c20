/* Cortex-M4 start-up for QEMU's mps2-an386: vector table, reset handler (copy .data, zero .bss, enable the FPU,
 * paint the free RAM below the stack pointer, start SysTick), semihosting handles, main. Faults report and exit.
 * SysTick counts the 25 MHz processor clock; under `qemu -icount shift=0` one instruction takes 1 ns of virtual time,
 * so io_time_ns() then counts instructions. */
#include <stdint.h>

#include "mt_io.h"

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;
extern void initialise_monitor_handles(void);
extern int main(void);
extern void mt_exit(int code);

#define PAINT 0xA5A5A5A5u

static uint32_t *paint_bottom;
static volatile uint32_t systick_wraps;

#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)
#define CPU_HZ 25000000u

void SysTick_Handler(void) { systick_wraps++; }

uint64_t io_time_ns(void) {
  uint32_t wraps, left;
  do {  /* a wrap between the two reads would pair a new count with an old wrap number */
    wraps = systick_wraps;
    left = SYST_CVR;
  } while (wraps != systick_wraps);
  const uint64_t ticks = ((uint64_t)wraps << 24) + (0xFFFFFFu - left);
  return ticks * (1000000000u / CPU_HZ);
}

void Reset_Handler(void) {
  for (uint32_t *s = &_sidata, *d = &_sdata; d < &_edata;) *d++ = *s++;
  for (uint32_t *d = &_sbss; d < &_ebss;) *d++ = 0;
  *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20;  /* CPACR: full access to CP10 and CP11 (the FPU) */
  __asm__ volatile("dsb\n\tisb" ::: "memory");
  uint32_t *sp;
  __asm__ volatile("mov %0, sp" : "=r"(sp));
  paint_bottom = &_ebss;
  for (uint32_t *p = paint_bottom; p < sp - 16; p++) *p = PAINT;
  SYST_RVR = 0xFFFFFFu;
  SYST_CVR = 0;
  SYST_CSR = 7u;  /* processor clock, interrupt on wrap, enabled */
  initialise_monitor_handles();
  main();
  for (;;) {
  }
}

uint32_t io_stack_used(void) {
  uint32_t *p = paint_bottom;
  while (p < &_estack && *p == PAINT) p++;
  return (uint32_t)((uint8_t *)&_estack - (uint8_t *)p);
}

void Fault_Handler(void) {
  io_print("fault: hard fault / bus fault / usage fault\n");
  mt_exit(3);
}

__attribute__((section(".isr_vector"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))&_estack, Reset_Handler, Fault_Handler, Fault_Handler, Fault_Handler, Fault_Handler,
    Fault_Handler, 0, 0, 0, 0, Fault_Handler, Fault_Handler, 0, Fault_Handler, SysTick_Handler,
};
