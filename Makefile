# The README's two commands: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Real peers for the tests: a syslog collector (SIEM export), an MQTT broker (MQTT sink), a
# PostgreSQL server (the historian sink; the tests start their own, as an unprivileged user), a
# browser (headless Chromium renders `audit report`); nftables, iproute2 and systemd's
# analyzer, procps's sysctl for the appliance's firewall, network-namespace and unit tests;
# tcpdump captures the demo's own traffic for `discover pcap` (README).
SYSTEM_PACKAGES := rsyslog rsyslog-openssl mosquitto postgresql-15 chromium nftables iproute2 systemd procps tcpdump

.PHONY: demo test lint bench bench-thingsboard fuzz sbom clean system-packages

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "dmzbroker needs Python 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/dmzbroker demo

# Two workers for most of the suite (its tests mostly wait on sockets and processes), then, alone,
# the tests marked `serial` in tests/conftest.py (machine-wide state, rates under load).
test: lint system-packages
	$(BIN)/python -m pytest -n 2 -m "not serial"
	$(BIN)/python -m pytest -m serial

system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "install these Debian packages first: $$missing"; exit 1; fi; \
	  echo "installing $$missing"; \
	  apt-get update -q >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check broker tests bench
	$(BIN)/ruff format --check broker tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/audit_write.py
	$(BIN)/python bench/audit_verify.py
	$(BIN)/python bench/mqtt_sink.py
	$(BIN)/python bench/postgres_sink.py
	$(BIN)/python bench/sse_fanout.py
	$(BIN)/python bench/opcua_ingest.py
	$(BIN)/python bench/opcua_server.py
	$(BIN)/python bench/dnp3_ingest.py
	$(BIN)/python bench/bacnet_ingest.py
	$(BIN)/python bench/modbus_plan.py
	$(BIN)/python bench/audit_flood.py
	$(BIN)/python bench/diode.py
	$(BIN)/python bench/discover_pcap.py
	$(BIN)/python bench/footprint.py
	$(BIN)/python bench/scale.py --signals 1000 10000
	$(BIN)/python bench/policy_time.py
	$(BIN)/python bench/two_appliances.py
	$(BIN)/python bench/floor.py

# The contrast: the real ThingsBoard IoT Gateway 3.8.5 at the same loads, in a venv of its own
# (bench/.tb-venv, from the package index; never a dependency of dmzbroker, never in `make test`).
bench-thingsboard: $(STAMP)
	$(BIN)/python bench/tb_gateway.py --install --layout ranges
	$(BIN)/python bench/tb_gateway.py
	for n in 1000 10000 100000; do for layout in ranges per-tag; do \
	  $(BIN)/python bench/tb_gateway.py --registers $$n --poll-ms 1000 --layout $$layout \
	    --windows 2 --seconds 30 --json bench/out/tb-sweep.jsonl; done; done

# The schemathesis campaign of tests/enterprise/test_openapi.py, longer: a few minutes against
# a live broker over mutual TLS, cases drawn afresh each run (`make test` runs a short, fixed one).
fuzz: $(STAMP)
	DMZBROKER_FUZZ_EXAMPLES=2000 $(BIN)/python -m pytest tests/enterprise/test_openapi.py \
	  -k schemathesis -s --timeout=1800

# A CycloneDX SBOM of what the appliance runs: dmzbroker installed alone into a fresh venv (no
# dev extra, no pip or setuptools: --without-pip, installed by the dev venv's pip), which
# cyclonedx-py then reads. The dev venv would also list the test and lint tools.
# tests/deployment/test_sbom.py runs this target with its own SBOM_VENV and SBOM_FILE.
SBOM_VENV := build/sbom-venv
SBOM_FILE := dmzbroker.cdx.json
sbom: $(STAMP)
	rm -rf $(SBOM_VENV)
	$(PYTHON) -m venv --without-pip $(SBOM_VENV)
	$(BIN)/pip --python $(SBOM_VENV)/bin/python install --quiet --no-compile \
	  --disable-pip-version-check .
	$(BIN)/cyclonedx-py environment --pyproject pyproject.toml --output-reproducible \
	  --of JSON -o $(SBOM_FILE) $(SBOM_VENV)
	@echo "wrote $(SBOM_FILE)"

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache build $(SBOM_FILE)
