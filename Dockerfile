# syntax=docker/dockerfile:1.4
# finetune-job: MXNet 1.9.1 + Horovod 0.28.1 (MXNet, MPI, Gloo; NCCL on GPU) under Open MPI,
# as an MPI Operator launcher or worker. One file, two flavours, both on Debian 12 (bookworm):
#
#   GPU (default): mxnet-cu117 with NVIDIA's CUDA 11.8 runtime, cuDNN 8 and NCCL 2 wheels from
#   PyPI; Horovod compiled with NCCL by Debian's CUDA toolkit 11.8 (in the builder stage only)
#     docker build -t finetune-job:gpu .
#   CPU: plain mxnet, no CUDA
#     docker build -t finetune-job:cpu \
#       --build-arg MXNET_PACKAGE=mxnet==1.9.1 --build-arg HOROVOD_GPU_OPERATIONS= .
#
# Python is 3.11 (the package requires it, and numpy 1.23, which MXNet 1.9 needs, stops there):
# Debian 12's. No nvidia/cuda base image is needed: the mxnet-cu117 wheel bundles only libmxnet
# and OpenBLAS, and the CUDA libraries that it and Horovod load come as NVIDIA's -cu11 wheels
# into the venv, whose folders /etc/ld.so.conf.d lists for the loader. libcuda.so.1 belongs to
# the driver: the NVIDIA container toolkit mounts it at run time, and the image has none (the
# toolkit's stub stands in during single build steps). BASE_IMAGE and BUILDER_IMAGE must be the
# same Debian release (the runtime reuses the builder's venv and its python3.11); without Docker
# Hub, pass a local one (tests/image/podman_tools.py debootstraps localhost/debian-base:bookworm).
# Only the builder stage has compilers, headers and the CUDA toolkit.
#
# Build-time only, never stored in the image:
#   --secret id=ca,src=/path/ca-bundle.crt   CA bundle for pip behind a TLS-inspecting proxy
#   --build-arg PIP_INDEX_URL=... [PIP_EXTRA_INDEX_URL=...]   a PyPI mirror (default: PyPI)
# podman/buildah: add --format docker (for SHELL); see tests/image/podman_tools.py.

ARG BASE_IMAGE=debian:bookworm-slim
ARG BUILDER_IMAGE=debian:bookworm

# ---------------------------------------------------------------------------------------------
FROM ${BUILDER_IMAGE} AS builder

# Each ARG is declared right before the steps that use it: a changed value rebuilds only from
# there on (buildah and the classic builder rebuild every RUN after a changed ARG).
# The flavour: NCCL (GPU: the CUDA toolkit here, the CUDA wheels, Horovod's GPU operations
# through NCCL), or empty (CPU).
ARG HOROVOD_GPU_OPERATIONS=NCCL
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Versions come with the base image's Debian release; pinning them here would tie the file to
# one point release. The GPU flavour adds Debian's CUDA toolkit 11.8 (nvcc, headers, static
# cudart, the stub libcuda) from contrib and non-free, enabled in this stage only (both source
# formats: one-line lists, deb822), and gcc-11, since nvcc 11.8 refuses gcc 12 as host compiler.
# Static CUDA libraries that nothing here links go in the same step (the stage is not shipped,
# but its layers stay in the build cache).
# hadolint ignore=DL3008
RUN gpu=() \
 && if [ -n "${HOROVOD_GPU_OPERATIONS}" ]; then \
      gpu=(nvidia-cuda-toolkit gcc-11 g++-11); \
      for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do \
        [ ! -f "$f" ] || sed -i -E 's/^(deb .*) main$/\1 main contrib non-free/' "$f"; done; \
      for f in /etc/apt/sources.list.d/*.sources; do \
        [ ! -f "$f" ] || sed -i -E 's/^Components: main$/Components: main contrib non-free/' "$f"; done; \
    fi \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential cmake ca-certificates \
      python3.11 python3.11-dev python3.11-venv \
      openmpi-bin libopenmpi-dev "${gpu[@]}" \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && find /usr/lib/x86_64-linux-gnu -maxdepth 1 -name 'lib*_static*.a' ! -name libcudart_static.a -delete

ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=
ARG MXNET_PACKAGE=mxnet-cu117==1.9.1
ARG NUMPY_PACKAGE=numpy==1.23.5
# The GPU flavour's CUDA libraries, each pinned: CUDA 11.8's (Debian's nvcc is 11.8; cuSPARSE
# because cuSOLVER links it), cuDNN 8 (mxnet-cu117 links libcudnn.so.8; 9.x ships
# libcudnn.so.9), NCCL 2 (nccl.h, libnccl.so.2).
ARG CUDA_PACKAGES="nvidia-cuda-runtime-cu11==11.8.89 nvidia-cublas-cu11==11.11.3.6 \
  nvidia-cufft-cu11==10.9.0.58 nvidia-curand-cu11==10.3.0.86 nvidia-cusolver-cu11==11.4.1.48 \
  nvidia-cusparse-cu11==11.7.5.86 nvidia-cuda-nvrtc-cu11==11.8.89 nvidia-nvtx-cu11==11.8.86 \
  nvidia-cudnn-cu11==8.9.6.50 nvidia-nccl-cu11==2.21.5"

# Step 1: MXNet first, into a wheelhouse and the venv: Horovod's build imports mxnet.
# GPU flavour: the CUDA wheels go straight into the venv (a wheelhouse copy would double their
# 3 GB); /opt/venv/cuda-libs.conf lists their lib folders, and /etc/ld.so.conf.d links to it
# here and in the runtime stage, so the loader (and ldd) finds them; libnccl.so is the name
# Horovod's FindNCCL looks for. MXNet loads libcuda.so.1, which only the NVIDIA runtime provides
# on a GPU node; at build time the toolkit's stub (Debian: /usr/lib/<arch>/stubs) stands in, on
# LD_LIBRARY_PATH of single RUNs.
# DL3013: MXNET_PACKAGE, NUMPY_PACKAGE and CUDA_PACKAGES are exact pins (name==version).
# hadolint ignore=DL3013
RUN --mount=type=secret,id=ca \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && mkdir -p /opt/cuda-stubs /dist \
 && python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install "pip==24.2" "wheel==0.44.0" "setuptools==75.1.0" \
 && /opt/venv/bin/pip wheel -w /wheels "${MXNET_PACKAGE}" "${NUMPY_PACKAGE}" \
 && /opt/venv/bin/pip install --no-index --find-links /wheels "${MXNET_PACKAGE}" "${NUMPY_PACKAGE}" \
 && if [ -n "${HOROVOD_GPU_OPERATIONS}" ]; then \
      echo "${CUDA_PACKAGES}" | xargs /opt/venv/bin/pip install \
      && nvidia=/opt/venv/lib/python3.11/site-packages/nvidia \
      && ls -d "$nvidia"/*/lib > /opt/venv/cuda-libs.conf \
      && ln -s /opt/venv/cuda-libs.conf /etc/ld.so.conf.d/finetune-job-cuda.conf \
      && ln -s libnccl.so.2 "$nvidia/nccl/lib/libnccl.so" \
      && ldconfig \
      && cp "$(find /usr/lib -path '*/stubs/libcuda.so' -print -quit)" /opt/cuda-stubs/libcuda.so.1; \
    fi

