"""Session fixtures of the e2e suite, registered once for every test module here."""

from cluster_fixtures import dev_cluster, dev_s3  # noqa: F401
from stack_fixtures import dsjobs_stack  # noqa: F401
