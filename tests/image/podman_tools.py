"""Podman on this machine, for the image tests and `make image`: tools installed with apt when
missing, storage and configuration under ~/.cache/finetune-job/podman (CONTAINERS_CONF and
CONTAINERS_STORAGE_CONF point there, so nothing in /etc changes), a debootstrapped Debian 12
base image, either flavour built on it with cached layers, and containers to run checks in.

    python tests/image/podman_tools.py gpu|cpu [--tag TAG] [--build-arg KEY=VALUE ...]

builds a flavour as `make image` does and prints how to reach the image with podman.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
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

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "finetune-job" / "podman"
BASE_IMAGE = "localhost/debian-base:bookworm"
IMAGE = "localhost/finetune-job:cpu-test"
BUILDER_TAG = "localhost/finetune-job:cpu-test-builder"
GPU_IMAGE = "localhost/finetune-job:gpu-test"
GPU_BUILDER_TAG = "localhost/finetune-job:gpu-test-builder"
VERSION = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
# The GPU flavour is the Dockerfile's default: only the base images change (no Docker Hub here).
GPU_BUILD_ARGS = {"BASE_IMAGE": BASE_IMAGE, "BUILDER_IMAGE": BASE_IMAGE, "VERSION": VERSION}
CPU_BUILD_ARGS = {
    **GPU_BUILD_ARGS,
    "MXNET_PACKAGE": "mxnet==1.9.1",
    "HOROVOD_GPU_OPERATIONS": "",
}
# flavour: (build arguments, image tag, builder-stage tag, seconds a build may take)
FLAVOURS = {
    "cpu": (CPU_BUILD_ARGS, IMAGE, BUILDER_TAG, 2400),
    # a cold GPU build downloads ~4 GB (Debian's CUDA toolkit, the CUDA wheels) and compiles
    "gpu": (GPU_BUILD_ARGS, GPU_IMAGE, GPU_BUILDER_TAG, 3 * 3600),
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


def run(
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


def ensure_tools() -> str | None:
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


def overlay_works(where: Path) -> bool:
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


def podman_env() -> dict[str, str]:
    CACHE.mkdir(parents=True, exist_ok=True)
    driver = "overlay" if overlay_works(CACHE) else "vfs"
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


def apt_sources() -> list[tuple[str, str]]:
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


def debian_mirror() -> tuple[str, str]:
    sources = apt_sources()
    main = next((u for u, s in sources if s == "bookworm"), "http://deb.debian.org/debian")
    security = next(
        (u for u, s in sources if s == "bookworm-security"), "http://deb.debian.org/debian-security"
    )
    return main, security


def ensure_base_image(env: dict[str, str]) -> None:
    if run(["podman", "image", "exists", BASE_IMAGE], env, check=False).returncode == 0:
        return
    mirror, security = debian_mirror()
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror], timeout=900)
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


def pip_settings() -> tuple[dict[str, str], str | None]:
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


def build(
    env: dict[str, str],
    build_args: dict[str, str],
    tag: str,
    target: str | None = None,
    timeout: float = 2400,
) -> float:
    pip_args, cert = pip_settings()
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
    run([*cmd, str(ROOT)], env, timeout=timeout)
    return time.monotonic() - start


def build_flavour(
    env: dict[str, str], flavour: str, tag: str | None = None, extra: dict[str, str] | None = None
) -> str:
    """One flavour as its test tag, or ``tag`` (cached layers; the builder stage keeps a tag of
    its own, so that pruning untagged leftovers of earlier builds keeps its cache: the Horovod
    compile, and for the GPU flavour the CUDA toolkit)."""
    build_args, image, builder_tag, timeout = FLAVOURS[flavour]
    build_args = {**build_args, **(extra or {})}
    image = tag or image
    seconds = build(env, build_args, builder_tag, target="builder", timeout=timeout)
    seconds += build(env, build_args, image, timeout=timeout)
    run(["podman", "image", "prune", "-f"], env, check=False)
    print(f"\nbuilt {image} in {seconds:.0f} s; size {image_size(env, image) / 1e9:.2f} GB")
    return image


def build_cpu_image(env: dict[str, str]) -> str:
    return build_flavour(env, "cpu")


def image_size(env: dict[str, str], image: str) -> int:
    """Bytes of the image's layers, uncompressed, as `podman images` counts them."""
    return int(run(["podman", "image", "inspect", "--format", "{{.Size}}", image], env).stdout)


