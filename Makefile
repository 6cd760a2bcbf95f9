# finetune-job: the README's commands. Each target does its own set-up.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON      ?= python3.11
VENV        ?= .venv
BIN         := $(VENV)/bin
HOROVOD     := 0.28.1
# Built Horovod wheels are kept here, keyed by version and build flags, so a
# second `make install` (or CI on the same machine) skips the ~2 min compile.
WHEEL_CACHE ?= $(HOME)/.cache/finetune-job/wheels
HOROVOD_FLAGS := HOROVOD_WITH_MXNET=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
                 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1
HOROVOD_KEY := $(shell echo "$(HOROVOD) $(HOROVOD_FLAGS) mxnet-1.9.1 $$($(PYTHON) -c 'import sys;print(sys.version_info[:2])' 2>/dev/null)" | sha256sum | cut -c1-12)
HOROVOD_DIR := $(WHEEL_CACHE)/horovod-$(HOROVOD)-$(HOROVOD_KEY)
APT_PACKAGES := build-essential cmake openmpi-bin libopenmpi-dev
# chromium: headless screenshots of report.html in the tests.
# docker-registry: a local OCI registry the chart package test pushes to and pulls from.
# containerd, runc, containernetworking-plugins: the local cluster's real node (tests/cluster).
TEST_APT_PACKAGES := prometheus prometheus-pushgateway chromium docker-registry \
                     containerd runc containernetworking-plugins

export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMPI_MCA_mpi_yield_when_idle := 1

IMAGE       ?= finetune-job
VERSION     := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
FLAVOUR     ?= gpu

.PHONY: help install apt demo test test-fast lint generate bench image image-test image-gpu-test chart-package clean cluster cluster-build cluster-down

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

apt:  ## install the system packages the job needs (when missing)
	@missing=""; for p in $(APT_PACKAGES) $(EXTRA_APT); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install$$missing"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml Makefile
	$(MAKE) --no-print-directory apt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel
	# step 1: MXNet and numpy first; Horovod's build imports mxnet.
	$(BIN)/pip install -q "mxnet==1.9.1" "numpy==1.23.5" "opencv-python-headless<4.12" wheel
	# step 2: Horovod from source with MXNet, Gloo and MPI, through the wheel cache.
	@if ! ls $(HOROVOD_DIR)/horovod-*.whl >/dev/null 2>&1; then \
	  echo "building horovod $(HOROVOD) (MXNet + Gloo + MPI), about 2 minutes"; \
	  mkdir -p $(HOROVOD_DIR) && \
	  $(HOROVOD_FLAGS) $(BIN)/pip wheel -q --no-build-isolation --no-cache-dir --no-deps \
	    -w $(HOROVOD_DIR) "horovod==$(HOROVOD)"; \
	fi
	# with its own dependencies (psutil, cloudpickle, ...): horovodrun needs them
	$(BIN)/pip install -q $(HOROVOD_DIR)/horovod-*.whl
	# step 3: the job with both layers' extras (training, Kubernetes client) and the tests.
	$(BIN)/pip install -q -e ".[train,deploy,test,cluster]"
	$(BIN)/horovodrun --check-build | tee $(VENV)/horovod-check.txt
	@for f in MXNet MPI Gloo; do grep -q "\[X\] $$f" $(VENV)/horovod-check.txt || \
	  { echo "horovod was built without $$f support; remove $(HOROVOD_DIR) and retry" >&2; exit 1; }; done
	touch $@

install: $(VENV)/.installed  ## apt packages, .venv, MXNet, Horovod (cached wheel), the job with [train,deploy,test,cluster]

demo: install  ## fine-tune on a generated dataset with 2 Horovod workers
	$(BIN)/python -m job.demo

# Tests not marked slow run in 2 processes (one file at a time each, so a file's fixtures are
# set up once); the slow ones (several training processes each) run one at a time after them,
# then the ones against the local cluster (tests/cluster: one cluster for the whole session).
# The GPU image's (gpu_image) are left to `make image-gpu-test`: its build alone would take
# most of CI's 90 minutes.
FAST_TESTS := -m "not slow and not cluster and not gpu_image" -n 2 --dist loadfile

test: install  ## the whole test suite (slow tests included)
	$(MAKE) --no-print-directory apt EXTRA_APT="$(TEST_APT_PACKAGES)"
	$(BIN)/python -m pytest $(FAST_TESTS)
	$(BIN)/python -m pytest -m "slow and not cluster and not gpu_image"
	$(MAKE) --no-print-directory cluster-build
	$(BIN)/python -m pytest -m cluster

