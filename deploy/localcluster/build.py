"""Build the local cluster's programs from their Go modules, once, into a versioned cache.

    python -m deploy.localcluster build        # what `make cluster` runs first

The cache is ``~/.cache/finetune-job/k8s-<key>/`` (``LOCAL_CLUSTER_CACHE`` moves its
root), where ``<key>`` changes with every pinned version in ``components.py``. It holds a
throwaway Go module (``src/``: a go.mod that requires every component, replace lines for the
Kubernetes staging modules, and etcd's one-line main), the binaries (``bin/``) and the
build's log. Nothing of it is in the repository. A finished build leaves ``bin/.built``; a
second run returns at once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from deploy.localcluster import components as c

log = logging.getLogger(__name__)

ETCD_MAIN = """\
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
"""
COREDNS_MAIN = """\
package main

import (
	"github.com/coredns/coredns/coremain"
{plugins}
)

func main() {{ coremain.Run() }}
"""
# The mains build.py writes, for the components whose module cannot give one (package "").
WRITTEN_MAINS = {
    "etcd": ETCD_MAIN,
    "coredns": COREDNS_MAIN.format(
        plugins="\n".join(f'\t_ "github.com/coredns/coredns/plugin/{p}"' for p in c.COREDNS_PLUGINS)
    ),
}
# The pod sandbox's pause program, in the k8s.io/kubernetes module (built with gcc).
PAUSE_SOURCE = "build/pause/linux/pause.c"
# What `/version` reports: without these the binaries say v0.0.0 and Helm's kubeVersion fails.
VERSION_PACKAGE = "k8s.io/component-base/version"
# Downloads and compiles of a cold cache take ~15 min on 2 cores; a stuck proxy must not hang.
GO_TIMEOUT_SECONDS = 60 * 60


class BuildError(RuntimeError):
    """A component cannot be built; the message is one line that names what is missing."""


def cache_root() -> Path:
    root = os.environ.get("LOCAL_CLUSTER_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "finetune-job"


def cache_dir() -> Path:
    return cache_root() / f"k8s-{c.cache_key()}"


def binaries(folder: Path | None = None) -> dict[str, Path]:
    """Every component's binary, by name."""
    bin_dir = (folder or cache_dir()) / "bin"
    return {comp.name: bin_dir / comp.name for comp in c.COMPONENTS} | {"pause": bin_dir / "pause"}


def is_built(folder: Path | None = None) -> bool:
    return ((folder or cache_dir()) / "bin" / ".built").exists()


def module_dir(module: str, version: str, folder: Path | None = None) -> Path:
    """Where a downloaded module's files are (for CRDs and configs read at start)."""
    out = _go(["mod", "download", "-json", f"{module}@{version}"], (folder or cache_dir()) / "src")
    return Path(json.loads(out)["Dir"])


def build(folder: Path | None = None) -> dict[str, Path]:
    """Build every component (unless already built) and return the binaries by name."""
    folder = folder or cache_dir()
    if is_built(folder):
        return binaries(folder)
    check_go()
    src = folder / "src"
    for name, main in WRITTEN_MAINS.items():
        (src / "cmd" / name).mkdir(parents=True, exist_ok=True)
        (src / "cmd" / name / "main.go").write_text(main)
    started = time.monotonic()
    log.info("building the local cluster (%s) into %s", _summary(), folder)
    (src / "go.mod").write_text(go_mod(staging_modules(src)))
    shared = [comp for comp in c.COMPONENTS if not comp.standalone]
    _go(["get", *sorted({comp.requirement for comp in shared})], src)
    _go(["get", "-tool", *[f"{p.package}@{p.version}" for p in shared if p.package]], src)
    _go(["mod", "tidy"], src)
    bin_dir = folder / "bin"
    written = [f"./cmd/{name}" for name in WRITTEN_MAINS]
    _go(
        ["build", "-trimpath", "-tags", c.BUILD_TAGS, "-ldflags", ldflags(), "-o", f"{bin_dir}/"]
        + ["tool", *written],
        src,
    )
    for comp in c.COMPONENTS:
        if comp.standalone:
            install = [
                "install",
                "-trimpath",
                "-ldflags",
                "-s -w",
                f"{comp.package}@{comp.version}",
            ]
            _go(install, src, GOBIN=str(bin_dir), GOFLAGS="-buildvcs=false")
    build_pause(src, bin_dir / "pause")
    (folder / "bin" / ".built").write_text(_summary() + "\n")
    log.info("built in %.0f s", time.monotonic() - started)
    return binaries(folder)


