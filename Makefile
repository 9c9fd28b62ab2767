# Two commands on a fresh machine: `make serve` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 50051
METRICS_PORT ?= 9090
HTTP_PORT ?= 8080
MODELS ?= models

.PHONY: setup torch serve test protos lint demo-model fashion-model fashion-data bench mar clean

setup: $(STAMP) fashion-data browser

# Fashion-MNIST for the second shipped model and its tests: Debian's package, installed by apt
# when running as root (CI); elsewhere the tests that need it skip and say how to install it.
FASHION_DIR := /usr/share/datasets/fashion-mnist
fashion-data:
	@test -f $(FASHION_DIR)/t10k-images-idx3-ubyte.gz || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			(apt-get install -y -qq dataset-fashion-mnist || \
			 (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
		else echo "Fashion-MNIST is not installed: run 'sudo apt-get install dataset-fashion-mnist'"; fi; }

# Chromium and ChromeDriver for the explorer's browser test: Debian's packages, installed by apt
# when running as root (CI); elsewhere that test skips and says how to install them.
.PHONY: browser
browser:
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			(apt-get install -y -qq chromium chromium-driver || \
			 (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)) >/dev/null; \
		else echo "Chromium is not installed: run 'sudo apt-get install chromium chromium-driver'"; fi; }

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(MAKE) --no-print-directory torch
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# Test reference for Grad-CAM++; --no-deps because it requires torchvision (new torch).
	$(BIN)/python -m pip install --quiet --no-deps grad-cam==1.5.7
	touch $(STAMP)

# torch, pinned, first (so the project's torch==$(TORCH_VERSION) is already met): the CPU build
# from PyTorch's CPU index, as PyPI's torch for Linux is a multi-GB CUDA build. A GPU build:
# make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (TORCH_INDEX_URL= takes the
# default index's build). Where the index cannot be reached (offline from pytorch.org, as in
# CI), the same build is asked for by its local label (torch==$(TORCH_VERSION)+cpu) from pip's
# other sources (find-links, mirrors), which never resolves to another build; without one,
# set-up stops and says so.
TORCH_VERSION := 2.13.0
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
TORCH_BUILD = $(notdir $(TORCH_INDEX_URL))
torch:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if $(BIN)/python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null; then \
		$(BIN)/python -c "import torch; print('torch', torch.__version__, 'is installed')" 2>/dev/null; \
	elif [ -z "$(TORCH_INDEX_URL)" ]; then \
		$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION); \
	elif $(BIN)/python -c "import urllib.request; urllib.request.urlopen('$(TORCH_INDEX_URL)/torch/', timeout=15)" 2>/dev/null; then \
		echo "torch==$(TORCH_VERSION) from $(TORCH_INDEX_URL)"; \
		$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION) --index-url $(TORCH_INDEX_URL); \
	else \
		echo "$(TORCH_INDEX_URL) cannot be reached: looking for torch==$(TORCH_VERSION)+$(TORCH_BUILD) in pip's other sources"; \
		$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)+$(TORCH_BUILD)" || { \
			echo "No torch $(TORCH_VERSION)+$(TORCH_BUILD) wheel found: make $(TORCH_INDEX_URL) reachable, set TORCH_INDEX_URL to a mirror of it, or TORCH_INDEX_URL= for the default index's build (CUDA on Linux, several GB)"; \
			exit 1; }; \
	fi

serve: $(STAMP)
	$(BIN)/saliency serve --ensure-demo --models $(MODELS) --port $(PORT) --metrics-port $(METRICS_PORT) \
		--http-port $(HTTP_PORT)

test: $(STAMP) fashion-data browser
	$(BIN)/python -m pytest -q tests

protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I . \
		--python_out=. --grpc_python_out=. --pyi_out=. \
		saliency_service/proto/explainer.proto
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. \
		saliency_service/proto/open_inference.proto

lint: $(STAMP)
	$(BIN)/ruff check .

# Rebuilds the shipped demo model package deterministically (trains on generated cells).
demo-model: $(STAMP)
	$(BIN)/saliency demo-model --models $(MODELS) --force

# Rebuilds the shipped Fashion-MNIST package deterministically (needs dataset-fashion-mnist).
fashion-model: $(STAMP) fashion-data
	$(BIN)/saliency demo-model --fashion --models $(MODELS) --force

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

# A TorchServe archive of one package (TorchServe is archived upstream; the gRPC server is the
# primary path): make mar MAR_PACKAGE=models/demo/1 → deploy/torchserve/model-store/demo.mar
MAR_PACKAGE ?= $(MODELS)/demo/1
mar: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH deploy/torchserve/archive.sh $(MAR_PACKAGE)

clean:
	rm -rf $(VENV) .pytest_cache
