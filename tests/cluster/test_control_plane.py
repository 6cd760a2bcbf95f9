"""The local cluster itself: the pinned release answers /version, kwok's nodes are Ready,
the operators run, and its processes are the ones it recorded."""

from __future__ import annotations

from typing import Any

from deploy.localcluster import cluster as localcluster
from deploy.localcluster import components, node, objects


def test_the_api_server_reports_the_pinned_release(api: Any) -> None:
    from kubernetes import client as k8s

    version = k8s.VersionApi(api).get_code()
    assert version.git_version == components.KUBERNETES
    assert (version.major, version.minor) == tuple(components.KUBERNETES[1:].split(".")[:2])


def test_every_component_runs_and_the_nodes_are_ready(
    api: Any, local_cluster: localcluster.Cluster
) -> None:
    assert local_cluster.running() == [*localcluster.PROCESSES, *node.PROCESSES]
    assert objects.nodes_ready(api)
    assert node.node_ready(api)  # the real node's kubelet reports Ready
    assert objects.leads(api)  # the MPI Operator holds its leader Lease
