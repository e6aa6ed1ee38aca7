"""Wire compatibility of dsjobs' protos with the official `datasphere` 0.10.0 client.

The official client and dsjobs register the same full names (`yandex.cloud...`) in the default
descriptor pool, so the two descriptor sets never share a process. This module is also a script
that runs in three subprocesses:

1. ``official-build`` (official client only): describes every message, enum and RPC reachable from
   the official ProjectJobService, OperationService and the ProjectService RPCs dsjobs serves, and
   the operation metadata/response types declared on the long-running RPCs; builds fully populated
   instances of every reachable message (every scalar, 2 items per repeated field and map, non-zero
   enums, one branch of each oneof per variant so that all branches are covered) and serializes them.
2. ``ours-roundtrip`` (dsjobs.pb only): describes the same names in our descriptors, parses every
   payload with our classes (checking nothing lands in unknown fields, also inside Any payloads) and
   serializes it again.
3. ``official-compare`` (official client only): parses our bytes and compares them with the originals.

The pytest process imports neither descriptor set; the per-message tests assert on cached results.
"""

from __future__ import annotations

import base64
import functools
import importlib
import json
import os
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

OFFICIAL_MODULES = (
    "datasphere.yandex.cloud.datasphere.v2.jobs.project_job_service_pb2",
    "datasphere.yandex.cloud.operation.operation_service_pb2",
    "datasphere.yandex.cloud.datasphere.v2.project_service_pb2",
)
OFFICIAL_API_OPERATION_MODULE = "datasphere.yandex.cloud.api.operation_pb2"
OURS_MODULES = (
    "dsjobs.pb.yandex.cloud.datasphere.v2.jobs.project_job_service_pb2",
    "dsjobs.pb.yandex.cloud.operation.operation_service_pb2",
    "dsjobs.pb.yandex.cloud.datasphere.v2.project_service_pb2",
)

JOB_SERVICE = "yandex.cloud.datasphere.v2.jobs.ProjectJobService"
OPERATION_SERVICE = "yandex.cloud.operation.OperationService"
PROJECT_SERVICE = "yandex.cloud.datasphere.v2.ProjectService"
# Services whose RPCs must all be served; for the project service only the ones the CLI calls.
ROOT_SERVICES: dict[str, tuple[str, ...] | None] = {
    JOB_SERVICE: None,
    OPERATION_SERVICE: None,
    PROJECT_SERVICE: ("Get", "List"),
}

JOBS_PKG = "yandex.cloud.datasphere.v2.jobs"
# dsjobs' own ProjectJobService RPCs (not in the official API): name -> (request, response).
EXTENSION_RPCS = {
    "Finalize": (f"{JOBS_PKG}.FinalizeProjectJobRequest", f"{JOBS_PKG}.FinalizeProjectJobResponse"),
    "DownloadStdLogs": (
        f"{JOBS_PKG}.DownloadProjectJobStdLogsRequest",
        f"{JOBS_PKG}.DownloadProjectJobStdLogsResponse",
    ),
}
# ... and the fields of their messages: message -> {field: (number, type)}.
EXTENSION_FIELDS = {
    f"{JOBS_PKG}.FinalizeProjectJobRequest": {"job_id": (1, "TYPE_STRING")},
    f"{JOBS_PKG}.FinalizeProjectJobResponse": {"job_id": (1, "TYPE_STRING")},
    f"{JOBS_PKG}.DownloadProjectJobStdLogsRequest": {"job_id": (1, "TYPE_STRING")},
    f"{JOBS_PKG}.DownloadProjectJobStdLogsResponse": {
        "stdout_url": (1, "TYPE_STRING"),
        "stderr_url": (2, "TYPE_STRING"),
    },
}

MAX_DEPTH = 8  # nesting guard for the populator (Any payloads can nest)


# --------------------------------------------------------------------------------------------------
# Subprocess side (never runs in the pytest process)
# --------------------------------------------------------------------------------------------------


