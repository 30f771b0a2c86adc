# The README's two commands: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Real peers for the tests: a syslog collector (SIEM export), an MQTT broker (MQTT sink), a
# browser (headless Chromium renders `audit report`); nftables, iproute2 and systemd's
# analyzer, procps's sysctl for the appliance's firewall, network-namespace and unit tests.
SYSTEM_PACKAGES := rsyslog rsyslog-openssl mosquitto chromium nftables iproute2 systemd procps

.PHONY: demo test lint bench fuzz sbom clean system-packages

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "dmzbroker needs Python 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/dmzbroker demo

test: lint system-packages
	$(BIN)/python -m pytest

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
	$(BIN)/python bench/audit_verify.py
	$(BIN)/python bench/mqtt_sink.py
	$(BIN)/python bench/sse_fanout.py
	$(BIN)/python bench/opcua_ingest.py
	$(BIN)/python bench/modbus_plan.py
	$(BIN)/python bench/audit_flood.py

# The schemathesis campaign of tests/enterprise/test_openapi.py, longer: a few minutes against
# a live broker over mutual TLS, cases drawn afresh each run (`make test` runs a short, fixed one).
fuzz: $(STAMP)
	DMZBROKER_FUZZ_EXAMPLES=2000 $(BIN)/python -m pytest tests/enterprise/test_openapi.py \
	  -k schemathesis -s --timeout=1800

# A CycloneDX SBOM of what the appliance runs: the installed environment, not the dev tools'
# wishes (cyclonedx-py reads the venv's installed distributions).
sbom: $(STAMP)
	$(BIN)/cyclonedx-py environment --pyproject pyproject.toml --output-reproducible \
	  --of JSON -o dmzbroker.cdx.json $(VENV)
	@echo "wrote dmzbroker.cdx.json"

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache
