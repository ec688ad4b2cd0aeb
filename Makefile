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
	# DeepSpeed (multi-process training, and its tests) is an sdist that builds against the installed torch.
	$(PY) -m pip install -q -c constraints.txt hjson msgpack ninja py-cpuinfo
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt --no-build-isolation deepspeed
	touch $(STAMP)

demo: install
	$(VENV)/bin/vpt tiny --base qwen2_vl,qwen3_vl --output $(TINY)
	$(PY) -m vpt_plugin.demo --tiny $(TINY)

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf outputs .pytest_cache data/detail
