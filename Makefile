# Lipari: `make run` sets up and runs the system, `make test` sets up and runs the tests.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp
# mosquitto: the broker; socat: virtual boards on a pty; chromium: the dashboard's browser
# test; postgresql: the PostgreSQL store's test server; openssl: TLS test certificates;
# gcc-multilib: the 32-bit MicroPython build the RAM tests and figures run on.
APT_PACKAGES := mosquitto mosquitto-clients socat chromium chromium-driver postgresql openssl gcc-multilib
SPEED ?= 60
NODE_STAMP := node_modules/.stamp

.PHONY: setup apt fw32 run meter test bench mpy deploy firmware romfs clean

$(STAMP): requirements.txt pyproject.toml
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "Lipari needs Python 3.11 or newer (found $$($(PY) --version))"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	@touch $(STAMP)

# System packages: installed when we are root, otherwise we say what is missing.
apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "Missing Debian packages:$$missing"; echo "Install them with: sudo apt-get install$$missing"; fi; \
	fi

# The dashboard's chart library comes from the npm registry (package-lock.json pins it).
$(NODE_STAMP): package.json package-lock.json
	@if command -v npm >/dev/null; then npm ci --no-audit --no-fund --loglevel=error && touch $(NODE_STAMP); \
	else echo "npm is missing: the dashboard will show no charts (install nodejs + npm)"; fi

setup: $(STAMP) apt $(NODE_STAMP) fw32

# The 32-bit (i386) unix MicroPython with the firmware frozen in through a MicroPython
# manifest, as a board's image is built (tools/mpbuild.py, docs/ram.md): from MPY_DIR if
# set, else ../shared/vendor/micropython.tar.xz, else a clone of the pinned tag. Cached by
# a hash of its inputs: rebuilt only when the firmware or MicroPython changes. Without it
# `make run` still works; the RAM tests and figures fail, saying what is missing.
MPY_DIR ?=
MPY_DIR_ARG = $(if $(MPY_DIR),--mpy-dir $(MPY_DIR))
fw32: $(STAMP) apt
	@$(BIN)/python tools/mpbuild.py unix $(MPY_DIR_ARG) >/dev/null || \
	  echo "make setup: no 32-bit MicroPython (see above): the RAM tests (tests/test_fw*) and make bench's fw_* figures need it"

# Broker + head-end + five virtual meters; the dashboard is at http://127.0.0.1:8000.
run: setup
	$(BIN)/lipari system --speed $(SPEED)

# One virtual meter on the console: make meter BOARD=unix_sim_1ph PROFILE=pv SPEED=600
BOARD ?= unix_sim_3ph
PROFILE ?= household
meter: setup
	$(BIN)/lipari meter --board $(BOARD) --profile $(PROFILE) --speed $(SPEED)

# Two processes (pytest-xdist, a file per process at a time): most tests wait on simulated
# time, brokers and subprocesses, so two run side by side in about the time of one.
TEST_JOBS ?= 2
test: setup
	$(BIN)/pytest -n $(TEST_JOBS) --dist loadfile

# JOBS=2: the long count-based simulations in a second process at the same time
# (bench/run.py --jobs; rates measured beside them are lower than alone).
JOBS ?= 1
bench: setup
	$(BIN)/python bench/run.py --jobs $(JOBS)

# Every firmware file through mpy-cross into build/mpy (what `deploy` copies).
mpy: setup
	$(BIN)/lipari deploy --compile-only

# Flash a real board: make deploy PORT=/dev/ttyUSB0 BOARD=esp32s3_stpm34_33_ct
# A board with a ROMFS partition big enough gets the firmware as one ROMFS image (code run
# in place from flash); any other board gets the compiled files on its filesystem.
deploy: mpy
	@test -n "$(PORT)" || { echo "usage: make deploy PORT=/dev/ttyACM0 BOARD=<name in boards/>"; exit 2; }
	$(BIN)/lipari deploy --port $(PORT) --board $(BOARD) $(MPY_DIR_ARG)

# A board's flashable MicroPython image with the firmware frozen in, built by the port's
# own build (stm32 PYBV11, rp2 RP2_PICO, esp32 ESP32_GENERIC_S3): needs a full MicroPython
# checkout and the port's toolchain.  make firmware BOARD=stm32_stpm34_33_ct MPY_DIR=~/micropython
firmware: $(STAMP)
	@test "$(origin BOARD)" = "command line" -o "$(origin BOARD)" = "environment" || \
	  { echo "usage: make firmware BOARD=<stm32_stpm34_33_ct|pico_stpm32_shunt|esp32s3_stpm34_33_ct> MPY_DIR=<micropython checkout>"; exit 2; }
	$(BIN)/python tools/mpbuild.py firmware --board $(BOARD) $(MPY_DIR_ARG)

# The firmware as a ROMFS image (mpremote romfs build): build/romfs/<BOARD>.romfs
romfs: $(STAMP)
	$(BIN)/python tools/mpbuild.py romfs --board $(BOARD) $(MPY_DIR_ARG)

clean:
	rm -rf build bench/out .pytest_cache var
