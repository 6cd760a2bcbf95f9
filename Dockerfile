# syntax=docker/dockerfile:1.4
# finetune-job: MXNet 1.9.1 + Horovod 0.28.1 (MXNet, MPI, Gloo; NCCL on GPU) under Open MPI,
# as an MPI Operator launcher or worker. One file, two flavours:
#
#   GPU (default): CUDA 11.7 + cuDNN 8 + NCCL 2 on Ubuntu 22.04, mxnet-cu117
#     docker build -t finetune-job:gpu .
#   CPU: a Debian 12 base (or any base whose apt has python3.11 and Open MPI), plain mxnet
#     docker build -t finetune-job:cpu \
#       --build-arg BASE_IMAGE=debian:bookworm-slim --build-arg BUILDER_IMAGE=debian:bookworm \
#       --build-arg MXNET_PACKAGE=mxnet==1.9.1 --build-arg HOROVOD_GPU_OPERATIONS= .
#
# Python is 3.11 (the package requires it, and numpy 1.23, which MXNet 1.9 needs, stops there),
# hence Ubuntu 22.04 for the GPU flavour and with it CUDA 11.7, the oldest CUDA 11 that NVIDIA
# ships on 22.04; mxnet-cu117 is MXNet 1.9.1 built for it. BASE_IMAGE and BUILDER_IMAGE must be
# the same distribution release (the runtime reuses the builder's venv and its python3.11).
# Only the builder stage has compilers and headers.
#
# Build-time only, never stored in the image:
#   --secret id=ca,src=/path/ca-bundle.crt   CA bundle for pip behind a TLS-inspecting proxy
#   --build-arg PIP_INDEX_URL=... [PIP_EXTRA_INDEX_URL=...]   a PyPI mirror (default: PyPI)
# podman/buildah: add --format docker (for SHELL); see tests/image/test_image.py.

ARG BASE_IMAGE=nvidia/cuda:11.7.1-cudnn8-runtime-ubuntu22.04
ARG BUILDER_IMAGE=nvidia/cuda:11.7.1-cudnn8-devel-ubuntu22.04

# ---------------------------------------------------------------------------------------------
FROM ${BUILDER_IMAGE} AS builder

