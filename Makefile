# Two commands: `make serve` and `make test`. Both run `make setup` first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
REGISTRY ?= registry
HOST   ?= 127.0.0.1
PORT   ?= 8000
TORCH_VERSION ?= 2.13.0

.PHONY: setup serve test demo bench loadtest clean

# Creates .venv when missing; installs torch (the pinned CPU build where no torch is present,
# a user's own torch is kept), then the project with the ONNX Runtime extra that fits the machine.
# The stamp makes a second run instant until pyproject.toml changes.
setup: $(VENV)/.setup-stamp

$(VENV)/.setup-stamp: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "setup: GPU seen, installing the gpu extra (onnxruntime-gpu)"; \
		$(PY) -m pip uninstall -q -y onnxruntime 2>/dev/null || true; \
		$(PY) -m pip install -q -e ".[gpu,dev]"; \
	else \
		echo "setup: no GPU, installing the cpu extra (onnxruntime)"; \
		$(PY) -m pip uninstall -q -y onnxruntime-gpu 2>/dev/null || true; \
		$(PY) -m pip install -q -e ".[cpu,dev]"; \
	fi
	@touch $@

demo: setup
	$(VENV)/bin/zooserve demo --registry $(REGISTRY)

# Trains and publishes the demo models on the first start; later starts reuse the registry.
serve: setup
	@if [ -z "$$(ls -A $(REGISTRY) 2>/dev/null)" ]; then $(VENV)/bin/zooserve demo --registry $(REGISTRY); fi
	$(VENV)/bin/zooserve serve --registry $(REGISTRY) --host $(HOST) --port $(PORT)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/classify.py

loadtest: setup
	bash loadtest/run.sh

clean:
	rm -rf $(VENV) .pytest_cache