@contextlib.contextmanager
def running(env: dict[str, str], image: str, *podman_args: str) -> Iterator[str]:
    """One long-lived container of ``image`` (as the image's user) to `podman exec` checks in."""
    name = f"finetune-job-test-{uuid.uuid4().hex[:8]}"
    cmd = ["podman", "run", "-d", "--rm", "--name", name, *RUN_FLAGS, *podman_args]
    run([*cmd, image, "sleep", "infinity"], env)
    try:
        yield name
    finally:
        run(["podman", "rm", "-f", "-t", "0", name], env, check=False)


def exec_in(
    env: dict[str, str], container: str, script: str, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
    return run(
        ["podman", "exec", container, "bash", "-c", script], env, timeout=timeout, check=check
    )


def code_digests(root: Path) -> dict[str, str]:
    """sha256 of every .py file of the job's packages under ``root`` (a checkout, or
    site-packages), by path relative to it."""
    import hashlib

    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for package in ("job", "deploy")
        for path in sorted((root / package).rglob("*.py"))
    }


def stale_code(env: dict[str, str], container: str) -> list[str]:
    """The job's source files whose copy in the image differs from this checkout (or is
    missing there): empty when the image holds this checkout's code."""
    site = run(
        ["podman", "exec", container, "python", "-c",
         "import job, pathlib; print(pathlib.Path(job.__file__).parent.parent)"],
        env,
    ).stdout.strip()  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="finetune-image-code-") as tmp:
        for package in ("job", "deploy"):
            run(["podman", "cp", f"{container}:{site}/{package}", f"{tmp}/{package}"], env)
        inside = code_digests(Path(tmp))
    ours = code_digests(ROOT)
    return sorted(name for name, digest in ours.items() if inside.get(name) != digest)


def start_worker_sshd(env: dict[str, str], container: str) -> subprocess.CompletedProcess:
    """The entrypoint in worker mode, with a fresh key standing in for the MPI Operator's Secret
    at ~/.ssh; returns `ssh 127.0.0.2 id -un` once sshd answers (or after 20 s). 127.0.0.2 is
    the container's own loopback but not one of its interface addresses, so Open MPI treats it
    as a separate worker host that it reaches through this sshd (port 2222 from ssh_config)."""
    exec_in(
        env,
        container,
        "ssh-keygen -q -t ecdsa -N '' -f ~/.ssh/id_rsa && "
        "cp ~/.ssh/id_rsa.pub ~/.ssh/authorized_keys",
    )
    run(
        ["podman", "exec", "-d", container, "/usr/local/bin/finetune-job-entrypoint", "worker"], env
    )
    deadline = time.monotonic() + 20
    while True:
        ssh = exec_in(env, container, "ssh -o BatchMode=yes 127.0.0.2 'id -un'", check=False)
        if ssh.returncode == 0 or time.monotonic() > deadline:
            return ssh
        time.sleep(0.5)


def podman_ready() -> dict[str, str]:
    """podman's environment with the base image made, or a skip naming what is missing."""
    import pytest

    reason = ensure_tools()
    if reason:
        pytest.skip(reason)
    env = podman_env()
    ensure_base_image(env)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description="Build a flavour of the Dockerfile with podman.")
    parser.add_argument("flavour", choices=sorted(FLAVOURS))
    parser.add_argument("--tag", help="the image's tag (default: the flavour's test tag)")
    parser.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    reason = ensure_tools()
    if reason:
        sys.exit(f"podman_tools: {reason}")
    env = podman_env()
    ensure_base_image(env)
    extra = dict(arg.split("=", 1) for arg in args.build_arg)
    image = build_flavour(env, args.flavour, args.tag, extra)
    print(
        f"podman sees it with: CONTAINERS_STORAGE_CONF={env['CONTAINERS_STORAGE_CONF']} "
        f"CONTAINERS_CONF={env['CONTAINERS_CONF']} podman image inspect {image}"
    )


if __name__ == "__main__":
    main()
