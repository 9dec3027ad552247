# Two commands do all the set-up on a fresh machine with Python 3.11 and make:
#   make demo   a balancer, two simulated llama.cpp servers and their agents
#   make test   everything the tests need, then the whole suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit test-newest docs lint compat bench bench-quick soak clean

$(STAMP): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	scripts/system-packages.sh
	$(PY) -m ruff check paddler_sync tests wsgi.py gunicorn.conf.py conf scripts bench docs
	$(PY) -m mypy
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet
	$(PY) -m pytest -n 3 --dist loadfile

# the tests that start no process, open no socket and never sleep (tests/unit/): seconds
test-unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

# the newest releases of urllib3, gevent, gunicorn and redis (past setup.cfg's bounds) against the relay's tests
test-newest:
	scripts/newest_releases.sh

# the documentation site, into build/site (a broken link or a page missing from the nav fails)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# llama.cpp's own server test suites, directly and through the balancer (a few minutes; tests/compat/RESULTS.md)
compat: $(STAMP)
	$(PY) tests/compat/suites.py

bench: $(STAMP)
	bench/setup.sh $(PY)
	$(PY) bench/run.py

bench-quick: $(STAMP)
	bench/setup.sh $(PY)
	$(PY) bench/run.py --quick

soak: $(STAMP)
	$(PY) bench/soak.py --seconds $${SOAK_SECONDS:-600}

lint: $(STAMP)
	$(PY) -m ruff check paddler_sync tests wsgi.py gunicorn.conf.py conf scripts bench docs
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .venv-suites .venv-newest build *.egg-info .pytest_cache .ruff_cache .hypothesis
