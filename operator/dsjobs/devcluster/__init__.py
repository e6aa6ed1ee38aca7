"""A real local Kubernetes control plane for tests and the demo.

`python -m dsjobs.devcluster up|down|status|restart [--dir .dev]` runs etcd,
kube-apiserver, kube-controller-manager and kube-scheduler (built from source
by hack/k8s-bins.sh), an S3 server, and one process-based node agent
(`dsjobs.devcluster.node`) per node of the topology.
"""

from dsjobs import serverpython  # noqa: F401  (checks the Python at import)
from dsjobs.devcluster.cluster import (
    ClusterError,
    ClusterState,
    down,
    node_agent_available,
    restart,
    status,
    up,
)
from dsjobs.devcluster.paths import ClusterPaths
from dsjobs.devcluster.s3 import S3Config
from dsjobs.devcluster.topology import NodeSpec, default_topology, load_topology

__all__ = [
    "ClusterError",
    "ClusterPaths",
    "ClusterState",
    "NodeSpec",
    "S3Config",
    "default_topology",
    "down",
    "load_topology",
    "node_agent_available",
    "restart",
    "status",
    "up",
]
