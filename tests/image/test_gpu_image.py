"""The GPU image: the Dockerfile's default flavour, built here on a debootstrapped
Debian 12 base and checked without a GPU.

`make image-gpu-test` runs these (marker ``gpu_image``). `make test` and `make image-test`
leave them out: a cold build downloads ~4.6 GB and needs ~14 GB of podman storage.
The fixture `gpu_image` (conftest.py) builds it once per session, with cached layers.

Without a GPU there is no driver, so no libcuda.so.1: MXNet cannot load. Checks that import
it mount the CUDA toolkit's stub libcuda.so.1 from the builder stage and put it on
LD_LIBRARY_PATH, as Horovod's own images do on build machines; on a GPU node the NVIDIA
container toolkit mounts the driver's instead. Fast (no build): the README quotes the budget.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from podman_tools import (
    GPU_BUILDER_TAG,
    ROOT,
    RUN_FLAGS,
    VERSION,
    exec_in,
    image_size,
    run,
    running,
    stale_code,
    start_worker_sshd,
)

# The runtime image's size, uncompressed, as `podman images` reports it (GB = 10^9 bytes); the
# README's image section quotes this number.
SIZE_BUDGET_GB = 5.5
STUB = "LD_LIBRARY_PATH=/opt/cuda-stubs"  # for the commands that load MXNet
SITE = "/opt/venv/lib/python3.11/site-packages"
# The fixtures count in a test's timeout, and the first test waits for a cold build.
TIMEOUT = 4 * 3600


@pytest.fixture(scope="module")
def stubs(podman: dict[str, str], gpu_image: str, tmp_path_factory) -> Path:
    """The builder stage's libcuda.so.1 stub, copied out of its image into a folder to mount."""
    folder = tmp_path_factory.mktemp("cuda-stubs")
    folder.chmod(0o755)
    name = run(["podman", "create", GPU_BUILDER_TAG, "true"], podman).stdout.strip()
    try:
        run(["podman", "cp", f"{name}:/opt/cuda-stubs/libcuda.so.1", str(folder)], podman)
    finally:
        run(["podman", "rm", "-f", name], podman, check=False)
    (folder / "libcuda.so.1").chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def container(podman: dict[str, str], gpu_image: str, stubs: Path) -> Iterator[str]:
    with running(podman, gpu_image, "-v", f"{stubs}:/opt/cuda-stubs:ro") as name:
        yield name


def test_the_image_holds_this_checkouts_code(podman: dict[str, str], container: str) -> None:
    """A cached build must not ship the code of an earlier one."""
    assert stale_code(podman, container) == []


def test_readme_quotes_the_size_budget() -> None:
    assert f"budget of {SIZE_BUDGET_GB:g} GB" in (ROOT / "README.md").read_text()


