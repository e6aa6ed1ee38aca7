"""Rules of an InstanceType (the catalog entry a job's pod is built from)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from pydantic import ValidationError

from dsjobs.models import limits as L
from dsjobs.models.instancetype import InstanceTypeSpec
from dsjobs.quantity import MAX_EXPONENT, QuantityRangeError, parse_quantity
from dsjobs.validation.problems import (
    Collector,
    Problem,
    at,
    format_problems,
    index,
    key,
    problems_from_validation_error,
)

_NAME = re.compile(L.INSTANCE_TYPE_NAME_PATTERN)
_DNS_SUBDOMAIN = re.compile(L.SECRET_NAME_PATTERN)
# Kubernetes qualified names (label keys, resource names): [prefix/]name.
_QUALIFIED = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(L.LABEL_VALUE_PATTERN)
# Resources Kubernetes lets a container overcommit (requests below limits); any other (extended)
# resource, such as nvidia.com/gpu, must have requests equal to limits.
_OVERCOMMITTABLE = ("cpu", "memory", "ephemeral-storage")


def parse_instance_type(name: str, data: Mapping[str, Any]) -> tuple[InstanceTypeSpec | None, list[Problem]]:
    """Read an InstanceType's `spec` and check it: (spec or None, all problems)."""
    try:
        spec = InstanceTypeSpec.model_validate(data)
    except ValidationError as exc:
        problems = problems_from_validation_error(exc)
        if not _NAME.fullmatch(name):
            problems.insert(0, _name_problem(name))
        return None, problems
    return spec, validate_instance_type(name, spec)


def read_instance_type(body: Mapping[str, Any]) -> tuple[InstanceTypeSpec | None, str]:
    """(spec, "") of a valid InstanceType object, else (None, its problems with their fields): the
    rules the CRD cannot check (label keys, requests above limits, GPU resources...) included; a
    pod rendered from an invalid type would be refused by the API server with a wall of pod fields.
    The operator leaves such a type out of its catalog, and the API refuses jobs naming it."""
    name = str((body.get("metadata") or {}).get("name", ""))
    spec, problems = parse_instance_type(name, body.get("spec") or {})
    if problems:
        return None, format_problems(problems, cr=True).replace("\n", "; ")
    return spec, ""


def _name_problem(name: str) -> Problem:
    return Problem(
        "name", "instance-type-name", f"{name[:100]!r} is not an instance type name like c1.4 or g2.mig"
    )


def validate_instance_type(name: str, spec: InstanceTypeSpec) -> list[Problem]:
    """Every problem of an InstanceType named `name` (empty when valid). Paths are relative to spec."""
    c = Collector()
    if len(name) > 63 or not _NAME.fullmatch(name):
        c.problems.append(_name_problem(name))
    if spec.vcpu < 1:
        c.add("vcpu", "vcpu", "must be at least 1")
    memory = _quantity(c, "memory", spec.memory)
    if memory is not None and memory <= 0:
        c.add("memory", "memory", "must be positive")
    if spec.gpus < 0:
        c.add("gpus", "gpus", "must not be negative")
    c.max_length("gpu_model", spec.gpu_model, 256)
    c.max_length("description", spec.description, L.MAX_DESC_LENGTH)
    c.max_items("node_selector", spec.node_selector, 32)
    for k, v in spec.node_selector.items():
        kpath = key("node_selector", k)
        c.pattern(kpath, k, _QUALIFIED, "label-key", "a label key")
        c.pattern(kpath, v, _LABEL_VALUE, "label-value", "a label value")
    c.max_items("tolerations", spec.tolerations, 32)
    for i, t in enumerate(spec.tolerations):
        tpath = index("tolerations", i)
        if t.key:
            c.pattern(at(tpath, "key"), t.key, _QUALIFIED, "label-key", "a taint key")
        elif t.operator != "Exists":
            c.add(at(tpath, "operator"), "toleration", "must be Exists when key is empty")
        if t.operator == "Exists" and t.value:
            c.add(at(tpath, "value"), "toleration", "must be empty when operator is Exists")
        elif t.value:
            c.pattern(at(tpath, "value"), t.value, _LABEL_VALUE, "label-value", "a taint value")
        if t.toleration_seconds is not None and t.effect != "NoExecute":
            c.add(at(tpath, "toleration_seconds"), "toleration", "needs effect NoExecute")
    _resources(c, spec)
    if spec.priority_class_name:
        c.pattern("priority_class_name", spec.priority_class_name, _DNS_SUBDOMAIN, "priority-class", "a name")
    if not L.MIN_SCHEDULE_TIMEOUT_SECONDS <= spec.schedule_timeout_seconds <= L.MAX_SCHEDULE_TIMEOUT_SECONDS:
        c.add(
            "schedule_timeout_seconds",
            "schedule-timeout",
            f"must be between {L.MIN_SCHEDULE_TIMEOUT_SECONDS} and {L.MAX_SCHEDULE_TIMEOUT_SECONDS}",
        )
    if spec.working_dir_size_limit is not None:
        size = _quantity(c, "working_dir_size_limit", spec.working_dir_size_limit)
        if size is not None and size <= 0:
            c.add(
                "working_dir_size_limit", "working-dir-size", "must be positive (leave it unset for no limit)"
            )
    if spec.shm_size is not None:
        shm = _quantity(c, "shm_size", spec.shm_size)
        if shm is not None and shm < 0:
            c.add("shm_size", "shm-size", "must not be negative (0 leaves /dev/shm to the container runtime)")
    return c.problems


def _quantity(c: Collector, path: str, value: str) -> Fraction | None:
    try:
        return parse_quantity(value)
    except QuantityRangeError:
        c.add(path, "quantity", f"{value[:100]!r}: the exponent must be within ±{MAX_EXPONENT}")
        return None
    except ValueError:
        c.add(path, "quantity", f"{value[:100]!r} is not a Kubernetes quantity like 4, 500m or 32Gi")
        return None


def _resources(c: Collector, spec: InstanceTypeSpec) -> None:
    parsed: dict[str, dict[str, Fraction]] = {}
    for kind in ("requests", "limits"):
        values: dict[str, str] = getattr(spec.resources, kind)
        kpath = at("resources", kind)
        c.max_items(kpath, values, 32)
        parsed[kind] = {}
        for name, value in values.items():
            vpath = key(kpath, name)
            if not c.pattern(vpath, name, _QUALIFIED, "resource-name", "a resource name"):
                continue
            amount = _quantity(c, vpath, value)
            if amount is None:
                continue
            if amount < 0:
                c.add(vpath, "quantity", "must not be negative")
            parsed[kind][name] = amount
    requests, limits = parsed["requests"], parsed["limits"]
    for name, amount in requests.items():
        limit = limits.get(name)
        rpath = key("resources.requests", name)
        if name in _OVERCOMMITTABLE or name.startswith("hugepages-"):
            if limit is not None and amount > limit:
                c.add(rpath, "request-above-limit", f"{name} request is above its limit")
        elif limit is None or amount != limit:
            c.add(
                rpath,
                "extended-resource",
                f"{name} is an extended resource: its limit must equal the request",
            )
    for name in limits:
        if name not in requests and name not in _OVERCOMMITTABLE and not name.startswith("hugepages-"):
            c.add(key("resources.limits", name), "extended-resource", f"{name} needs an equal request")
