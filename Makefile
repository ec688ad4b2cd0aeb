# `make install` builds .venv with vpt-plugin and its tested set (constraints.txt); the
# other targets use that venv. Re-running it does nothing unless setup.py or the
# constraints changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TINY := outputs/tiny

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/vpt tiny --output $(TINY)
	$(PY) -m vpt_plugin.demo --tiny $(TINY)

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf outputs .pytest_cache
