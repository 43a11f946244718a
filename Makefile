# bertdistill: `make demo` runs the pipeline on one machine; `make test` runs the tests.
# Both start from nothing: they create .venv, install the project and fetch the sample data.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= data
SAMPLE := $(DATA)/sample
PYTEST_ARGS ?=

HOROVOD_VERSION := 0.28.1

.PHONY: install horovod podman base-image sample demo up down images images-gpu chart test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# setuptools leaves the editable build's metadata beside the code, which the editable install puts on
	# sys.path: the airflow.plugins entry point would be found twice ("Plugin 'bertdistill' already registered")
	rm -rf components/bertdistill.egg-info
	$(MAKE) horovod
	touch $@

# Horovod 0.28.1 built against the venv's TensorFlow (about 3 minutes once; pip caches the wheel),
# with Gloo and OpenMPI. Its build needs TensorFlow importable, hence --no-build-isolation.
horovod:
	command -v mpirun >/dev/null || (apt-get update -qq && apt-get install -y -qq libopenmpi-dev openmpi-bin)
	HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_PYTORCH=1 \
		HOROVOD_WITHOUT_MXNET=1 $(BIN)/python -m pip install -q --no-build-isolation horovod==$(HOROVOD_VERSION)

# Podman from Debian's packages (root, like OpenMPI above), run with an engine config of the project's
# own: runc (crun refuses a hybrid cgroup layout), cgroupfs, a file events log, and ulimits the host
# allows (nofile at its hard limit; nproc above 32768 fails setrlimit in some sandboxes).
export CONTAINERS_CONF := $(CURDIR)/.cache/containers/containers.conf
podman: $(CONTAINERS_CONF)

$(CONTAINERS_CONF):
	command -v podman >/dev/null && command -v mmdebstrap >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah mmdebstrap runc >/dev/null)
	mkdir -p $(@D)
	printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=32768:32768"]\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n' \
		"$$(ulimit -Hn)" "$$(ulimit -Hn)" > $@.tmp && mv $@.tmp $@

# A Python 3.11 base image made locally from Debian bookworm, for machines that reach no container
# registry (air-gapped clusters, these tests): `make images PYTHON_IMAGE=$(LOCAL_PYTHON_IMAGE)`.
LOCAL_PYTHON_IMAGE := localhost/bertdistill/python:3.11-bookworm
base-image: podman
	podman image exists $(LOCAL_PYTHON_IMAGE) || \
		(mmdebstrap --quiet --variant=apt --include=python3.11,python3-venv,python3-pip,python-is-python3,ca-certificates \
			bookworm - | podman import --change 'CMD ["python3"]' - $(LOCAL_PYTHON_IMAGE))

sample: $(SAMPLE)/.done

$(SAMPLE)/.done: $(STAMP) components/bertdistill/sample.py
	$(BIN)/python -m bertdistill.sample --output $(SAMPLE) --cache .cache/wheels
	touch $@

# The whole DAG on the embedded default, through Airflow's own test runner: steps as local
# processes, ./data as the store, a sqlite MLflow store in data/mlflow. Sized for a 2-core
# laptop; reruns skip what is done (a dump already distilled stops at the first task).
AIRFLOW_ENV := AIRFLOW_HOME=$(CURDIR)/.airflow AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags \
	AIRFLOW__CORE__LOAD_EXAMPLES=False BERTDISTILL_STORE=$(CURDIR)/$(DATA) \
	BERTDISTILL_MIRROR=$(CURDIR)/$(SAMPLE)/mirror BERTDISTILL_TEACHER=$(CURDIR)/$(SAMPLE)/minilm
# The demo's sizes are the form's `size: demo` preset (orchestration/plan.py, DEMO), also what `make up`
# gives the monthly DAG.
DEMO_CONF ?= {"size": "demo"}

demo: sample
	$(AIRFLOW_ENV) $(BIN)/airflow db migrate >/dev/null
	$(AIRFLOW_ENV) $(BIN)/python -m bertdistill.orchestration.demo_progress --log $(DATA)/demo.log -- \
		$(BIN)/airflow dags test bert_distillation -c '$(DEMO_CONF)'
	@$(AIRFLOW_ENV) $(BIN)/python -m bertdistill.orchestration.summary

