# Two commands: `make serve` and `make test`. Both run `make setup` first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
REGISTRY ?= registry
HOST   ?= 127.0.0.1
PORT   ?= 8000
TORCH_VERSION ?= 2.13.0
DEMO_ARGS ?=

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

# Serves at once, on whatever the registry holds (created when missing), while the demo models that
# it lacks train in the background, side by side, one per usable core (`zooserve demo --missing`):
# the server's registry watch loads each one as it is published, mlp-digits first (7 s after the
# start; all 12 in 6 min on 2 idle cores, bench/first_start.py). Later starts train nothing.
# When the server stops (Ctrl-C, SIGTERM to make, or an error) the trainer and its workers stop
# too; an interrupted first start trains only what is still missing next time. DEMO_ARGS adds
# `zooserve demo` flags, e.g. DEMO_ARGS="--jobs 1" or DEMO_ARGS="--only mlp-digits resnet-digits".
serve: setup
	@trap 'stopping=1; kill $$server $$trainer 2>/dev/null' INT TERM HUP; \
	$(VENV)/bin/zooserve demo --registry $(REGISTRY) --missing $(DEMO_ARGS) & trainer=$$!; \
	$(VENV)/bin/zooserve serve --registry $(REGISTRY) --host $(HOST) --port $(PORT) --allow-empty & server=$$!; \
	wait $$server; status=$$?; \
	while kill -0 $$server 2>/dev/null; do wait $$server; status=$$?; done; \
	[ -n "$$stopping" ] || kill $$trainer 2>/dev/null; wait $$trainer; exit $$status

# Two pytest-xdist workers, a test file each at a time (its module fixtures built once): alone, the
# suite kept ~1.15 of 2 cores busy (servers starting, sleeps, locust runs); the session registries
# are built once for both (tests/conftest.py built_once). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25

bench: setup
	$(PY) bench/classify.py

loadtest: setup
	bash loadtest/run.sh

clean:
	rm -rf $(VENV) .pytest_cache