def test_chart_gpu_scenario_requests_a_gpu_per_slot() -> None:
    """The chart's GPU scenario runs this image with one rank per requested GPU."""
    values = yaml.safe_load((ROOT / "charts/finetune-job/ci/multinode-gpu-values.yaml").read_text())
    gpus = values["workers"]["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == values["slotsPerWorker"] > 1
    assert values["image"]["repository"].endswith("/finetune-job")


@pytest.mark.gpu_image
@pytest.mark.timeout(TIMEOUT)
def test_horovod_kernels_cover_the_gpus_mxnet_runs_on(podman: dict[str, str], gpu_image: str):
    """Horovod's CUDA kernels (in its MXNet extension) have native code for every GPU
    architecture the MXNet wheel has code for, and for sm_90; read with the builder's
    cuobjdump, on the builder's venv, which the runtime stage copies."""
    archs = "cuobjdump --list-elf {} | grep -o 'sm_[0-9]*' | sort -u | tr '\\n' ' '; echo"
    script = "; ".join(
        archs.format(f"{SITE}/{lib}") for lib in ("mxnet/libmxnet.so", "horovod/mxnet/mpi_lib.*.so")
    )
    out = run(["podman", "run", "--rm", *RUN_FLAGS, GPU_BUILDER_TAG, "bash", "-c", script], podman)
    mxnet, horovod = (set(line.split()) for line in out.stdout.splitlines())
    print(f"\nMXNet: {sorted(mxnet)}; Horovod: {sorted(horovod)}")
    assert mxnet and mxnet <= horovod and "sm_90" in horovod


@pytest.mark.gpu_image
@pytest.mark.timeout(TIMEOUT)
def test_size_within_budget(podman: dict[str, str], gpu_image: str) -> None:
    size = image_size(podman, gpu_image)
    print(f"\n{gpu_image}: {size / 1e9:.2f} GB (budget {SIZE_BUDGET_GB:g} GB)")
    assert size <= SIZE_BUDGET_GB * 1e9


@pytest.mark.gpu_image
@pytest.mark.timeout(TIMEOUT)
def test_metadata(podman: dict[str, str], gpu_image: str) -> None:
    config = json.loads(run(["podman", "image", "inspect", gpu_image], podman).stdout)[0]["Config"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert config["User"] == "1000:1000" and config["Cmd"] == ["worker"]
    assert config["Labels"]["org.opencontainers.image.version"] == VERSION


@pytest.mark.gpu_image
@pytest.mark.timeout(TIMEOUT)
def test_check_build_has_nccl(podman: dict[str, str], container: str) -> None:
    check = exec_in(podman, container, f"{STUB} horovodrun --check-build").stdout
    print("\n" + check)
    for feature in ("MXNet", "MPI", "Gloo", "NCCL"):
        assert re.search(rf"\[X\] {feature}\b", check), check


@pytest.mark.gpu_image
@pytest.mark.timeout(TIMEOUT)
def test_mxnet_and_horovod_start_with_the_stub(podman: dict[str, str], container: str) -> None:
    script = (
        "import mxnet as mx, horovod.mxnet as hvd; hvd.init(); "
        "print(mx.__version__, mx.runtime.Features().is_enabled('CUDA'), hvd.size())"
    )
    out = exec_in(podman, container, f'{STUB} python -c "{script}"').stdout.split()
    assert out == ["1.9.1", "True", "1"]


@pytest.mark.gpu_image
@pytest.mark.timeout(TIMEOUT)
def test_shared_libraries_resolve_but_libcuda(podman: dict[str, str], container: str) -> None:
    """Every library that libmxnet and Horovod's MXNet extension load is in the image (the
    CUDA ones through /etc/ld.so.conf.d), except the driver's libcuda.so.1, which the image
    must not have: the NVIDIA container toolkit mounts the node's."""
    libs = exec_in(podman, container, f"ls {SITE}/mxnet/libmxnet.so {SITE}/horovod/mxnet/*.so")
    for lib in libs.stdout.split():
        ldd = exec_in(podman, container, f"ldd {lib}").stdout
        missing = re.findall(r"^\s*(\S+) => not found", ldd, re.M)
        assert missing == ["libcuda.so.1"], f"{lib}:\n{ldd}"
    # as root: mpiuser cannot read every folder
    find = ["find", "/", "-xdev", "-name", "libcuda.so*", "!", "-path", "/opt/cuda-stubs/*"]
    found = run(["podman", "exec", "--user", "0", container, *find], podman)
    assert found.stdout.strip() == ""


@pytest.mark.gpu_image
@pytest.mark.timeout(TIMEOUT)
def test_version_and_no_compilers(podman: dict[str, str], container: str) -> None:
    assert exec_in(podman, container, "finetune-job --version").stdout.split() == [
        "finetune-job",
        VERSION,
    ]
    probe = exec_in(
        podman, container, "for t in gcc cc g++ c++ make cmake nvcc; do command -v $t; done; true"
    )
    assert probe.stdout.strip() == ""


@pytest.mark.gpu_image
@pytest.mark.timeout(TIMEOUT)
def test_worker_runs_sshd_as_mpiuser(podman: dict[str, str], container: str) -> None:
    ssh = start_worker_sshd(podman, container)
    assert ssh.returncode == 0 and ssh.stdout.strip() == "mpiuser", ssh.stderr
    sshd = exec_in(podman, container, "ps -o user=,args= -C sshd").stdout
    assert sshd.split()[0] == "mpiuser" and "/home/mpiuser/.sshd_config" in sshd, sshd
