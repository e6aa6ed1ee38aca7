"""Where a dev cluster keeps its files under its directory (default `.dev`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ClusterPaths:
    """Every file and directory of one dev cluster.

    Everything that `down` deletes lives under `cluster/` and `nodes/`; the
    user-facing outputs (kubeconfig, S3 settings) sit directly in `root`.
    """

    root: Path

    @classmethod
    def at(cls, root: Path | str) -> ClusterPaths:
        return cls(Path(root).absolute())

    # user-facing outputs
    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def s3_env(self) -> Path:
        return self.root / "s3.env"

    @property
    def s3_json(self) -> Path:
        return self.root / "s3.json"

    @property
    def s3_scoped_keys(self) -> Path:
        """Key pairs the S3 server accepts for one prefix only (re-read when it changes)."""
        return self.root / "s3-scoped-keys.json"

    @property
    def last_logs(self) -> Path:
        """Logs of the last cluster, kept by `down` for post-mortems."""
        return self.root / "last-logs"

    # data
    @property
    def cluster(self) -> Path:
        return self.root / "cluster"

    @property
    def stack_ports(self) -> Path:
        """The loopback ports `make up` gave this cluster's dsjobs processes (gone with the cluster)."""
        return self.cluster / "stack-ports.json"

    @property
    def pids(self) -> Path:
        return self.cluster / "pids.json"

    @property
    def logs(self) -> Path:
        return self.cluster / "logs"

    @property
    def pki(self) -> Path:
        return self.cluster / "pki"

    @property
    def kubeconfigs(self) -> Path:
        return self.cluster / "kubeconfigs"

    @property
    def etcd_data(self) -> Path:
        return self.cluster / "etcd"

    @property
    def s3_data(self) -> Path:
        return self.cluster / "s3"

    @property
    def token_file(self) -> Path:
        return self.pki / "tokens.csv"

    @property
    def nodes(self) -> Path:
        return self.root / "nodes"

    def node_state(self, node: str) -> Path:
        return self.nodes / node

    def node_kubeconfig(self, node: str) -> Path:
        return self.kubeconfigs / f"node-{node}.kubeconfig"

    def component_kubeconfig(self, component: str) -> Path:
        return self.kubeconfigs / f"{component}.kubeconfig"

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"
