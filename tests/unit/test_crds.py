"""The CRDs in crds/: up to date, structural, in step with the models, and accepting model dumps."""

from __future__ import annotations

import functools
import re
import types
import typing
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from dsjobs_strategies import full_instance_type, full_spec, full_spec_alternatives, full_status, job_specs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from dsjobs import crdgen
from dsjobs import models as m
from dsjobs.syntax import ESCAPING_PATH_PATTERN, escape_problem

REPO = Path(__file__).resolve().parents[2]


@functools.cache
def _load_text(name: str) -> str:
    return (REPO / "crds" / name).read_text()


def load(name: str) -> dict[str, Any]:
    doc = yaml.load(_load_text(name), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert isinstance(doc, dict)
    return doc


def root_schema(name: str) -> dict[str, Any]:
    schema = load(name)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert isinstance(schema, dict)
    return schema


PJ = "projectjobs.dsjobs.dev.yaml"
IT = "instancetypes.dsjobs.dev.yaml"


# --- a small structural-schema validator (what the API server checks, minus CEL) ---------------


def schema_errors(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    errors: list[str] = []
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, int | str):
            return [f"{path}: not int-or-string"]
        if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: {value!r} !~ {schema['pattern']}")
        return errors
    kind = schema["type"]
    python_type = {"object": dict, "array": list, "string": str, "integer": int, "boolean": bool}[kind]
    if not isinstance(value, python_type) or (kind == "integer" and isinstance(value, bool)):
        return [f"{path}: {value!r} is not {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: {value!r} !~ {schema['pattern']}")
        if len(value) > schema.get("maxLength", len(value)) or len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: length {len(value)}")
        if schema.get("format") == "date-time":
            datetime.fromisoformat(value)
    in_range = (
        schema.get("minimum", value) <= value <= schema.get("maximum", value) if kind == "integer" else True
    )
    if not in_range:
        errors.append(f"{path}: {value} out of range")
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)) or len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: {len(value)} items")
        for i, item in enumerate(value):
            errors += schema_errors(schema["items"], item, f"{path}[{i}]")
    if isinstance(value, dict) and path == ".metadata":
        return errors  # the API server validates metadata itself
    if isinstance(value, dict):
        if len(value) > schema.get("maxProperties", len(value)):
            errors.append(f"{path}: {len(value)} properties")
        for req in schema.get("required", []):
            if req not in value:
                errors.append(f"{path}.{req}: required")
        props = schema.get("properties", {})
        for k, v in value.items():
            if k in props:
                errors += schema_errors(props[k], v, f"{path}.{k}")
            elif "additionalProperties" in schema:
                errors += schema_errors(schema["additionalProperties"], v, f"{path}[{k}]")
            else:
                errors.append(f"{path}.{k}: unknown field (would be pruned)")
    return errors


def walk(schema: dict[str, Any], path: str = "") -> typing.Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for k, sub in schema.get("properties", {}).items():
        yield from walk(sub, f"{path}.{k}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


# --- tests --------------------------------------------------------------------------------------


def test_committed_crds_equal_the_generator_output() -> None:
    for name, text in crdgen.generate().items():
        assert (REPO / "crds" / name).read_text() == text, f"run `python -m dsjobs.crdgen` ({name})"
    assert crdgen.main(["--check"]) == 0


def test_check_mode_fails_on_a_stale_file(tmp_path: Path) -> None:
    assert crdgen.main(["--out-dir", str(tmp_path)]) == 0
    (tmp_path / PJ).write_text("stale")
    assert crdgen.main(["--check", "--out-dir", str(tmp_path)]) == 1


@pytest.mark.parametrize("name", [PJ, IT])
def test_schemas_are_structural(name: str) -> None:
    for path, node in walk(root_schema(name)):
        assert not {"$ref", "allOf", "oneOf", "not", "$defs", "title", "default"} & set(node), path
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}] and "type" not in node, path
            continue
        assert "anyOf" not in node, path
        assert node["type"] in ("object", "array", "string", "integer", "boolean"), path
        assert not ("properties" in node and "additionalProperties" in node), path
        assert "x-kubernetes-preserve-unknown-fields" not in node, path
        if node["type"] == "array":
            assert "items" in node and "maxItems" in node, path
        if node["type"] == "object" and path not in ("", ".metadata"):
            assert "properties" in node or "additionalProperties" in node, path
        if node["type"] == "string" and path not in (".apiVersion", ".kind"):
            # bounded strings keep CEL cost estimates and etcd objects small
            assert "maxLength" in node or "enum" in node or node.get("format") == "date-time", path
        if path and not path.endswith(("[]", "{}")) and path != ".metadata":
            assert node.get("description"), f"{path} has no description"


