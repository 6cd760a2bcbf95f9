"""The local cluster's names and addresses, in one place (the API server, kwok, the node).

Every server of the control plane listens on 127.0.0.1. The real node's pods live on a bridge
of their own with no default route: they reach each other and ``NODE_IP`` (the bridge's own
address, where the kubelet and CoreDNS listen, and host processes for the pods can), nothing
else.
"""

SERVICE_RANGE = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"  # the `kubernetes` Service: the first address of the range
KWOK_POD_RANGE = "10.244.0.1/16"  # kwok's pod IPs: names only, nothing is ever sent to them

NODE_NAME = "local-node"
BRIDGE = "ftj0"
POD_SUBNET = "10.250.0.0/24"
NODE_IP = "10.250.0.1"
CLUSTER_DOMAIN = "cluster.local"
