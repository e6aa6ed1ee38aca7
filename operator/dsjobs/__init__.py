"""dsjobs: DataSphere-style project jobs on Kubernetes."""

__version__ = "0.1.0"
