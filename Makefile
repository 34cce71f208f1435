# Quick start:  make train   (set up, then train on 8 devices)
#               make test    (set up, then run the tests)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup data tools train test lint bench peers export check-export clean

setup: $(STAMP)

# Rebuild the venv when the dependencies change. Every extra (export, tfds, report,
# test): the tests cover all of it. A user who only trains needs `pip install .`.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || "$$(scripts/find-python.sh)" -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[all]"
	@touch $@

data:
	@scripts/get-data.sh

# shellcheck, for the launch scripts' tests (Debian's package, when root).
tools:
	@scripts/get-tools.sh

train: setup data
	$(BIN)/lenet-dist train --devices 8 $(ARGS)

test: setup data tools lint
	$(BIN)/python -m pytest -q $(ARGS)

# The lint CI runs (pyproject's [tool.ruff]); .pre-commit-config.yaml runs the same.
lint: setup
	$(BIN)/ruff check .

bench: setup data
	$(BIN)/lenet-dist bench --devices 1 --devices 8 $(ARGS)

# lenet-dist against PyTorch (eager, compile), Keras 3 and a plain Flax loop, in one
# alternating run; the peers install into .peers/, outside lenet-dist's venv.
peers: setup data
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
