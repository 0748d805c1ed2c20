# microtrain: `make demo` installs everything and runs the main job; `make test` installs and runs the tests.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
APT_PACKAGES := gcc make ccache gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm dataset-fashion-mnist

.PHONY: install system-deps python-deps demo test lint

install: system-deps python-deps

# Debian packages: ARM cross toolchain, QEMU (Cortex-M emulation) and Fashion-MNIST. Skipped when present.
system-deps:
	@if dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then echo "system packages present"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(APT_PACKAGES); \
	else sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(APT_PACKAGES); fi

# torch is pinned to the CPU build on this machine's disk; anything newer pulls a multi-GB CUDA build.
python-deps:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,fleet,ray]'

demo: install
	microtrain demo

test: install
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m pytest -n 2 --dist worksteal -q --durations=15

lint:
	$(PYTHON) -m ruff check src tests benchmarks