def _describe_message(desc: Any) -> dict[str, Any]:
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.DescriptorProto()
    desc.CopyToProto(proto)
    ftype = descriptor_pb2.FieldDescriptorProto.Type
    flabel = descriptor_pb2.FieldDescriptorProto.Label
    oneofs = [o.name for o in proto.oneof_decl]
    fields = {}
    for f in proto.field:
        fields[f.name] = {
            "number": f.number,
            "type": ftype.Name(f.type),
            "label": flabel.Name(f.label),
            "type_name": f.type_name,
            "oneof": oneofs[f.oneof_index] if f.HasField("oneof_index") else None,
            "proto3_optional": f.proto3_optional,
        }
    return {"fields": fields, "map_entry": proto.options.map_entry}


def _describe_enum(desc: Any) -> dict[str, int]:
    return {v.name: v.number for v in desc.values}


def _describe_service(desc: Any) -> dict[str, Any]:
    return {
        m.name: {
            "input": m.input_type.full_name,
            "output": m.output_type.full_name,
            "client_streaming": m.client_streaming,
            "server_streaming": m.server_streaming,
        }
        for m in desc.methods
    }


def _is_yandex(name: str) -> bool:
    return name.startswith("yandex.")


def _synthetic_oneofs(desc: Any) -> set[str]:
    """Names of the oneofs protoc synthesizes for proto3 `optional` fields."""
    described = _describe_message(desc)["fields"]
    return {f["oneof"] for f in described.values() if f["proto3_optional"]}


class _Populator:
    """Fills messages with non-default values; records which oneof branches it set."""

    def __init__(self, any_payloads: list[Any]) -> None:
        self.any_payloads = any_payloads  # message descriptors to pack into Any fields
        self.covered: set[str] = set()

    def variants(self, desc: Any) -> int:
        """How many variants cover every oneof branch reachable from `desc` and every Any payload type."""
        best, seen, queue = 1, set(), deque([desc])
        while queue:
            d = queue.popleft()
            if d.full_name in seen:
                continue
            seen.add(d.full_name)
            if d.full_name == "google.protobuf.Any":
                best = max(best, len(self.any_payloads))
            synthetic = _synthetic_oneofs(d)
            for o in d.oneofs:
                if o.name not in synthetic:
                    best = max(best, len(o.fields))
            queue.extend(f.message_type for f in d.fields if f.message_type is not None)
        return best

    def fill(self, msg: Any, variant: int, depth: int = 0) -> None:
        desc = msg.DESCRIPTOR
        if depth > MAX_DEPTH:
            return
        if desc.full_name == "google.protobuf.Any":
            self._fill_any(msg, variant, depth)
            return
        synthetic = _synthetic_oneofs(desc)
        chosen = {}
        for o in desc.oneofs:
            if o.name not in synthetic:
                branch = o.fields[variant % len(o.fields)]
                chosen[o.name] = branch.name
                self.covered.add(f"{desc.full_name}.{branch.name}")
        for f in desc.fields:
            o = f.containing_oneof
            if o is not None and o.name not in synthetic and chosen[o.name] != f.name:
                continue
            self._fill_field(msg, f, variant, depth)

    def _fill_field(self, msg: Any, f: Any, variant: int, depth: int) -> None:
        mt = f.message_type
        if mt is not None and mt.GetOptions().map_entry:
            container = getattr(msg, f.name)
            key_f, val_f = mt.fields_by_name["key"], mt.fields_by_name["value"]
            for i in range(2):
                key = self._scalar(key_f, variant, i)
                if val_f.message_type is not None:
                    self.fill(container[key], variant + i, depth + 1)
                else:
                    container[key] = self._scalar(val_f, variant, i)
            return
        if f.is_repeated:
            container = getattr(msg, f.name)
            for i in range(2):
                if mt is not None:
                    self.fill(container.add(), variant + i, depth + 1)
                else:
                    container.append(self._scalar(f, variant, i))
            return
        if mt is not None:
            self.fill(getattr(msg, f.name), variant, depth + 1)
            # An all-default submessage still has presence once touched.
            getattr(msg, f.name).SetInParent()
        else:
            setattr(msg, f.name, self._scalar(f, variant, 0))

    def _fill_any(self, msg: Any, variant: int, depth: int) -> None:
        from google.protobuf import message_factory

        payload_desc = self.any_payloads[variant % len(self.any_payloads)]
        payload = message_factory.GetMessageClass(payload_desc)()
        self.fill(payload, variant, depth + 1)
        msg.Pack(payload)

    @staticmethod
    def _scalar(f: Any, variant: int, i: int) -> Any:
        from google.protobuf.descriptor import FieldDescriptor as FD

        n = f.number * 10 + variant * 3 + i + 1
        sign = -1 if i % 2 else 1
        t = f.type
        if t == FD.TYPE_ENUM:
            values = [v.number for v in f.enum_type.values if v.number != 0]
            return values[(variant + i) % len(values)]
        if t == FD.TYPE_STRING:
            return f"{f.name}-{variant}-{i}-ünïcødé✓"
        if t == FD.TYPE_BYTES:
            return bytes([0, 255, n % 256, 0x80]) + f.name.encode()
        if t == FD.TYPE_BOOL:
            return True
        if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
            return sign * (n + 0.5)
        if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
            if f.containing_type.full_name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
                return 100_000 + n  # valid nanos
            return sign * (100_000 + n)
        if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
            return 3_000_000_000 + n
        if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
            if f.containing_type.full_name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
                return 1_700_000_000 + n  # valid seconds
            return sign * (2**40 + n)
        if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
            return 2**63 + n
        raise AssertionError(f"unhandled field type {t} of {f.full_name}")