def test_crd_names_versions_columns() -> None:
    pj, it = load(PJ), load(IT)
    assert pj["metadata"]["name"] == "projectjobs.dsjobs.dev"
    assert pj["spec"]["group"] == "dsjobs.dev" and pj["spec"]["scope"] == "Namespaced"
    assert pj["spec"]["names"]["shortNames"] == ["pj"] and pj["spec"]["names"]["categories"] == ["dsjobs"]
    version = pj["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Status"] == ".status.phase"
    assert columns["Instance type"] == ".status.actualCloudInstanceType"
    assert columns["Return code"] == ".status.returnCode"
    assert columns["Age"] == ".metadata.creationTimestamp"
    assert columns["Details"] == ".status.statusDetails"
    assert it["spec"]["scope"] == "Cluster" and it["spec"]["names"]["shortNames"] == ["dsit"]
    assert it["spec"]["names"]["categories"] == ["dsjobs"]
    # every printer column points at a field of the schema
    for crd in (pj, it):
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        paths = {p for p, _ in walk(schema)}
        for column in crd["spec"]["versions"][0]["additionalPrinterColumns"]:
            assert column["jsonPath"] in paths or column["jsonPath"].startswith(".metadata."), column


def test_cel_rules_are_where_they_belong() -> None:
    schema = root_schema(PJ)
    rules = {
        path: [r["rule"] for r in node["x-kubernetes-validations"]]
        for path, node in walk(schema)
        if "x-kubernetes-validations" in node
    }
    assert any("dockerImageResourceId" in r for r in rules[".spec.jobParameters.env"])
    assert any("passwordSecretRef" in r for r in rules[".spec.jobParameters.env.dockerImageSpec"])
    relative = f"matches(r'{ESCAPING_PATH_PATTERN}')"
    # On each entry: the API server's error then names it (outputFiles[2].path).
    assert any(relative in r for r in rules[".spec.jobParameters.inputFiles[]"])
    assert any(relative in r for r in rules[".spec.jobParameters.outputFiles[]"])
    assert ".spec.jobParameters.outputFiles" not in rules
    # On the spec, not the field: a rule on the field is not checked when the field is removed.
    assert ".spec.execute" not in rules
    for name in ("execute", "clearData", "finalized"):
        assert (
            f"!has(oldSelf.{name}) || !oldSelf.{name} || (has(self.{name}) && self.{name})" in rules[".spec"]
        )
    assert any("logFileName" in r for r in rules[".status.fileErrors[]"])
    assert crdgen.INSTANCETYPE_NAME_RULE in [r["rule"] for r in root_schema(IT)["x-kubernetes-validations"]]
    # A cancel is one-way (removing it during a graceful shutdown made the plan kill the pod).
    assert "!has(oldSelf.cancel) || has(self.cancel)" in rules[".spec"]
    assert any("!self.cancel.graceful" in r for r in rules[".spec"])  # and a forced one stays forced
    (name_rule,) = root_schema(PJ)["x-kubernetes-validations"]
    assert name_rule["rule"] == crdgen.JOB_NAME_RULE and name_rule["fieldPath"] == ".metadata.name"
    codes = root_schema(PJ)["properties"]["spec"]["properties"]["retryPolicy"]["properties"][
        "retryOnExitCodes"
    ]
    assert (codes["items"]["minimum"], codes["items"]["maximum"]) == (1, 255)


