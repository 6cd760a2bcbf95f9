"""Images for the real node, which has no registry: the pause image made here, and images
imported from podman's store into containerd (its ``k8s.io`` namespace, where the kubelet
looks), once per image ID.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

from deploy.localcluster.processes import ClusterError

PAUSE_IMAGE = "localhost/finetune-job/pause:local"
CRI_NAMESPACE = "k8s.io"
IMPORT_TIMEOUT_SECONDS = 900.0


def load(socket: Path, folder: Path, image: str, env: dict[str, str] | None = None) -> str:
    """Import ``image`` from podman's store into the containerd at ``socket`` (once per image
    ID; ``folder`` keeps the record); the image's ID."""
    inspect = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", image],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    if inspect.returncode != 0:
        raise ClusterError(f"podman has no image {image}: {inspect.stderr.strip()}")
    image_id = inspect.stdout.strip()
    record = folder / "images.json"
    imported = json.loads(record.read_text()) if record.exists() else {}
    if imported.get(image) == image_id:
        return image_id
    archive = folder / "import.tar"
    saved = subprocess.run(
        ["podman", "save", "--format", "docker-archive", "-o", str(archive), image],
        capture_output=True,
        text=True,
        env=env,
        timeout=IMPORT_TIMEOUT_SECONDS,
    )
    if saved.returncode != 0:
        raise ClusterError(f"podman save {image} failed: {saved.stderr.strip()[-300:]}")
    try:
        import_archive(socket, archive, image)
    finally:
        archive.unlink(missing_ok=True)
    record.write_text(json.dumps({**imported, image: image_id}))
    return image_id


def import_archive(socket: Path, archive: Path, what: str) -> None:
    """A docker-archive into containerd, unpacked for the kubelet."""
    done = ctr(socket, "images", "import", "--no-unpack=false", str(archive), check=False)
    if done.returncode != 0:
        raise ClusterError(f"containerd could not import {what}: {done.stderr.strip()[-300:]}")


def pause_archive(pause: Path, folder: Path) -> Path:
    """A docker-archive of one layer holding the pause program, named ``PAUSE_IMAGE``."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tar.gettarinfo(str(pause), arcname="pause")
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mode = 0o755
        with open(pause, "rb") as f:
            tar.addfile(info, f)
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": [PAUSE_IMAGE], "Layers": ["layer.tar"]}]
    ).encode()
    archive = folder / "pause.tar"
    with tarfile.open(archive, "w") as tar:
        members = (("layer.tar", layer_bytes), (config_name, config), ("manifest.json", manifest))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def ctr(socket: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        ["ctr", "--address", str(socket), "--namespace", CRI_NAMESPACE, *args],
        capture_output=True,
        text=True,
        timeout=IMPORT_TIMEOUT_SECONDS,
    )
    if check and done.returncode != 0:
        raise ClusterError(f"ctr {' '.join(args[:2])} failed: {done.stderr.strip()[-300:]}")
    return done
