"""Count limits checked on the request message itself, before it becomes a model.

A 4 MB request can hold hundreds of thousands of list entries; converting and validating each one
costs seconds of the API's event loop (measured: 400k instance types, 2.6 s) before the count alone
refuses it. The limits are the models' own (`maxItems`/`maxProperties`, which the CRD carries and
`dsjobs.validation` enforces), read from their JSON schema, so the three cannot disagree.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from google.protobuf.message import Message

from dsjobs.models.spec import JobParameters
from dsjobs.validation.problems import Collector, Problem, at, index


@cache
def list_limits() -> dict[str, int]:
    """`maxItems`/`maxProperties` of JobParameters' lists and maps, by dotted path without indices
    (`output_datasets.labels`)."""
    schema = JobParameters.model_json_schema(by_alias=False)
    defs: dict[str, Any] = schema.get("$defs", {})
    limits: dict[str, int] = {}

    def walk(node: dict[str, Any], path: str) -> None:
        while "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[-1]]
        for alternative in [*node.get("anyOf", []), *node.get("allOf", [])]:
            walk(alternative, path)
        for keyword in ("maxItems", "maxProperties"):
            if keyword in node:
                limits[path] = node[keyword]
        if isinstance(node.get("items"), dict):
            walk(node["items"], path)
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], path)
        for name, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{name}" if path else name)

    walk(schema, "")
    return limits


def oversized_lists(params: Message, path: str) -> list[Problem]:
    """The lists and maps of a JobParameters message (`path` names it in the request) with more
    entries than allowed, as validation would report them. Entries of lists within their limit are
    looked into; an oversized list's are not."""
    c = Collector()
    _walk(c, params, "", path, list_limits())
    return c.problems


def _walk(c: Collector, message: Message, relative: str, path: str, limits: dict[str, int]) -> None:
    # ListFields: only what the message has set, so an empty request costs nothing.
    for field, value in message.ListFields():
        rel = f"{relative}.{field.name}" if relative else field.name
        fpath = at(path, field.name)
        entry = field.message_type
        is_map = entry is not None and entry.GetOptions().map_entry
        if field.is_repeated:
            limit = limits.get(rel)
            if limit is not None and len(value) > limit:
                c.max_items(fpath, value, limit)
            elif entry is not None and not is_map:
                for i, item in enumerate(value):
                    _walk(c, item, rel, index(fpath, i), limits)
        elif entry is not None:
            _walk(c, value, rel, fpath, limits)