test-fast: install  ## the test suite without tests marked slow
	$(MAKE) --no-print-directory apt EXTRA_APT="$(TEST_APT_PACKAGES)"
	$(BIN)/python -m pytest $(FAST_TESTS)

lint: install  ## ruff and mypy
	$(BIN)/ruff check job deploy tests benchmarks charts examples
	$(BIN)/ruff format --check job deploy tests benchmarks charts examples
	$(BIN)/mypy job deploy charts/chartdoc.py

# Every generated file, in order: values.yaml's training block, values.schema.json's and the
# README's key table come from job/config.py; the chart README from values.yaml; the Katib
# example from the chart. tests/test_generated.py fails while any of them is stale.
generate: install  ## regenerate every generated file (after changing job/config.py, values.yaml or the chart)
	$(BIN)/python -m job.schema
	$(BIN)/python charts/chartdoc.py
	$(BIN)/python examples/katib_experiment.py

bench: install  ## the benchmarks behind BENCHMARKS.md (P1 input pipeline, P2-P6 loop, P7 reference loop, P8 prepare)
	$(BIN)/python benchmarks/input_pipeline.py
	$(BIN)/python benchmarks/loop.py all
	$(BIN)/python benchmarks/reference_loop.py
	$(BIN)/python benchmarks/prepare.py

# Both flavours build with podman on a Debian 12 base debootstrapped once (no registry needed),
# in the podman storage the image tests use (~/.cache/finetune-job/podman), so that `make image`
# and the tests share cached layers; tests/image/podman_tools.py prints how to reach the image.
image:  ## build the image with podman: FLAVOUR=gpu (default) or cpu; IMAGE_BUILD_ARGS="--build-arg K=V ..." for more
	$(PYTHON) tests/image/podman_tools.py $(FLAVOUR) --tag localhost/$(IMAGE):$(VERSION)-$(FLAVOUR) $(IMAGE_BUILD_ARGS)

# prometheus-pushgateway: the operator-emulation test runs Debian's binary in a container.
IMAGE_TEST_APT_PACKAGES := prometheus-pushgateway podman buildah runc uidmap fuse-overlayfs debootstrap
image-test: install  ## lint the Dockerfile; build the CPU image on a debootstrapped base and train in it
	$(MAKE) --no-print-directory apt EXTRA_APT="$(IMAGE_TEST_APT_PACKAGES)"
	$(BIN)/python -m pytest tests/image -v -m "not gpu_image"

image-gpu-test: install  ## lint the Dockerfile; build the GPU image (cached layers) and check it without a GPU
	$(MAKE) --no-print-directory apt EXTRA_APT="$(IMAGE_TEST_APT_PACKAGES)"
	$(BIN)/python -m pytest tests/image -v -m "gpu_image or not slow"

HELM ?= helm
chart-package: install  ## check the chart README is current, then `helm package` it into dist/
	$(BIN)/python charts/chartdoc.py --check
	$(HELM) lint --strict charts/finetune-job
	$(HELM) package charts/finetune-job --destination dist

# The local cluster: built once from Go modules into ~/.cache/finetune-job/k8s-<key>/ (versions in
# deploy/localcluster/components.py), state (pids, logs, kubeconfig) in .cluster/.
CLUSTER_STATE ?= .cluster
cluster-build: install  ## build the local cluster's programs from their Go modules (once; cached by version)
	$(BIN)/python -m deploy.localcluster build

# NODE=real adds a node that runs pods: a kubelet with Debian's containerd, runc and CNI plugins.
NODE ?= kwok
NODE_APT_PACKAGES := containerd runc containernetworking-plugins

cluster: install  ## start the local cluster: kube-apiserver, etcd, controllers, MPI Operator, Kueue, 2 kwok nodes; NODE=real: and a kubelet node
	$(if $(filter real,$(NODE)),$(MAKE) --no-print-directory apt EXTRA_APT="$(NODE_APT_PACKAGES)")
	$(BIN)/python -m deploy.localcluster up --state $(CLUSTER_STATE) $(if $(filter real,$(NODE)),--real-node)

cluster-down:  ## stop every process of the local cluster and remove .cluster/
	$(BIN)/python -m deploy.localcluster down --state $(CLUSTER_STATE)

clean:  ## remove the venv and build output (the Horovod wheel cache stays)
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