def _official_build(_request: dict[str, Any]) -> dict[str, Any]:
    from google.protobuf import descriptor_pool, message_factory

    for name in OFFICIAL_MODULES:
        importlib.import_module(name)
    api_operation = importlib.import_module(OFFICIAL_API_OPERATION_MODULE)
    assert not any(m.startswith("dsjobs.pb") for m in sys.modules), "dsjobs.pb leaked into the official side"
    pool = descriptor_pool.Default()

    services: dict[str, Any] = {}
    operation_types: dict[str, dict[str, str]] = {}
    roots: list[str] = []
    for svc_name, only in ROOT_SERVICES.items():
        svc = pool.FindServiceByName(svc_name)
        described = _describe_service(svc)
        if only is not None:
            described = {k: v for k, v in described.items() if k in only}
        services[svc_name] = described
        for method in svc.methods:
            if method.name not in described:
                continue
            roots += [method.input_type.full_name, method.output_type.full_name]
            opts = method.GetOptions()
            if opts.HasExtension(api_operation.operation):
                op = opts.Extensions[api_operation.operation]
                pkg = svc.file.package
                resolved = {}
                for kind in ("metadata", "response"):
                    short = getattr(op, kind)
                    if not short:
                        continue
                    full = short if "." in short else f"{pkg}.{short}"
                    pool.FindMessageTypeByName(full)  # must resolve
                    resolved[kind] = full
                    roots.append(full)
                operation_types[f"{svc_name}.{method.name}"] = resolved

    # Every message and enum declared in the official jobs and operation files (reachable or not) ...
    messages: dict[str, Any] = {}
    enums: dict[str, Any] = {}
    for svc_name in (JOB_SERVICE, OPERATION_SERVICE):
        svc_file = pool.FindServiceByName(svc_name).file
        for dep in [svc_file, *svc_file.dependencies]:
            if dep.package == svc_file.package:
                roots += [m.full_name for m in dep.message_types_by_name.values()]
                enums.update({e.full_name: _describe_enum(e) for e in dep.enum_types_by_name.values()})

    # ... and every message and enum reachable from the roots (fields, nested declarations).
    queue = deque(pool.FindMessageTypeByName(r) for r in roots)
    seen: set[str] = set()
    while queue:
        d = queue.popleft()
        if d.full_name in seen:
            continue
        seen.add(d.full_name)
        if _is_yandex(d.full_name):
            messages[d.full_name] = _describe_message(d)
        for f in d.fields:
            if f.message_type is not None:
                queue.append(f.message_type)
            if f.enum_type is not None and _is_yandex(f.enum_type.full_name):
                enums[f.enum_type.full_name] = _describe_enum(f.enum_type)
        queue.extend(d.nested_types)
        for e in d.enum_types:
            if _is_yandex(e.full_name):
                enums[e.full_name] = _describe_enum(e)

    # Fully populated payloads. Any fields carry the operation metadata/response types.
    any_payloads = sorted(
        {full for op in operation_types.values() for full in op.values() if _is_yandex(full)}
    )
    populator = _Populator([pool.FindMessageTypeByName(n) for n in any_payloads])
    payloads: dict[str, list[str]] = {}
    for name, described in sorted(messages.items()):
        if described["map_entry"]:
            continue  # covered through the map fields that use them
        cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
        out = [cls().SerializeToString()]  # the all-defaults message
        for variant in range(populator.variants(cls.DESCRIPTOR)):
            msg = cls()
            populator.fill(msg, variant)
            out.append(msg.SerializeToString(deterministic=True))
        payloads[name] = [base64.b64encode(b).decode() for b in out]

    oneof_branches = sorted(
        f"{name}.{fname}"
        for name, described in messages.items()
        for fname, f in described["fields"].items()
        if f["oneof"] is not None and not f["proto3_optional"]
    )
    clashes = []
    for name in [n for pair in EXTENSION_RPCS.values() for n in pair]:
        try:
            pool.FindMessageTypeByName(name)
            clashes.append(name)
        except KeyError:
            pass
    official_job_methods = {m.name for m in pool.FindServiceByName(JOB_SERVICE).methods}
    clashes += [m for m in EXTENSION_RPCS if m in official_job_methods]

    return {
        "services": services,
        "operation_types": operation_types,
        "messages": messages,
        "enums": enums,
        "payloads": payloads,
        "oneof_branches": oneof_branches,
        "covered_branches": sorted(populator.covered),
        "extension_clashes": clashes,
    }