def build_pause(src: Path, out: Path) -> None:
    """The pod sandbox's process, compiled from the pause.c of k8s.io/kubernetes (static)."""
    source = module_dir("k8s.io/kubernetes", c.KUBERNETES, src.parent) / PAUSE_SOURCE
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BuildError("gcc is not on PATH: the real node's pause program is built from C")
    version = f"-DVERSION={c.KUBERNETES}-finetune-job"
    done = subprocess.run(
        [gcc, "-Os", "-static", version, "-o", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildError(f"gcc could not build {source}: {last}")


def staging_modules(src: Path) -> list[str]:
    """The k8s.io modules that k8s.io/kubernetes's go.mod lists at v0.0.0 (its staging tree)."""
    out = _go(["mod", "download", "-json", f"k8s.io/kubernetes@{c.KUBERNETES}"], src)
    text = Path(json.loads(out)["GoMod"]).read_text()
    return sorted(set(re.findall(r"^\s+(k8s\.io/\S+) v0\.0\.0$", text, re.MULTILINE)))


def go_mod(staging: list[str]) -> str:
    """The throwaway module: every staging module replaced by the release's own version."""
    version = c.staging_version()
    lines = [f"\t{m} => {m} {version}" for m in staging]
    go = ".".join(map(str, c.GO_MINIMUM))
    return (
        f"module finetune-job.local/cluster\n\ngo {go}.0\n\nreplace (\n"
        + "\n".join(lines)
        + "\n)\n"
    )


def ldflags() -> str:
    major, minor = c.KUBERNETES.removeprefix("v").split(".")[:2]
    stamps = {
        "gitVersion": c.KUBERNETES,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
    }
    return "-s -w " + " ".join(f"-X {VERSION_PACKAGE}.{k}={v}" for k, v in stamps.items())


def check_go() -> None:
    go = shutil.which("go")
    if go is None:
        need = ".".join(map(str, c.GO_MINIMUM))
        raise BuildError(
            f"go is not on PATH: the local cluster is built from Go modules (Go {need} or newer)"
        )
    out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, timeout=60)
    found = re.match(r"go(\d+)\.(\d+)", out.stdout.strip())
    if not found or tuple(map(int, found.groups())) < c.GO_MINIMUM:
        need = ".".join(map(str, c.GO_MINIMUM))
        raise BuildError(
            f"{out.stdout.strip() or 'go'} is too old: the local cluster needs Go {need} or newer"
        )


def _go(args: list[str], cwd: Path, **extra_env: str) -> str:
    """Run one go command; a failure becomes one line naming the module the proxy refused."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod -buildvcs=false", **extra_env}
    with open(cwd.parent / "build.log", "a") as out:
        out.write(f"$ go {' '.join(args)}\n")
        out.flush()
        try:
            done = subprocess.run(
                ["go", *args],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=GO_TIMEOUT_SECONDS,
            )
        except subprocess.TimeoutExpired as e:
            raise BuildError(
                f"go {args[0]} gave no result in {GO_TIMEOUT_SECONDS} s (see {out.name})"
            ) from e
        out.write(done.stderr)
    if done.returncode != 0:  # `go mod download -json` reports on stdout
        output = done.stderr + done.stdout
        raise BuildError(explain(output, f"go {' '.join(args[:2])}", cwd.parent / "build.log"))
    return done.stdout


def explain(stderr: str, what: str, log_file: Path) -> str:
    """One line out of go's error output: the module and version it could not have."""
    refused = re.search(
        r"([\w.~/-]+)@(v[\w.+-]+): (?:reading|verifying) .*?(\d{3} [A-Za-z ]+)", stderr
    )
    if refused:
        module, version, status = refused.groups()
        return (
            f"the Go module proxy does not serve {module}@{version} ({status.strip()}); "
            f"see {log_file}"
        )
    missing = re.search(r"module ([\w.~/-]+): reading .*?(\d{3} [A-Za-z ]+)", stderr)
    if missing:
        module, status = missing.groups()
        return f"the Go module proxy does not serve {module} ({status.strip()}); see {log_file}"
    last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "no output")
    return f"{what} failed: {last.strip()} (see {log_file})"


def _summary() -> str:
    return ", ".join(f"{comp.name} {comp.version}" for comp in c.COMPONENTS)
