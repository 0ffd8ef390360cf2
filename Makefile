# magi-serve: set-up and the two entry points (see README.md).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
OUT     ?= out
PROMPT  ?= $(shell head -n 1 examples/prompts.txt)
IMAGE   ?= examples/image.jpg
CHUNKS  ?= 4

.PHONY: demo test bench proto clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	# torch first, pinned, so nothing pulls a multi-GB CUDA build on CPU machines
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Main job: a real prompt and image through the local cluster (gRPC -> Ray Serve -> T5/DiT/VAE) to an MP4.
demo: $(STAMP)
	mkdir -p $(OUT)
	$(BIN)/magi generate --prompt "$(PROMPT)" --image $(IMAGE) --chunks $(CHUNKS) -o $(OUT)/demo.mp4

# The test suite (CPU; GPU tests are skipped without a GPU).
test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/e2e.py

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(OUT) .pytest_cache
