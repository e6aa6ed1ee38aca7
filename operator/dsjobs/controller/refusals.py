"""What the API server's refusal of a job's pod means: pure readings of its messages.

Admission plugins say why in text only (ResourceQuota, LimitRanger, PodSecurity, RBAC); these
functions decide whether another instance type could help and what the admin can change.
"""

from __future__ import annotations

import re
from typing import Final

from dsjobs.controller.settings import RUNNER_RESOURCES
from dsjobs.runner.contract import JOB_CONTAINER, SHIP_CONTAINER, STAGE_IN_CONTAINER

# ResourceQuota admission: "must specify limits.cpu for: ship,stage-in; limits.memory for: job".
_MUST_SPECIFY: Final = re.compile(r"([\w./-]+) for: ([\w,.-]+)")


def _named_containers(why: str) -> set[str]:
    """The containers a ResourceQuota's "must specify ... for: a,b" names."""
    return {c for m in _MUST_SPECIFY.finditer(why) for c in m.group(2).split(",")}


def refusal_hint(why: str, pod_security: str = "baseline") -> str:
    """The API server's refusal of a pod, with where the resources a ResourceQuota wants set (or a
    LimitRange bounds) come from: the user cannot change them; the admin can, and should know where.
    `pod_security`: the operator's DSJOBS_JOB_POD_SECURITY."""
    if "violates PodSecurity" in why:
        if pod_security == "restricted":
            return (
                f"{why} (job pods meet the restricted Pod Security Standard (DSJOBS_JOB_POD_SECURITY="
                "restricted): a policy or webhook of the cluster changed the pod, or the job's image "
                "is refused as it is)"
            )
        return (
            f"{why} (job pods meet the baseline Pod Security Standard unless the operator runs with "
            "DSJOBS_JOB_POD_SECURITY=restricted: the job's container runs as its image's user; set "
            "that, or label the project namespace pod-security.kubernetes.io/enforce=baseline)"
        )
    if "per Container" in why:
        # A LimitRange's bounds ("minimum cpu usage per Container is 100m, but request is 50m"):
        # the message names no container.
        named = {STAGE_IN_CONTAINER, SHIP_CONTAINER, JOB_CONTAINER}
    elif "must specify" in why:
        named = _named_containers(why)
    else:
        return why
    hints = []
    if named & {STAGE_IN_CONTAINER, SHIP_CONTAINER}:
        settings = ", ".join(name for pair in RUNNER_RESOURCES for name in pair)
        hints.append(f"the runner's containers take theirs from the operator's settings {settings}")
    if JOB_CONTAINER in named:
        hints.append("the job's container takes its InstanceType's spec.resources")
    return f"{why} ({'; '.join(hints)})" if hints else why


# ResourceQuota admission: "exceeded quota: q1, requested: pods=1, used: pods=4, limited: pods=4".
_EXCEEDED: Final = re.compile(r"exceeded quota: [^,]+, requested: (.*?), used: ")
_POD_COUNTS: Final = frozenset({"pods", "count/pods"})


def refused_by_type(why: str) -> bool:
    """Whether another instance type could change the API server's refusal of a pod: not when a
    quota counts the project's pods (every type's pod is one), the operator may not create pods,
    Pod Security refuses it (it checks nothing a type sets) or a quota wants limits of the runner's
    containers only (the operator's settings give those); else maybe (a quota on GPUs or CPUs, a
    PriorityClass, a LimitRange, an admission policy on the type's node pool)."""
    if "cannot create resource" in why:
        return False  # the operator's RBAC: no pod of any type
    if "violates PodSecurity" in why:
        return False
    if "must specify" in why:
        named = _named_containers(why)
        if named and JOB_CONTAINER not in named:
            return False
    match = _EXCEEDED.search(why)
    if match is None:
        return True
    requested = {part.partition("=")[0].strip() for part in match.group(1).split(",")}
    return not requested <= _POD_COUNTS
