"""The readings of the API server's refusals of a job's pod (dsjobs.controller.refusals)."""

from __future__ import annotations

from dsjobs.controller.refusals import refusal_hint, refused_by_type

QUOTA = 'pods "job-1-a1" is forbidden: exceeded quota: q1, requested: pods=1, used: pods=4, limited: pods=4'
PRIORITY = 'pods "job-1-a1" is forbidden: no PriorityClass with name gpu-nodes was found'


def test_a_quota_that_wants_limits_set_is_told_where_they_come_from() -> None:
    runner_only = 'pods "x-a1" is forbidden: failed quota: q: must specify limits.cpu for: ship,stage-in'
    hinted = refusal_hint(runner_only)
    assert hinted.startswith(runner_only + " (the runner's containers take theirs from the operator's")
    assert "DSJOBS_RUNNER_CPU_LIMIT" in hinted and "InstanceType" not in hinted
    both = (
        'pods "x-a1" is forbidden: failed quota: q: must specify limits.cpu for: ship,stage-in; '
        "requests.nvidia.com/gpu for: job"
    )
    assert refusal_hint(both).endswith("; the job's container takes its InstanceType's spec.resources)")
    assert refusal_hint(QUOTA) == QUOTA  # over the quota: nothing to set
    restricted = (
        'pods "x-a1" is forbidden: violates PodSecurity "restricted:latest": runAsNonRoot != true '
        '(pod or container "job" must set securityContext.runAsNonRoot=true)'
    )
    assert refusal_hint(restricted).endswith("pod-security.kubernetes.io/enforce=baseline)")
    assert "set that, or label" in refusal_hint(restricted)
    # Set already: no advice to set it.
    assert "set that" not in refusal_hint(restricted, "restricted")
    limit_range = 'pods "x-a1" is forbidden: minimum cpu usage per Container is 100m, but request is 50m'
    told = refusal_hint(limit_range)
    assert "DSJOBS_RUNNER_CPU_REQUEST" in told and "InstanceType's spec.resources" in told


def test_only_a_refusal_another_type_could_change_falls_back() -> None:
    assert not refused_by_type(QUOTA)  # the project's pod count: every type's pod is one
    both = QUOTA.replace("requested: pods=1,", "requested: pods=1,requests.nvidia.com/gpu=1,")
    assert refused_by_type(both)
    assert refused_by_type(PRIORITY)
    rbac = (
        'pods is forbidden: User "system:serviceaccount:dsjobs-system:dsjobs-operator" cannot create '
        'resource "pods" in API group "" in the namespace "project-a"'
    )
    assert not refused_by_type(rbac)
    assert refused_by_type('pods "x" is forbidden: exceeded quota: gpus, requested: requests.nvidia.com/gpu=1, '
                           "used: requests.nvidia.com/gpu=2, limited: requests.nvidia.com/gpu=2")  # fmt: skip


def test_pod_security_and_the_runner_s_limits_are_no_matter_of_the_type() -> None:
    # Both walked the job through every instance type, each after its schedule timeout, with a
    # FallingBack Event saying the type could not be used.
    restricted = (
        'pods "x-a1" is forbidden: violates PodSecurity "restricted:latest": allowPrivilegeEscalation != '
        'false (container "job" must set securityContext.allowPrivilegeEscalation=false)'
    )
    assert not refused_by_type(restricted)
    runner_only = 'pods "x-a1" is forbidden: failed quota: q: must specify limits.cpu for: ship,stage-in'
    assert not refused_by_type(runner_only)
    # The job container's limits are its InstanceType's: another type may set them.
    assert refused_by_type(runner_only + "; limits.memory for: job")
    assert refused_by_type('pods "x-a1" is forbidden: failed quota: q: must specify limits.cpu for: job')