def test_the_path_and_oneof_refusals_name_the_field_and_the_rule() -> None:
    # `kubectl apply` of `outputFiles: [{path: ../x}]` said `spec.jobParameters.outputFiles[0]:
    # Invalid value: ...` without the field or the rule the validator and the docs name.
    nodes = dict(walk(root_schema(PJ)))
    for path, field_path in (
        (".spec.jobParameters.inputFiles[]", ".desc.path"),
        (".spec.jobParameters.outputFiles[]", ".path"),
    ):
        (rule,) = nodes[path]["x-kubernetes-validations"]
        assert rule["fieldPath"] == field_path
        assert rule["message"].endswith("[path-absolute, path-parent]")
    for path, rule_id in (
        (".spec.jobParameters.env", "docker-oneof"),
        (".spec.jobParameters.env.dockerImageSpec", "docker-password-oneof"),
    ):
        (rule,) = nodes[path]["x-kubernetes-validations"]
        assert rule["message"].endswith(f"[{rule_id}]")


def _spec_models(model: type[BaseModel], seen: set[type[BaseModel]]) -> typing.Iterator[type[BaseModel]]:
    if model in seen:
        return
    seen.add(model)
    yield model
    for f in model.model_fields.values():
        for arg in typing.get_args(f.annotation) or (f.annotation,):
            for inner in (*typing.get_args(arg), arg):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    yield from _spec_models(inner, seen)


def test_kubectl_explain_states_the_default_of_every_spec_field_that_has_one() -> None:
    # The CRD carries no `default` (the operator applies the models'), so `kubectl explain` shows
    # only the description: `retryPolicy.backoffSeconds` said "Wait before the next attempt." while
    # a policy without it waited 10 s, and `passwordSecretRef.key` did not say it reads `password`.
    missing = []
    for model in _spec_models(m.ProjectJobSpec, set()):
        for name, f in model.model_fields.items():
            default = f.default
            if isinstance(default, bool) or not isinstance(default, int | str) or default in (0, ""):
                continue
            shown = default.value if hasattr(default, "value") else default
            if str(shown) not in (f.description or ""):
                missing.append(f"{model.__name__}.{name} (default {shown!r})")
    assert not missing


def test_the_fixed_parameters_refusal_tells_kubectl_users_what_they_can_do() -> None:
    # "clone this one" is the API's way only: kubectl users apply the job under a new name (or
    # with generateName), or delete it first.
    (message,) = [
        r["message"]
        for r in root_schema(PJ)["properties"]["spec"]["x-kubernetes-validations"]
        if "self.jobParameters == oldSelf.jobParameters" in r["rule"]
    ]
    for needle in ("apply it under a new name", "metadata.generateName", "clone", "delete this job first"):
        assert needle in message, message


def test_the_job_name_rule_wants_a_dns_label_on_create_only() -> None:
    # The API's job ids are DNS labels (dsjobs.api.ids): a dotted name ran, but its outputs could
    # never be fetched; a long one is no label value of its pods.
    (rule,) = root_schema(PJ)["x-kubernetes-validations"]
    # Create-only: a root rule without oldSelf is evaluated on every update and status write of a
    # job stored before it existed (ratcheting skips it only for an unchanged object), so such a
    # job could never end nor be let go by its finalizer.
    assert rule["optionalOldSelf"] is True
    guard, _, check = rule["rule"].partition(" || ")
    assert guard == "oldSelf.hasValue()"
    pattern = re.fullmatch(r"self\.metadata\.name\.matches\('(.*)'\)", check)
    assert pattern is not None
    for name in ("job-0001", "a", "0", "a" * 63, "00u7f1sq2lf8gmfdbbaz"):
        assert re.search(pattern[1], name), name
    for name in ("train.v2", "a" * 64, "Train", "-a", "a-", "a_b", ""):
        assert not re.search(pattern[1], name), name
    assert "DNS label" in rule["message"] and "[job-name]" in rule["message"]


