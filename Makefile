# Quick start:  make train   (set up the core, then train on 8 devices)
#               make test    (set up every extra, then run the tests)
# The commands are in .venv/bin: `source .venv/bin/activate`, or call
# .venv/bin/lenet-dist, or `make run ARGS="eval --best"`.
VENV   := .venv
BIN    := $(VENV)/bin
CORE   := $(VENV)/.installed-core
ALL    := $(VENV)/.installed-all

.PHONY: setup setup-core data tools train run test lint bench peers export check-export clean

# Two installs into one .venv, each rebuilt when pyproject.toml changes:
#   setup-core  what training needs: `pip install -e .` (no TensorFlow; about 0.7 GB)
#   setup       every extra but the accelerators, `pip install -e ".[all]"` (about
#               2.5 GB): the tests cover all of it, and export, report and lint need it.
setup-core: $(CORE)
setup: $(ALL)

$(CORE): pyproject.toml
	@test -x $(BIN)/python || "$$(scripts/find-python.sh)" -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	@touch $@

# [all] holds the core, so it marks the core installed too.
$(ALL): pyproject.toml
	@test -x $(BIN)/python || "$$(scripts/find-python.sh)" -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[all]"
	@touch $@ $(CORE)

data:
	@scripts/get-data.sh

# shellcheck, for the launch scripts' tests (Debian's package, when root).
tools:
	@scripts/get-tools.sh

train: setup-core data
	$(BIN)/lenet-dist train --devices 8 $(ARGS)
	@echo "lenet-dist is in $(BIN), not on PATH: $(BIN)/lenet-dist eval --best," \
	  "or \`source $(BIN)/activate\` first, or make run ARGS=\"eval --best\""

# Any lenet-dist command on the core install: make run ARGS="checkpoints".
run: setup-core
	$(BIN)/lenet-dist $(ARGS)

# The suite's files spread over TEST_WORKERS processes, a file to a worker (its module
# fixtures are made once), the longest files first (tests/conftest.py): 2, as many as
# the CI machine's cores (with 3, tests that time a process's reaction to a signal or a
# storage outage failed on a busy machine). TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= 2
test: setup data tools lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(ARGS)

# The lint CI runs (pyproject's [tool.ruff]); .pre-commit-config.yaml runs the same.
lint: setup
	$(BIN)/ruff check .

bench: setup-core data
	$(BIN)/lenet-dist bench --devices 1 --devices 8 $(ARGS)

# lenet-dist against PyTorch (eager, compile), Keras 3 and a plain Flax loop, in one
# alternating run; the peers install into .peers/, outside lenet-dist's venv.
peers: setup-core data
	benchmarks/peers/setup.sh
	$(BIN)/python benchmarks/peers/run.py $(ARGS)

# Export runs/lenet's best checkpoint for TF Serving, then check it with TF alone.
SERVING := serving/lenet/1
export: setup
	$(BIN)/lenet-dist export --workdir runs/lenet --best --out $(SERVING) --overwrite $(ARGS)

DATA ?= /usr/share/datasets/fashion-mnist
check-export: setup data
	$(BIN)/python export/check_savedmodel.py $(SERVING) \
	  --images $(DATA)/t10k-images-idx3-ubyte.gz \
	  --labels $(DATA)/t10k-labels-idx1-ubyte.gz --show 3

clean:
	rm -rf $(VENV) runs serving .pytest_cache build dist