ARG MXNET_PACKAGE=mxnet-cu117==1.9.1
ARG NUMPY_PACKAGE=numpy==1.23.5
ARG HOROVOD_VERSION=0.28.1
# NCCL for allreduce/allgather/broadcast on GPU tensors; empty for the CPU flavour.
ARG HOROVOD_GPU_OPERATIONS=NCCL
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Versions come with the base image's release (Debian 12 or Ubuntu 22.04 + NVIDIA's repository);
# pinning them here would tie the file to one of the two.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential cmake ca-certificates \
      python3.11 python3.11-dev python3.11-venv \
      openmpi-bin libopenmpi-dev \
 && rm -rf /var/lib/apt/lists/*

# Step 1: MXNet first, into a wheelhouse and the venv: Horovod's build imports mxnet.
# MXNet loads libcuda.so.1, which only the NVIDIA runtime provides on a GPU node; at build time
# the devel image's stub stands in for it (on LD_LIBRARY_PATH of single RUNs only).
# DL3013: MXNET_PACKAGE and NUMPY_PACKAGE are exact pins (name==version), given as build args.
# hadolint ignore=DL3013
RUN --mount=type=secret,id=ca \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && mkdir -p /opt/cuda-stubs /dist \
 && if [ -e /usr/local/cuda/lib64/stubs/libcuda.so ]; then \
      cp /usr/local/cuda/lib64/stubs/libcuda.so /opt/cuda-stubs/libcuda.so.1; fi \
 && python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install "pip==24.2" "wheel==0.44.0" "setuptools==75.1.0" \
 && /opt/venv/bin/pip wheel -w /wheels "${MXNET_PACKAGE}" "${NUMPY_PACKAGE}" \
 && /opt/venv/bin/pip install --no-index --find-links /wheels "${MXNET_PACKAGE}" "${NUMPY_PACKAGE}"

ENV PATH=/opt/venv/bin:$PATH

# Step 2: Horovod from source, without build isolation (it must see mxnet), to a wheel.
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && if [ -n "${HOROVOD_GPU_OPERATIONS}" ]; then \
      export HOROVOD_GPU_OPERATIONS HOROVOD_NCCL_LINK=SHARED HOROVOD_CUDA_HOME=/usr/local/cuda; \
    else unset HOROVOD_GPU_OPERATIONS; fi \
 && LD_LIBRARY_PATH="/opt/cuda-stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    HOROVOD_WITH_MXNET=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 \
    pip wheel --no-build-isolation --no-cache-dir --no-deps -w /wheels "horovod==${HOROVOD_VERSION}"

# Step 3: every other dependency of the job and of its [train] and [deploy] extras (the image
# trains, and its CronJob submits), as pyproject.toml pins them (MXNET_PACKAGE stands in for
# "mxnet"), installed into the venv that the runtime stage copies (Horovod's libraries without
# their debug info: -40 MB).
COPY pyproject.toml /src/
RUN --mount=type=secret,id=ca \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && python -c 'import re, tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; deps = p["dependencies"] + p["optional-dependencies"]["train"] + p["optional-dependencies"]["deploy"]; print("\n".join(dict.fromkeys(d for d in deps if re.split(r"[^A-Za-z0-9_.-]", d)[0].lower() not in ("mxnet", "horovod"))))' \
      > /wheels/requirements.txt \
 && printf '%s\n' "${MXNET_PACKAGE}" "${NUMPY_PACKAGE}" "horovod==${HOROVOD_VERSION}" >> /wheels/requirements.txt \
 && pip wheel --find-links /wheels -w /wheels -r /wheels/requirements.txt \
 && pip install --no-index --find-links /wheels -r /wheels/requirements.txt \
 && find /opt/venv/lib/python3.11/site-packages/horovod -name '*.so' -exec strip --strip-debug {} + \
 && find /opt/venv -name __pycache__ -prune -exec rm -rf {} +

# Step 4: the job's own wheel (its sources change most often, so last). The context holds only
# pyproject.toml, README.md, job/ and deploy/ (see .dockerignore).
COPY . /src/
RUN pip wheel --no-index --no-build-isolation --no-deps -w /dist /src

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG SOURCE=https://github.com/finetune-job/finetune-job
ARG HOROVOD_GPU_OPERATIONS=NCCL
# The port the workers' sshd listens on and the launcher's ssh connects to (non-root: > 1024).
ARG SSH_PORT=2222
ARG DEBIAN_FRONTEND=noninteractive

LABEL org.opencontainers.image.title="finetune-job" \
      org.opencontainers.image.description="Horovod + MXNet fine-tuning of pretrained ResNets, an MPI Operator launcher/worker" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Runtime packages only: no compiler, no headers (libgomp1 and libquadmath0 serve the
# libgfortran that the mxnet wheel bundles). Versions follow the base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3.11 ca-certificates libgomp1 libquadmath0 \
      openmpi-bin openssh-client openssh-server procps tini \
 && rm -rf /var/lib/apt/lists/*

# Non-root MPI user; the MPI Operator mounts its SSH keys at /home/mpiuser/.ssh
# (the chart's sshAuthMountPath). sshd runs as this user: its pid file and config live in the
# home directory, the mounted private key doubles as the host key, and StrictModes is off
# because the mounted files' owner and modes are the kubelet's.
# SC2016: the single quotes keep $1 and $# for the entrypoint script, on purpose.
# hadolint ignore=SC2016
RUN useradd --create-home --uid 1000 --user-group --shell /bin/bash mpiuser \
 && mkdir -p /home/mpiuser/.ssh /home/mpiuser/.sshd /run/sshd \
 && printf '%s\n' \
      "Port ${SSH_PORT}" \
      "PidFile /home/mpiuser/.sshd/sshd.pid" \
      "HostKey /home/mpiuser/.ssh/id_rsa" \
      "AuthorizedKeysFile /home/mpiuser/.ssh/authorized_keys" \
      "StrictModes no" \
      "PubkeyAuthentication yes" \
      "PasswordAuthentication no" \
      "KbdInteractiveAuthentication no" \
      "UsePAM no" \
      "PermitRootLogin no" \
      "AllowUsers mpiuser" \
      "X11Forwarding no" \
      "PrintMotd no" \
      > /home/mpiuser/.sshd_config \
 && printf '%s\n' \
      "Host *" \
      "    Port ${SSH_PORT}" \
      "    StrictHostKeyChecking no" \
      "    UserKnownHostsFile /dev/null" \
      "    LogLevel ERROR" \
      > /etc/ssh/ssh_config.d/finetune-job.conf \
 && chown -R mpiuser:mpiuser /home/mpiuser \
 && printf '%s\n' \
      '#!/bin/sh' \
      '# finetune-job-entrypoint: "worker" (or no argument) runs sshd for the MPI launcher;' \
      '# "launcher CMD..." waits until every host of the MPI hostfile resolves and its sshd' \
      '# answers, then runs CMD (mpirun ... finetune-job train ...); anything else is run as given.' \
      'set -e' \
      'if [ "$1" = launcher ]; then' \
      '  shift' \
      '  if [ "$#" -eq 0 ]; then' \
      '    echo "finetune-job launcher: no command to run after the wait (give the mpirun line)" >&2' \
      '    exit 2' \
      '  fi' \
      '  # Kueue resume and gang schedulers can start the launcher before the workers are Ready' \
      '  # (their DNS names appear only then): wait, bounded, instead of failing in ssh.' \
      '  python -m job.launcher --hostfile "${OMPI_MCA_orte_default_hostfile:-/etc/mpi/hostfile}" \' \
      '    --port "${SSH_PORT:-2222}" --timeout "${LAUNCHER_WAIT_SECONDS:-600}"' \
      '  exec "$@"' \
      'fi' \
      'if [ "$#" -eq 0 ] || [ "$1" = worker ]; then' \
      '  key=/home/mpiuser/.ssh/id_rsa' \
      '  if [ ! -r "$key" ]; then' \
      '    echo "finetune-job worker: no readable SSH key at $key; mount the MPI Operator key Secret at /home/mpiuser/.ssh (sshAuthMountPath)" >&2' \
      '    exit 2' \
      '  fi' \
      '  /usr/sbin/sshd -De -f /home/mpiuser/.sshd_config &' \
      '  sshd=$!' \
      '  # Kubernetes stops a pod with SIGTERM, which reaches only this process: pass it on to' \
      '  # the training processes (started over ssh), let them checkpoint, then stop sshd.' \
      '  stop() {' \
      '    pkill -TERM -f "finetune-job train" || true' \
      '    while pgrep -f "finetune-job train" >/dev/null; do sleep 0.5; done' \
      '    kill -TERM "$sshd" 2>/dev/null || true' \
      '  }' \
      '  trap stop TERM INT' \
      '  wait "$sshd" || wait "$sshd" || true' \
      '  exit 0' \
      'fi' \
      'exec "$@"' \
      > /usr/local/bin/finetune-job-entrypoint \
 && chmod 0755 /usr/local/bin/finetune-job-entrypoint

# OMP_NUM_THREADS: one MXNet/OpenMP thread per rank unless told otherwise (MXNet would take
# half the cores in every rank). Open MPI: yield when idle (busy polling steals compute from
# the ranks), TCP + shared memory only, and no CMA single-copy, which containers forbid.
# CUDA_CACHE_MAXSIZE: room for kernels JIT-compiled from PTX on GPUs newer than the wheel
# (mount a volume at CUDA_CACHE_PATH, default ~/.nv/ComputeCache, to keep them).
ENV PATH=/opt/venv/bin:$PATH \
    SSH_PORT=${SSH_PORT} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_NUM_THREADS=1 \
    OMPI_MCA_mpi_yield_when_idle=1 \
    OMPI_MCA_pml=ob1 \
    OMPI_MCA_btl=^openib \
    OMPI_MCA_btl_vader_single_copy_mechanism=none \
    CUDA_CACHE_MAXSIZE=4294967296

# MXNet, Horovod and the other dependencies: the builder's venv (same paths, same python3.11).
COPY --from=builder /opt/venv /opt/venv
# libcuda.so.1 stub (GPU flavour; a few KB) for the check below, deleted right after it.
COPY --from=builder /opt/cuda-stubs /tmp/cuda-stubs
COPY --from=builder /dist /tmp/dist

# The job itself, then the build fails unless Horovod has MXNet, MPI and Gloo (and NCCL in
# the GPU flavour) and the command starts.
RUN pip install --no-cache-dir --no-index --no-deps /tmp/dist/*.whl \
 && LD_LIBRARY_PATH="/tmp/cuda-stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" horovodrun --check-build \
      | tee /tmp/check-build.txt \
 && for f in MXNet MPI Gloo ${HOROVOD_GPU_OPERATIONS:+NCCL}; do \
      grep -q "\[X\] $f" /tmp/check-build.txt || { echo "horovod lacks $f" >&2; exit 1; }; done \
 && finetune-job --help > /dev/null \
 && rm -rf /tmp/dist /tmp/cuda-stubs /tmp/check-build.txt \
 && find /opt/venv -name __pycache__ -prune -exec rm -rf {} +

# Numeric, so that Kubernetes' runAsNonRoot can verify it (1000 = mpiuser).
USER 1000:1000
WORKDIR /home/mpiuser
EXPOSE ${SSH_PORT}
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/finetune-job-entrypoint"]
CMD ["worker"]
