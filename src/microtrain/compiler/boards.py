"""Boards a training step is planned for: the core, its clock, and the SRAM and flash the program may use.

The planner takes a board's SRAM as its budget (`plan --board`, `search --board`), and the C generator its core and
memory regions (`compile --board`: the linker script allows exactly the board's SRAM and flash, so a program that
does not fit fails to link). The default, `generic-m4`, is the paper's budget: 256 KB of SRAM for the workload and
1 MB of flash on a Cortex-M4. The clock only turns measured instruction counts into an estimate of milliseconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from microtrain.errors import MicrotrainError


@dataclass(frozen=True)
class Board:
    name: str
    core: str  # a C generator target: cortex-m4 | cortex-m7
    mhz: int
    sram_bytes: int
    flash_bytes: int
    description: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


KB = 1024
BOARDS: dict[str, Board] = {b.name: b for b in (
    Board("generic-m4", "cortex-m4", 168, 256 * KB, 1024 * KB,
          "the paper's budget on a Cortex-M4: 256 KB SRAM for the workload, 1 MB flash"),
    Board("stm32f746", "cortex-m7", 216, 320 * KB, 1024 * KB,
          "STM32F746 (the paper's board, STM32F746G-DISCO): Cortex-M7 at 216 MHz, 320 KB SRAM, 1 MB flash"),
    Board("nrf52840", "cortex-m4", 64, 256 * KB, 1024 * KB,
          "nRF52840 (e.g. Arduino Nano 33 BLE): Cortex-M4F at 64 MHz, 256 KB SRAM, 1 MB flash"),
    Board("stm32l4r5", "cortex-m4", 120, 640 * KB, 2048 * KB,
          "STM32L4R5 (NUCLEO-L4R5ZI): Cortex-M4F at 120 MHz, 640 KB SRAM, 2 MB flash"),
)}
DEFAULT_BOARD = "generic-m4"


def get_board(name: str) -> Board:
    """The board called `name` (case-insensitive), or a one-line error listing the known ones."""
    b = BOARDS.get(name.lower())
    if b is None:
        raise MicrotrainError(f"unknown board {name!r} (known: {', '.join(BOARDS)})")
    return b


def default_board(core: str) -> Board:
    """The board a device target gets when none is named: generic-m4 for a Cortex-M4, else the first of that core."""
    default = BOARDS[DEFAULT_BOARD]
    return default if default.core == core else next(b for b in BOARDS.values() if b.core == core)