def _unknown_field_paths(msg: Any, path: str, pool: Any) -> list[str]:
    """Paths of message values holding unknown fields (recursing into Any payloads)."""
    from google.protobuf import message_factory, unknown_fields

    problems = []
    if len(unknown_fields.UnknownFieldSet(msg)):
        problems.append(path or "<root>")
    if msg.DESCRIPTOR.full_name == "google.protobuf.Any" and msg.type_url:
        type_name = msg.type_url.rsplit("/", 1)[-1]
        try:
            desc = pool.FindMessageTypeByName(type_name)
        except KeyError:
            return [*problems, f"{path}: Any payload type {type_name} unknown to ours"]
        inner = message_factory.GetMessageClass(desc)()
        inner.ParseFromString(msg.value)
        return problems + _unknown_field_paths(inner, f"{path}<{type_name}>", pool)
    for f, value in msg.ListFields():
        if f.message_type is None:
            continue
        sub = f"{path}.{f.name}" if path else f.name
        if f.message_type.GetOptions().map_entry:
            if f.message_type.fields_by_name["value"].message_type is not None:
                for k, v in value.items():
                    problems += _unknown_field_paths(v, f"{sub}[{k!r}]", pool)
        elif f.is_repeated:
            for i, v in enumerate(value):
                problems += _unknown_field_paths(v, f"{sub}[{i}]", pool)
        else:
            problems += _unknown_field_paths(value, sub, pool)
    return problems


