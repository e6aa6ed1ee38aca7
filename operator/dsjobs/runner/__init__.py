"""What runs inside a job pod: stage-in (init container), the entry script (job container) and
ship (sidecar). `dsjobs.runner.contract.runner_pod_parts` renders those containers for the
operator; docs/runner.md is the contract."""