def _object(kind: str, spec: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": m.API_VERSION, "kind": kind, "metadata": {"name": "x"}, "spec": spec}
    if status is not None:
        obj["status"] = status
    return obj


def test_fully_populated_objects_validate() -> None:
    pj, it = root_schema(PJ), root_schema(IT)
    for spec in [full_spec(), *full_spec_alternatives()]:
        assert schema_errors(pj, _object("ProjectJob", spec.to_cr(), full_status().to_cr())) == []
    assert schema_errors(pj, _object("ProjectJob", full_spec().to_cr(), m.ProjectJobStatus().to_cr())) == []
    assert schema_errors(it, _object("InstanceType", full_instance_type().to_cr())) == []


@pytest.mark.parametrize("path", sorted((REPO / "deploy" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_is_a_valid_job_of_the_catalog(path: Path) -> None:
    """Each deploy/examples file is what its comments tell users to `kubectl apply`: the schema
    takes it and the operator's validation, against the default catalog, finds nothing."""
    from dsjobs.instancetypes import CATALOG
    from dsjobs.validation import parse_job_spec

    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    jobs = [d for d in docs if d["kind"] == "ProjectJob"]
    assert jobs, f"{path.name} holds no ProjectJob"
    pj = root_schema(PJ)
    for doc in jobs:
        assert schema_errors(pj, doc) == [], doc["metadata"]
        spec, problems = parse_job_spec(doc["spec"], known_instance_types={e.name for e in CATALOG})
        assert spec is not None and problems == [], (doc["metadata"], problems)


def test_the_schema_rejects_what_it_should() -> None:
    pj = root_schema(PJ)
    doc = full_spec().to_cr()
    doc["jobParameters"]["inputFiles"][0]["sha256"] = "XYZ"
    doc["jobParameters"]["cmd"] = ""
    doc["jobParameters"]["s3MountIds"] = ["x"] * 101
    doc["jobParameters"]["cloudInstanceTypes"] = [{"name": "C1"}]
    doc["jobParameters"]["env"]["dockerImageSpec"]["passwordPlainText"] = "secret"
    # A sign would let `kubectl patch` set a TTL that the API server keeps and no rule allows.
    doc["dataTtl"] = "-1d"
    doc["jobParameters"]["gracefulShutdownParameters"]["timeout"] = "-5s"
    errors = schema_errors(pj, _object("ProjectJob", doc))
    assert len(errors) == 7, errors
    assert any(e.startswith(".spec.dataTtl: '-1d'") for e in errors), errors


def _model_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for name, info in model.model_fields.items():
        path = f"{prefix}.{info.alias or name}"
        paths.add(path)
        paths |= _type_paths(info.annotation, path)
    return paths


def _type_paths(annotation: Any, path: str) -> set[str]:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_type_paths(a, path) for a in args if a is not type(None)))
    if origin is typing.Annotated:
        return _type_paths(args[0], path)
    if origin is list:
        return {f"{path}[]"} | _type_paths(args[0], f"{path}[]")
    if origin is dict:
        return {f"{path}{{}}"} | _type_paths(args[1], f"{path}{{}}")
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _model_paths(annotation, path)
    return set()


def test_every_model_field_is_in_the_schema_and_vice_versa() -> None:
    pj_paths = {p for p, _ in walk(root_schema(PJ))}
    model = _model_paths(m.ProjectJobSpec, ".spec") | _model_paths(m.ProjectJobStatus, ".status")
    assert pj_paths - {"", ".apiVersion", ".kind", ".metadata", ".metadata.name", ".spec", ".status"} == model
    it_paths = {p for p, _ in walk(root_schema(IT))}
    assert it_paths - {"", ".apiVersion", ".kind", ".metadata", ".metadata.name", ".spec"} == _model_paths(
        m.InstanceTypeSpec, ".spec"
    )


def test_full_examples_set_every_field() -> None:
    """The fully populated examples really are full, so the schema test above covers every field."""

    def leaves(value: Any, path: str = "") -> set[str]:
        out = {path}
        if isinstance(value, dict):
            for k, v in value.items():
                out |= leaves(v, f"{path}.{k}")
        if isinstance(value, list):
            for v in value:
                out |= leaves(v, f"{path}[]")
        return out

    seen = leaves(full_spec().to_cr(), ".spec") | leaves(full_status().to_cr(), ".status")
    for alt in full_spec_alternatives():
        seen |= leaves(alt.to_cr(), ".spec")
    model = _model_paths(m.ProjectJobSpec, ".spec") | _model_paths(m.ProjectJobStatus, ".status")
    # map values show up under their keys; compare fields only
    missing = {p for p in model if "{}" not in p} - seen
    assert missing == set()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(job_specs())
def test_what_the_validator_accepts_the_crd_accepts(spec: m.ProjectJobSpec) -> None:
    assert schema_errors(PJ_SCHEMA, _object("ProjectJob", spec.to_cr())) == []


PJ_SCHEMA = root_schema(PJ)


@pytest.mark.parametrize(
    "path",
    ["a/b", "a\\b", "..x", "x..", "a/..b", ".C:", "a/C:", "./a", ".", "C", "ab:", "x/./y"],
)
def test_the_crd_path_rule_lets_relative_paths_through(path: str) -> None:
    assert escape_problem(path) is None
    assert re.search(ESCAPING_PATH_PATTERN, path) is None


@pytest.mark.parametrize(
    "path",
    [
        "/a",
        "\\a",
        "..",
        "../a",
        "a/..",
        "a/../b",
        "..\\a",
        "a\\..",
        "a\\..\\b",
        "C:",
        "a:b",
        "c:\\x",
        "./C:x",
        ".\\/D:",
    ],
)
def test_the_crd_path_rule_refuses_what_the_validator_refuses(path: str) -> None:
    assert escape_problem(path) is not None
    assert re.search(ESCAPING_PATH_PATTERN, path) is not None


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet="/\\.Ca:x", max_size=8))
def test_the_crd_path_rule_and_the_validator_agree(path: str) -> None:
    # The CEL rule (RE2) is the validator's rule for kubectl users: the same paths, both ways.
    assert (re.search(ESCAPING_PATH_PATTERN, path) is not None) == (escape_problem(path) is not None)