def _ours_roundtrip(request: dict[str, Any]) -> dict[str, Any]:
    from google.protobuf import descriptor_pool, message_factory

    for name in OURS_MODULES:
        importlib.import_module(name)
    assert "datasphere" not in sys.modules, "the official client leaked into our side"
    pool = descriptor_pool.Default()

    def described(find: Any, describe: Any, names: list[str]) -> dict[str, Any]:
        """Descriptions of the names our pool has (missing ones are reported by the tests)."""
        out = {}
        for name in names:
            try:
                out[name] = describe(find(name))
            except KeyError:
                continue
        return out

    services = described(pool.FindServiceByName, _describe_service, request["services"])
    messages = described(
        pool.FindMessageTypeByName, _describe_message, [*request["messages"], *EXTENSION_FIELDS]
    )
    enums = described(pool.FindEnumTypeByName, _describe_enum, request["enums"])

    results: dict[str, Any] = {}
    for name, encoded in request["payloads"].items():
        try:
            cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
        except KeyError:
            results[name] = {"errors": [f"{name} is missing from our descriptors"], "payloads": []}
            continue
        errors, out = [], []
        for i, data in enumerate(encoded):
            msg = cls()
            try:
                msg.ParseFromString(base64.b64decode(data))
            except Exception as e:
                errors.append(f"variant {i}: ours cannot parse it: {e!r}")
                out.append("")
                continue
            errors += [f"variant {i}: unknown fields at {p}" for p in _unknown_field_paths(msg, "", pool)]
            out.append(base64.b64encode(msg.SerializeToString()).decode())
        results[name] = {"errors": errors, "payloads": out}
    return {"services": services, "messages": messages, "enums": enums, "results": results}


def _official_compare(request: dict[str, Any]) -> dict[str, Any]:
    from google.protobuf import descriptor_pool, message_factory, text_format

    for name in OFFICIAL_MODULES:
        importlib.import_module(name)
    assert not any(m.startswith("dsjobs.pb") for m in sys.modules), "dsjobs.pb leaked into the official side"
    pool = descriptor_pool.Default()
    out: dict[str, list[str]] = {}
    for name, pairs in request.items():
        cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
        errors = []
        for i, (orig_b64, ours_b64) in enumerate(pairs):
            original, back = cls(), cls()
            original.ParseFromString(base64.b64decode(orig_b64))
            try:
                back.ParseFromString(base64.b64decode(ours_b64))
            except Exception as e:
                errors.append(f"variant {i}: the official client cannot parse our bytes: {e!r}")
                continue
            if original != back:
                errors.append(
                    f"variant {i}: differs after the round trip through ours\n"
                    f"--- official\n{text_format.MessageToString(original)}"
                    f"--- after ours\n{text_format.MessageToString(back)}"
                )
        out[name] = errors
    return out


MODES = {
    "official-build": _official_build,
    "ours-roundtrip": _ours_roundtrip,
    "official-compare": _official_compare,
}


# --------------------------------------------------------------------------------------------------
# pytest side
# --------------------------------------------------------------------------------------------------


def _run(mode: str, request: Any) -> dict[str, Any]:
    env = dict(os.environ)
    if mode == "ours-roundtrip":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "operator"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, __file__, mode],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} subprocess failed ({proc.returncode}):\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@functools.cache
def _official() -> dict[str, Any]:
    return _run("official-build", {})


@functools.cache
def _ours() -> dict[str, Any]:
    official = _official()
    return _run(
        "ours-roundtrip",
        {
            "services": list(official["services"]),
            "messages": list(official["messages"]),
            "enums": list(official["enums"]),
            "payloads": official["payloads"],
        },
    )


