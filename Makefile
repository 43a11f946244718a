# bertdistill: `make demo` runs the pipeline on one machine; `make test` runs the tests.
# Both start from nothing: they create .venv, install the project and fetch the sample data.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= data
SAMPLE := $(DATA)/sample
RUN := $(DATA)/runs/enwiki-20160101
EXAMPLES := $(RUN)/examples/128-20-10
PYTEST_ARGS ?=

.PHONY: install horovod sample demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(MAKE) horovod
	touch $@

# Horovod 0.28.1 built against the venv's TensorFlow (about 3 minutes once; pip caches the wheel),
# with Gloo and OpenMPI. Its build needs TensorFlow importable, hence --no-build-isolation.
horovod:
	command -v mpirun >/dev/null || (apt-get update -qq && apt-get install -y -qq libopenmpi-dev openmpi-bin)
	HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_PYTORCH=1 \
		HOROVOD_WITHOUT_MXNET=1 $(BIN)/python -m pip install -q --no-build-isolation horovod==0.28.1

sample: $(SAMPLE)/.done

$(SAMPLE)/.done: $(STAMP) components/bertdistill/sample.py
	$(BIN)/python -m bertdistill.sample --output $(SAMPLE) --cache .cache/wheels
	touch $@

# The data half of the pipeline on the sample dump, into ./data (reruns skip finished steps).
demo: sample
	$(BIN)/bertdistill fetch-dump --wiki enwiki --date latest --mirror $(SAMPLE)/mirror --output $(DATA)/dumps
	$(BIN)/bertdistill extract --input $(DATA)/dumps/enwiki/20160101/enwiki-20160101-pages-articles1.xml-p10p30302.bz2 \
		--output $(RUN)/articles
	$(BIN)/bertdistill build-corpus --input $(RUN)/articles --output $(RUN)/text --train-shards 4 --heldout-shards 1
	for shard in $$(cd $(RUN)/text && ls {train,heldout}/shard-*.txt); do \
		$(BIN)/bertdistill make-examples --input $(RUN)/text/$$shard --vocab-file $(SAMPLE)/vocab.txt \
			--output $(EXAMPLES)/$${shard%.txt}.tfrecord || exit 1; \
	done
	@echo; echo "demo: made in $(DATA):"; find $(DATA)/dumps $(RUN) -type f -not -name '.*' | sort | \
		while read -r f; do printf '  %10s  %s\n' "$$(stat -c %s "$$f")" "$$f"; done

test: sample
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check components tests bench

bench: sample
	$(BIN)/python bench/make_examples.py
	$(BIN)/python bench/label_teacher.py
	$(BIN)/python bench/train.py

clean:
	rm -rf $(VENV) $(DATA) .cache .pytest_cache