#: CEL's reserved words: a field of one of these names is `__name__` in a rule. Kubernetes takes
#: the plain name only from 1.32 (compatibility version 1.31); before, the CRD or policy is refused
#: ("undefined field 'var'"), and dsjobs claims 1.30.
CEL_RESERVED: tuple[str, ...] = (
    "true", "false", "null", "in", "as", "break", "const", "continue", "else", "for", "function",
    "if", "import", "let", "loop", "package", "namespace", "return", "var", "void", "while",
)  # fmt: skip
_SELECTS_RESERVED = re.compile(r"\.(" + "|".join(CEL_RESERVED) + r")\b")


def _cel_expressions(doc: object) -> list[str]:
    """Every CEL expression of a CRD or admission policy document (rules, messages, conditions)."""
    if isinstance(doc, list):
        return [e for item in doc for e in _cel_expressions(item)]
    if not isinstance(doc, dict):
        return []
    found = [str(v) for k, v in doc.items() if k in ("rule", "messageExpression", "expression")]
    return found + [e for v in doc.values() for e in _cel_expressions(v)]


def test_no_cel_expression_selects_a_reserved_word_unescaped() -> None:
    files = [*(REPO / "crds").glob("*.yaml"), REPO / "deploy" / "base" / "admission.yaml"]
    expressions = [
        e for f in files for d in yaml.safe_load_all(f.read_text()) if d for e in _cel_expressions(d)
    ]
    assert len(expressions) > 20  # the files' rules were found
    # String literals may say anything: only what is outside quotes selects fields.
    unquoted = [(e, re.sub(r"'(?:[^'\\]|\\.)*'", "''", e)) for e in expressions]
    assert [e for e, code in unquoted if _SELECTS_RESERVED.search(code)] == []
