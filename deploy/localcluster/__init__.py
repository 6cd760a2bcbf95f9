"""A local Kubernetes cluster for trying the chart and testing against real controllers.

kube-apiserver, etcd, kube-controller-manager and kube-scheduler, the MPI Operator and Kueue,
built from their Go modules at the versions in ``components.py``, on 127.0.0.1, with nodes
that kwok plays (pods run no containers). ``make cluster`` / ``make cluster-down``, or
``python -m deploy.localcluster {build,up,down,status}``.
"""