@functools.cache
def _compared() -> dict[str, Any]:
    official, ours = _official(), _ours()
    request = {}
    for name, encoded in official["payloads"].items():
        result = ours["results"][name]
        if result["errors"]:
            continue  # reported by the round-trip test already
        request[name] = list(zip(encoded, result["payloads"], strict=True))
    return _run("official-compare", request)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrizes from the official descriptors (one subprocess, cached for the session)."""
    names = metafunc.fixturenames
    if "rpc" in names:
        official = _official()["services"]
        metafunc.parametrize("rpc", [f"{svc}/{m}" for svc, methods in official.items() for m in methods])
    if "message" in names:
        metafunc.parametrize("message", sorted(_official()["messages"]))
    if "enum" in names:
        metafunc.parametrize("enum", sorted(_official()["enums"]))
    if "payload" in names:
        metafunc.parametrize("payload", sorted(_official()["payloads"]))


def test_official_surface_counts() -> None:
    services = _official()["services"]
    assert len(services[JOB_SERVICE]) == 13
    assert len(services[OPERATION_SERVICE]) == 2
    assert set(services[PROJECT_SERVICE]) == {"Get", "List"}


def test_rpc_matches_official(rpc: str) -> None:
    svc, method = rpc.split("/")
    expected = _official()["services"][svc][method]
    ours = _ours()["services"].get(svc)
    assert ours is not None, f"service {svc} is missing from our protos"
    assert method in ours, f"rpc {rpc} is missing from our protos"
    assert ours[method] == expected


def test_message_descriptor_matches_official(message: str) -> None:
    expected = _official()["messages"][message]
    ours = _ours()["messages"].get(message)
    assert ours is not None, f"message {message} is missing from our protos"
    for field, spec in expected["fields"].items():
        assert field in ours["fields"], f"{message}.{field} is missing"
        assert ours["fields"][field] == spec, f"{message}.{field} differs"
    extra = set(ours["fields"]) - set(expected["fields"])
    assert not extra, f"{message} has fields the official API lacks: {sorted(extra)}"
    assert ours["map_entry"] == expected["map_entry"]


def test_enum_matches_official(enum: str) -> None:
    ours = _ours()["enums"].get(enum)
    assert ours is not None, f"enum {enum} is missing from our protos"
    assert ours == _official()["enums"][enum]


def test_message_round_trips_through_ours(payload: str) -> None:
    result = _ours()["results"][payload]
    assert not result["errors"], "\n".join(result["errors"])
    errors = _compared()[payload]
    assert not errors, "\n".join(errors)


def test_every_oneof_branch_is_exercised() -> None:
    official = _official()
    missing = set(official["oneof_branches"]) - set(official["covered_branches"])
    assert not missing, f"oneof branches never populated: {sorted(missing)}"


def test_operation_types_are_declared() -> None:
    """The long-running RPCs declare their Operation metadata/response types (and we have them)."""
    op_types = _official()["operation_types"]
    for method in ("Create", "Clone", "Execute", "Delete", "DeleteData", "DeleteAllData"):
        declared = op_types[f"{JOB_SERVICE}.{method}"]
        assert set(declared) == {"metadata", "response"}, method
        for full in declared.values():
            if full.startswith("yandex."):
                assert full in _ours()["messages"], full


def test_dsjobs_extension_rpcs_exist() -> None:
    ours = _ours()
    methods = ours["services"][JOB_SERVICE]
    for rpc, (request, response) in EXTENSION_RPCS.items():
        assert methods[rpc] == {
            "input": request,
            "output": response,
            "client_streaming": False,
            "server_streaming": False,
        }
    for name, fields in EXTENSION_FIELDS.items():
        described = ours["messages"][name]["fields"]
        assert {f: (d["number"], d["type"]) for f, d in described.items()} == fields, name
        assert all(d["label"] == "LABEL_OPTIONAL" and d["oneof"] is None for d in described.values())


def test_dsjobs_extensions_do_not_clash_with_official_names() -> None:
    assert _official()["extension_clashes"] == []


if __name__ == "__main__":
    # Subprocess entry point: python test_wire_compat.py MODE < request.json > result.json
    json.dump(MODES[sys.argv[1]](json.loads(sys.stdin.read() or "{}")), sys.stdout)