# Airflow (api-server, scheduler, dag-processor, triggerer; LocalExecutor) and an MLflow server,
# all on 127.0.0.1; prints the login. Trigger bert_distillation from the UI's form.
up: sample
	$(AIRFLOW_ENV) $(BIN)/python -m bertdistill.orchestration.local_stack up

down:
	$(AIRFLOW_ENV) $(BIN)/python -m bertdistill.orchestration.local_stack down

# Images with docker or podman, whichever exists (`make podman` installs podman): REGISTRY=... to tag
# for a push, PYTHON_IMAGE=... for another base than the official python image, CA_BUNDLE=FILE for a
# TLS-inspecting proxy (a build secret: used by the RUN steps, never stored in an image),
# AIRFLOW_IMAGE=... for another base than the official Airflow image.
REGISTRY ?= bertdistill
VERSION ?= 0.1.0
PYTHON_IMAGE ?=
AIRFLOW_IMAGE ?=
CA_BUNDLE ?=
ENGINE := $(shell command -v podman || command -v docker)
comma := ,
BUILD := $(ENGINE) build $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) \
	$(if $(CA_BUNDLE),--secret id=ca_bundle$(comma)src=$(CA_BUNDLE)) --build-arg HOROVOD_VERSION=$(HOROVOD_VERSION)
images:
	@test -n "$(ENGINE)" || (echo "make images: no docker or podman here (make podman installs podman)"; exit 1)
	$(BUILD) -f containers/pipeline/Dockerfile -t $(REGISTRY)/pipeline:$(VERSION) .
	$(BUILD) -f containers/trainer/Dockerfile --build-arg BASE=$(REGISTRY)/pipeline:$(VERSION) \
		-t $(REGISTRY)/trainer:$(VERSION) .
	$(BUILD) $(if $(AIRFLOW_IMAGE),--build-arg AIRFLOW_IMAGE=$(AIRFLOW_IMAGE)) -f containers/airflow/Dockerfile \
		-t $(REGISTRY)/airflow:$(VERSION) .

# The GPU variants of the pipeline (adapt-teacher, label-teacher) and trainer (distill) images.
images-gpu:
	@test -n "$(ENGINE)" || (echo "make images-gpu: no docker or podman here"; exit 1)
	$(BUILD) -f containers/pipeline/Dockerfile --build-arg VARIANT=gpu -t $(REGISTRY)/pipeline:$(VERSION)-gpu .
	$(BUILD) -f containers/trainer/Dockerfile --build-arg VARIANT=gpu --build-arg BASE=$(REGISTRY)/pipeline:$(VERSION)-gpu \
		-t $(REGISTRY)/trainer:$(VERSION)-gpu .

# Lint and render the chart with Helm's Go SDK (no helm binary needed), and lint the Dockerfiles. Both use
# helm/bertdistill/ci/example-values.yaml: names of the Secrets an operator creates first (docs/pipeline.md,
# "Deploying on a cluster"); tests/k8s/test_chart.py renders the same file. A refusal prints one line, not a traceback.
chart: $(STAMP)
	$(BIN)/python -c "import helm_python as h, json; r = h.lint('helm/bertdistill', \
		h.values_from_yaml(open('helm/bertdistill/ci/example-values.yaml').read())); \
		print(json.dumps(r, indent=1)); assert not r['errors']"
	$(BIN)/python -c "import helm_python as h, re, sys; \
		sys.excepthook = lambda t, e, tb: print('make chart: cannot render:', re.sub(r'^execution error at \(.*?\): ', \
		'', ' '.join(str(e).split())), file=sys.stderr) if issubclass(t, h.HelmError) else sys.__excepthook__(t, e, tb); \
		v = h.values_from_yaml(open('helm/bertdistill/ci/example-values.yaml').read()); \
		print('\n---\n'.join(h.Chart.load('helm/bertdistill').render(v, name='bertdistill', namespace='bertdistill').values()))"
	$(BIN)/hadolint containers/*/Dockerfile

# --durations: the 25 slowest tests close the log, so the next person sees where the 45-minute budget goes.
test: sample
	$(BIN)/python -m pytest --durations=25 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check components dags tests bench containers

bench: sample
	$(BIN)/python bench/make_examples.py
	$(BIN)/python bench/label_teacher.py
	$(BIN)/python bench/train.py

clean:
	rm -rf $(VENV) $(DATA) .airflow .cache .pytest_cache
