# Set-up commands: `make demo` (the main job on the offline embedded default) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/autolora demo --out runs/demo

test: install
	$(BIN)/python -m pytest -q

# the suite without the end-to-end runs in real processes (`-m slow`): about a minute, for the edit-test loop
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# Transfer benchmark, protocol v2 (CIFAR-10 5 source -> 5 target classes; about 4 h on 2 CPU cores with the committed
# source weights; rerun = continue): results in bench/results/transfer_cifar10.md, run directories in
# bench/runs/transfer_v2/ (git-ignored). `--protocol v1` is the earlier, smaller protocol.
bench-transfer: install
	OMP_NUM_THREADS=2 $(BIN)/python bench/transfer_cifar10.py

# RoLI's claims on a CPU proxy (transfer v2 splits; robust and standard source backbones): results in
# bench/results/roli_cifar10.md; rerun = continue
bench-roli: install  # two parts of about equal cost side by side, one thread each (bench/roli_cifar10.py PART_A, PART_B)
	export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE; \
	$(BIN)/python bench/roli_cifar10.py --only robust/probe,robust/full,robust/lora,standard/bias & a=$$!; \
	$(BIN)/python bench/roli_cifar10.py --only standard/probe,standard/full,standard/lora,robust/bias & b=$$!; \
	wait $$a; ra=$$?; wait $$b; rb=$$?; test $$ra = 0 && test $$rb = 0
	$(BIN)/python bench/roli_cifar10.py --report-only

.PHONY: install demo test test-fast bench-transfer bench-roli