ENV PATH=/opt/venv/bin:$PATH

ARG HOROVOD_VERSION=0.28.1
# The GPUs Horovod's CUDA kernels are compiled for (native code, plus PTX for the last): those
# of the mxnet-cu117 wheel, 5.0 Maxwell, 6.0 P100, 7.0 V100, 8.0 A100, 8.6 A10/A40/RTX 30xx, and
# 9.0 H100/H200 (nvcc >= 11.8), which the wheel lacks. A GPU runs the code of a lower minor
# version of its major one: T4 (7.5) takes 7.0's, L4/L40 (8.9) 8.6's.
ARG HOROVOD_BUILD_CUDA_CC_LIST=50,60,70,80,86,90

# Step 2: Horovod from source, without build isolation (it must see mxnet), to a wheel. GPU:
# NCCL from its wheel, linked shared; nvcc is Debian's /usr/bin/nvcc, its host compiler g++-11;
# CUDAARCHS (CMake's default architectures) follows HOROVOD_BUILD_CUDA_CC_LIST.
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && if [ -n "${HOROVOD_GPU_OPERATIONS}" ]; then \
      nccl=/opt/venv/lib/python3.11/site-packages/nvidia/nccl; \
      archs=$(echo "${HOROVOD_BUILD_CUDA_CC_LIST}" | tr , ";"); \
      export HOROVOD_GPU_OPERATIONS HOROVOD_NCCL_LINK=SHARED HOROVOD_NCCL_HOME="$nccl" \
        HOROVOD_NCCL_INCLUDE="$nccl/include" HOROVOD_NCCL_LIB="$nccl/lib" \
        HOROVOD_CUDA_HOME=/usr CUDAToolkit_ROOT=/usr HOROVOD_BUILD_CUDA_CC_LIST \
        CUDAARCHS="$archs" CC=gcc-11 CXX=g++-11; \
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
 && apt-get clean \
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
# NVIDIA_*: what the NVIDIA container toolkit gives a GPU-flavour container (every GPU the pod
# was allotted, the driver's CUDA and nvidia-smi libraries); empty in the CPU flavour, where it
# then behaves as plain runc.
ENV PATH=/opt/venv/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=${HOROVOD_GPU_OPERATIONS:+all} \
    NVIDIA_DRIVER_CAPABILITIES=${HOROVOD_GPU_OPERATIONS:+compute,utility} \
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

# The job's wheel: copied, not mounted, so that a new wheel rebuilds what follows (a RUN's
# cache key does not cover the files mounted into it; a COPY's covers what it copies).
COPY --from=builder /dist /tmp/dist

# The job itself; GPU flavour: the venv's CUDA libraries listed for the loader. Then the build
# fails unless Horovod has MXNet, MPI and Gloo (and NCCL in the GPU flavour) and the command
# starts. The builder's libcuda.so.1 stub is mounted for this step only.
RUN --mount=type=bind,from=builder,source=/opt/cuda-stubs,target=/tmp/cuda-stubs \
    pip install --no-cache-dir --no-index --no-deps /tmp/dist/*.whl \
 && if [ -f /opt/venv/cuda-libs.conf ]; then \
      ln -s /opt/venv/cuda-libs.conf /etc/ld.so.conf.d/finetune-job-cuda.conf && ldconfig; fi \
 && LD_LIBRARY_PATH="/tmp/cuda-stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" horovodrun --check-build \
      | tee /tmp/check-build.txt \
 && for f in MXNet MPI Gloo ${HOROVOD_GPU_OPERATIONS:+NCCL}; do \
      grep -q "\[X\] $f" /tmp/check-build.txt || { echo "horovod lacks $f" >&2; exit 1; }; done \
 && finetune-job --help > /dev/null \
 && rm -rf /tmp/check-build.txt /tmp/dist \
 && find /opt/venv -name __pycache__ -prune -exec rm -rf {} +

# Numeric, so that Kubernetes' runAsNonRoot can verify it (1000 = mpiuser).
USER 1000:1000
WORKDIR /home/mpiuser
EXPOSE ${SSH_PORT}
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/finetune-job-entrypoint"]
CMD ["worker"]
