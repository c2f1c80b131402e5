# Two commands reach green on a fresh machine: `make test` and `make demo`.
# Both install the pinned stack into .venv first (idempotent; quick when already done).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-e2e demo browser bench constraints clean

install: $(STAMP)

# pyradiomics builds from source and needs numpy, versioneer, wheel and setuptools present
# first (--no-build-isolation); everything else resolves in one pass against constraints.txt,
# so no later install can lift numpy past syft's pin.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "pip==26.3"
	$(BIN)/pip install -q -c constraints.txt numpy versioneer wheel setuptools
	$(BIN)/pip install -q --no-build-isolation -c constraints.txt -e ".[dev]"
	$(BIN)/pip check
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -ra -m "not e2e"

# Whole-flow suites (3-site training, radiomics on real MR, the demo, PostgreSQL): ~30+ min on 2 cores.
test-e2e: install browser
	$(BIN)/python -m pytest -q -ra -m e2e

demo: install
	$(BIN)/python -m demo

# Headless Chromium renders the demo's HTML report in the tests (Debian's package; needs root).
browser:
	test -x /usr/bin/chromium || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

bench: install
	$(BIN)/python -m benchmarks

constraints: install
	$(BIN)/pip freeze --exclude-editable | sort -f > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
