"""The int8 update's floor-and-clamp: the Cortex-M4 path (four VCVTR conversions under round-towards-minus-infinity,
mt_floor_clamp8_4) and the portable one (mt_floor_clamp8, the host twin's) against an independent reference,
clamp8(floor(r)) with NaN -> 0 through the C library's floorf, on ~1M float bit patterns (every exponent and sign) and
the edges (tests/c/floor_clamp_check.c). Both builds must print zero mismatches."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from microtrain.codegen.project import CORES, runtime_dir

CHECK = Path(__file__).parent / "c" / "floor_clamp_check.c"


def _tree(tmp: Path) -> Path:
    rt = runtime_dir()
    for f in ("mt_runtime.h", "mt_io.h", "mt_io_semihost.c", "mt_io_host.c", "mt_startup_m4.c", "mt_m4.ld"):
        shutil.copyfile(rt / f, tmp / f)
    (tmp / "mt_config.h").write_text("#ifndef MT_CONFIG_H\n#define MT_CONFIG_H\n#define MT_ROW_MAX 32\n#endif\n")
    shutil.copyfile(CHECK, tmp / CHECK.name)
    return tmp


def _verdict(out: str) -> int:
    line = next(ln for ln in out.splitlines() if ln.startswith("checked "))
    checked, bad = int(line.split()[1]), int(line.split()[3])
    assert checked > 1_000_000, line
    return bad


@pytest.mark.skipif(not (shutil.which("arm-none-eabi-gcc") and shutil.which("qemu-system-arm")),
                    reason="needs arm-none-eabi-gcc and qemu-system-arm")
@pytest.mark.parametrize("core", sorted(CORES))
def test_device_floor_clamp_matches_floor(core, tmp_path):
    d = _tree(tmp_path)
    flags, machine = CORES[core]
    subprocess.run(["arm-none-eabi-gcc", "-std=c99", "-O3", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off",
                    *flags.split(), "--specs=rdimon.specs", "-nostartfiles", "-T", "mt_m4.ld", "-Wl,--gc-sections",
                    "-o", "check.elf", CHECK.name, "mt_io_semihost.c", "mt_startup_m4.c", "-lm"],
                   cwd=d, check=True, capture_output=True)
    r = subprocess.run(["qemu-system-arm", "-M", machine, "-nographic", "-semihosting", "-kernel", "check.elf",
                        "-append", "check"], cwd=d, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=300)
    assert _verdict(r.stdout) == 0, r.stdout[-2000:]
    assert r.returncode == 0


@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc")
def test_host_floor_clamp_matches_floor(tmp_path):
    d = _tree(tmp_path)
    subprocess.run(["gcc", "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off", "-o", "check",
                    CHECK.name, "mt_io_host.c", "-lm"], cwd=d, check=True, capture_output=True)
    r = subprocess.run([str(d / "check")], cwd=d, capture_output=True, text=True, timeout=300)
    assert _verdict(r.stdout) == 0, r.stdout[-2000:]
