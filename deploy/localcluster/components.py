"""The upstream components of the local cluster, pinned here and nowhere else.

Each is built from its Go module, all but kwok in one throwaway module that ``build.py`` writes
into the cache, so every Kubernetes library is compiled once, at the release of
``KUBERNETES`` (``k8s.io/kubernetes`` lists its staging modules as ``v0.0.0``; each is
replaced by ``v0.<minor>.<patch>``). The operators' own go.mod files ask for nearby releases
of the same libraries (MPI Operator v0.8.0: 0.35.1, Kueue v0.17.0: 0.35.3); Go's minimal
version selection lifts them to ``KUBERNETES``'s patch release.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from job.schema import between_markers

# The minimum Go release that builds every module below (their go.mod files say go 1.25).
GO_MINIMUM = (1, 25)

KUBERNETES = "v1.35.4"
ETCD = "v3.6.5"  # the etcd server release that k8s.io/kubernetes v1.35.4 itself requires
MPI_OPERATOR = "v0.8.0"
KUEUE = "v0.17.0"
# kwok uses client-go APIs that 0.35 removed, so it is built on its own, with the libraries
# its go.mod pins (Kubernetes 0.33); it talks to the API server over HTTP like any client.
KWOK = "v0.7.0"
# Cluster DNS for the real node's pods. Its own go.mod asks for Kubernetes 0.35.4, as above.
COREDNS = "v1.14.7"
# The plugins linked into it: what the node's Corefile (node.py) uses.
COREDNS_PLUGINS = ("bind", "cache", "errors", "kubernetes", "ready")
# The Prometheus that scrapes the real node's pods through kubernetes_sd_configs (Debian's
# 2.42 is built without that discovery). Release 3.9.1; built with only that discovery
# (BUILD_TAGS), since its main links every cloud's otherwise.
PROMETHEUS = "v0.309.1"
BUILD_TAGS = "remove_all_sd,enable_kubernetes_sd"
# Only the CRDs of these (no controller runs): the chart's PodMonitor and PrometheusRule.
PROMETHEUS_OPERATOR = "v0.85.0"


@dataclass(frozen=True)
class Component:
    """One program of the cluster: where its main package lives, at which module version."""

    name: str  # the binary's name in the cache's bin/
    module: str
    version: str
    package: str  # the main package; "" for a main that build.py writes (etcd)
    standalone: bool = False  # built in a module of its own, with its own go.mod's versions

    @property
    def requirement(self) -> str:
        return f"{self.module}@{self.version}"


COMPONENTS = (
    Component(
        "kube-apiserver", "k8s.io/kubernetes", KUBERNETES, "k8s.io/kubernetes/cmd/kube-apiserver"
    ),
    Component(
        "kube-controller-manager",
        "k8s.io/kubernetes",
        KUBERNETES,
        "k8s.io/kubernetes/cmd/kube-controller-manager",
    ),
    Component(
        "kube-scheduler", "k8s.io/kubernetes", KUBERNETES, "k8s.io/kubernetes/cmd/kube-scheduler"
    ),
    Component("kubelet", "k8s.io/kubernetes", KUBERNETES, "k8s.io/kubernetes/cmd/kubelet"),
    # etcd's server module has replace lines of its own, so its cmd cannot be a dependency's
    # main package: build.py writes the one-line main (etcdmain.Main) into the throwaway module.
    Component("etcd", "go.etcd.io/etcd/server/v3", ETCD, ""),
    # CoreDNS's own main links some 50 plugins (cloud DNS providers among them); build.py
    # writes a main that links the few the cluster's Corefile uses.
    Component("coredns", "github.com/coredns/coredns", COREDNS, ""),
    Component(
        "mpi-operator",
        "github.com/kubeflow/mpi-operator",
        MPI_OPERATOR,
        "github.com/kubeflow/mpi-operator/cmd/mpi-operator",
    ),
    Component("kueue", "sigs.k8s.io/kueue", KUEUE, "sigs.k8s.io/kueue/cmd/kueue"),
    Component(
        "prometheus",
        "github.com/prometheus/prometheus",
        PROMETHEUS,
        "github.com/prometheus/prometheus/cmd/prometheus",
    ),
    Component("kwok", "sigs.k8s.io/kwok", KWOK, "sigs.k8s.io/kwok/cmd/kwok", standalone=True),
)


# The CRDs the cluster installs, from the components' own modules: (module, version, glob).
CRD_FILES = (
    ("github.com/kubeflow/mpi-operator", MPI_OPERATOR, "manifests/base/kubeflow.org_mpijobs.yaml"),
    ("sigs.k8s.io/kueue", KUEUE, "config/components/crd/bases/*.yaml"),
    ("sigs.k8s.io/kwok", KWOK, "kustomize/crd/bases/kwok.x-k8s.io_logs.yaml"),
    (
        "github.com/prometheus-operator/prometheus-operator",
        PROMETHEUS_OPERATOR,
        "example/prometheus-operator-crd/monitoring.coreos.com_{podmonitors,prometheusrules}.yaml",
    ),
)


def staging_version(kubernetes: str = KUBERNETES) -> str:
    """The release of k8s.io/api, client-go, ... that goes with a Kubernetes release."""
    return "v0." + kubernetes.removeprefix("v1.")


def cache_key() -> str:
    """12 hex digits that change with any pinned version (the cache folder's name)."""
    pins = [[asdict(c) for c in COMPONENTS], COREDNS_PLUGINS, BUILD_TAGS]
    table = json.dumps(pins, sort_keys=True)
    return hashlib.sha256(table.encode()).hexdigest()[:12]


README_START = "<!-- cluster versions: generated by python -m deploy.localcluster readme -->"
README_END = "<!-- end of cluster versions -->"


def versions_table() -> str:
    """The README's table of what the local cluster runs, from the pins above."""
    rows = ["| component | Go module | version |", "|---|---|---|"]
    rows += [f"| {comp.name} | `{comp.module}` | {comp.version} |" for comp in COMPONENTS]
    rows += [
        f"| CRDs only | `{module}` | {version} |"
        for module, version, _ in CRD_FILES
        if module not in {comp.module for comp in COMPONENTS}
    ]
    return "\n".join(rows)


def render_readme(text: str) -> str:
    """``text`` (the README) with the versions table between its markers made afresh."""
    return between_markers(text, README_START, README_END, versions_table())
