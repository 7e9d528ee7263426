"""The CRD schema, the pydantic models in ``api.py`` and the examples cannot drift apart.

Cases:
- the CRD names (group, version, kind, plural) are the ones ``api.py`` uses;
- every spec property in the CRD is an alias of a field of the matching model, and vice versa, recursively
  through nested models, lists and maps; every model reachable from the spec is compared;
- required fields, JSON types, enums, defaults and numeric/length bounds agree (the CRD may add bounds
  the models do not have, never lose one; a model constraint of a kind not compared fails);
- the reserved parameter names in the CEL rule are exactly ``api.RESERVED_PARAMETERS``;
- no reference in the spec has a ``namespace`` field, and nothing in the schema preserves unknown fields;
- the status schema has exactly the fields the operator's typed status writes (``status.EndpointStatus``
  fully set, its conditions, the targets' kinds and location fields), of the JSON types it writes;
- every SecuredEndpoint in ``examples/`` passes ``api.parse_spec``, every Secret and ConfigMap it refers to is
  in the same example, and the client and password Secrets have the keys it names.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import annotated_types
import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from secured_endpoint import api, status
from secured_endpoint.targets.redis import RedisTarget, UnconfiguredRedis
from secured_endpoint.targets.secret import SecretTarget

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "secured-endpoint.io_securedendpoints.yaml"
EXAMPLES = ROOT / "examples"

JSON_TYPES: dict[type, str] = {str: "string", int: "integer", bool: "boolean", list: "array", dict: "object"}


def _crd() -> dict[str, Any]:
    crd: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    return crd


def _version_schema() -> dict[str, Any]:
    (version,) = _crd()["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _spec_schema() -> dict[str, Any]:
    spec: dict[str, Any] = _version_schema()["properties"]["spec"]
    return spec


def _strip_optional(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _walk(model: type[BaseModel], schema: dict[str, Any], path: str) -> Iterator[tuple[str, FieldInfo, Any]]:
    """Yield ``(path, field, schema node)`` for every field of the model and its nested models.

    A field without a schema property is left out here: ``test_properties_are_the_model_aliases`` fails on it.
    """
    properties = schema.get("properties", {})
    for field in model.model_fields.values():
        alias = field.alias
        assert alias is not None
        node = properties.get(alias)
        if node is None:
            continue
        here = f"{path}.{alias}"
        yield here, field, node
        annotation = _strip_optional(field.annotation)
        origin = typing.get_origin(annotation)
        if origin is list:
            (item,) = typing.get_args(annotation)
            if isinstance(item, type) and issubclass(item, BaseModel):
                yield from _walk(item, node["items"], f"{here}[]")
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _walk(annotation, node, here)


def _models_and_schemas(
    model: type[BaseModel], schema: dict[str, Any], path: str = "spec",
) -> Iterator[tuple[str, type[BaseModel], dict[str, Any]]]:
    yield path, model, schema
    for here, field, node in _walk(model, schema, path):
        annotation = _strip_optional(field.annotation)
        if typing.get_origin(annotation) is list:
            (annotation,) = typing.get_args(annotation)
            node = node["items"]
            here += "[]"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield here, annotation, node


MODELS = list(_models_and_schemas(api.SecuredEndpointSpec, _spec_schema()))
FIELDS = list(_walk(api.SecuredEndpointSpec, _spec_schema(), "spec"))


def _ids(items: list[tuple[Any, ...]]) -> list[str]:
    return [str(item[0]) for item in items]


def _reachable_models(model: type[BaseModel]) -> set[type[BaseModel]]:
    """Every model the spec model uses, at any depth, found from the annotations alone."""
    found = {model}
    for field in model.model_fields.values():
        stack = [field.annotation]
        while stack:
            annotation = stack.pop()
            stack.extend(typing.get_args(annotation))
            if isinstance(annotation, type) and issubclass(annotation, BaseModel) and annotation not in found:
                found |= _reachable_models(annotation)
    return found


def test_every_model_and_field_is_compared() -> None:
    """The parametrized tests below run over MODELS and FIELDS: a model the walk missed would be checked by none."""
    assert {model for _, model, _ in MODELS} == _reachable_models(api.SecuredEndpointSpec)
    assert len(FIELDS) == sum(len(model.model_fields) for _, model, _ in MODELS), "a field without a schema node"


# -- names -----------------------------------------------------------------------------------------------


def test_crd_names_match_api() -> None:
    crd = _crd()
    assert crd["spec"]["group"] == api.GROUP
    assert crd["spec"]["names"]["kind"] == api.KIND
    assert crd["spec"]["names"]["plural"] == api.PLURAL
    assert crd["metadata"]["name"] == f"{api.PLURAL}.{api.GROUP}"
    (version,) = crd["spec"]["versions"]
    assert version["name"] == api.VERSION
    assert version["served"]
    assert version["storage"]


# -- structure ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "model", "schema"), MODELS, ids=_ids(MODELS))
def test_properties_are_the_model_aliases(path: str, model: type[BaseModel], schema: dict[str, Any]) -> None:
    aliases = {field.alias for field in model.model_fields.values()}
    properties = set(schema.get("properties", {}))
    assert properties - aliases == set(), f"{path}: in the CRD but not in {model.__name__}"
    assert aliases - properties == set(), f"{path}: in {model.__name__} but not in the CRD"
    assert schema.get("type") == "object"


@pytest.mark.parametrize(("path", "model", "schema"), MODELS, ids=_ids(MODELS))
def test_required_fields_agree(path: str, model: type[BaseModel], schema: dict[str, Any]) -> None:
    required = {field.alias for field in model.model_fields.values() if field.is_required()}
    assert set(schema.get("required", [])) == required, path


@pytest.mark.parametrize(("path", "field", "node"), FIELDS, ids=_ids(FIELDS))
def test_types_agree(path: str, field: FieldInfo, node: dict[str, Any]) -> None:
    annotation = _strip_optional(field.annotation)
    origin = typing.get_origin(annotation) or annotation
    if isinstance(origin, type) and issubclass(origin, BaseModel):
        assert node["type"] == "object", path
        return
    if isinstance(origin, type) and issubclass(origin, enum.Enum):
        assert node["type"] == "string", path
        assert node["enum"] == [member.value for member in origin], path
        return
    assert node["type"] == JSON_TYPES[origin], path
    if origin is dict:
        _, value_type = typing.get_args(annotation)
        assert node["additionalProperties"]["type"] == JSON_TYPES[value_type], path
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(item_type, type) and issubclass(item_type, BaseModel):
            assert node["items"]["type"] == "object", path
        else:
            assert node["items"]["type"] == JSON_TYPES[item_type], path


@pytest.mark.parametrize(("path", "field", "node"), FIELDS, ids=_ids(FIELDS))
def test_defaults_agree(path: str, field: FieldInfo, node: dict[str, Any]) -> None:
    if field.is_required() or field.default is None:
        assert "default" not in node, f"{path}: the model has no default"
        return
    if field.default_factory is not None:
        made = field.default_factory()  # type: ignore[call-arg]
        if "default" not in node:
            # An empty list/map or an all-default object: leaving it out of the stored object is equivalent.
            assert made == type(made)(), f"{path}: the model's default is not empty, the CRD has none"
            return
        if isinstance(made, BaseModel):
            assert type(made).model_validate(node["default"]) == made, path
        else:
            assert node["default"] == made, path
        return
    default = field.default.value if isinstance(field.default, enum.Enum) else field.default
    assert node.get("default") == default, f"{path}: CRD default differs from the model's"


BOUNDED = [item for item in FIELDS if item[1].metadata]


def test_some_fields_are_bounded() -> None:
    assert len(BOUNDED) >= 20, "the bounds comparison below would compare (almost) nothing"


@pytest.mark.parametrize(("path", "field", "node"), BOUNDED, ids=_ids(BOUNDED))
def test_model_bounds_are_in_the_crd(path: str, field: FieldInfo, node: dict[str, Any]) -> None:
    for constraint in field.metadata:
        match constraint:
            case annotated_types.Ge(ge=bound):
                assert node.get("minimum") == bound, path
            case annotated_types.Le(le=bound):
                assert node.get("maximum") == bound, path
            case annotated_types.MinLen(min_length=bound):
                assert node.get("minLength") == bound, path
            case annotated_types.MaxLen(max_length=bound):
                assert node.get("maxLength") == bound, path
            case _:
                pytest.fail(f"{path}: the model's constraint {constraint!r} is compared with nothing in the CRD")


def test_crd_bounds_no_looser_than_the_models() -> None:
    """A numeric bound in the CRD on a field the model does not bound would refuse what the operator takes;
    for integers that is a decision to make here, not by accident."""
    for path, field, node in FIELDS:
        kinds = {type(constraint) for constraint in field.metadata}
        if "minimum" in node:
            assert annotated_types.Ge in kinds, path
        if "maximum" in node:
            assert annotated_types.Le in kinds, path


# -- CEL rules and same-namespace references --------------------------------------------------------------


def test_reserved_parameter_names_match() -> None:
    name_node = _spec_schema()["properties"]["parameters"]["items"]["properties"]["name"]
    (rule,) = name_node["x-kubernetes-validations"]
    assert set(re.findall(r"'([^']+)'", rule["rule"])) == api.RESERVED_PARAMETERS


def _all_nodes(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _all_nodes(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _all_nodes(value, f"{path}/{index}")


def test_no_namespace_in_references() -> None:
    for path, node in _all_nodes(_spec_schema()):
        assert "namespace" not in node.get("properties", {}), f"{path}: references are same-namespace only"


def test_schema_is_closed() -> None:
    for path, node in _all_nodes(_version_schema()):
        assert not node.get("x-kubernetes-preserve-unknown-fields"), path


def _sample(annotation: Any) -> Any:
    """A value of a status field's type, for a status with every field set."""
    annotation = _strip_optional(annotation)
    origin = typing.get_origin(annotation) or annotation
    if annotation is int:
        return 3
    if annotation is str:
        return "x"
    if annotation is datetime:
        return datetime(2026, 1, 1, tzinfo=UTC)
    if origin is tuple and typing.get_args(annotation)[0] is status.Condition:
        return (status.Condition(type=api.CONDITION_READY, status="True", reason="TokenIssued", message="m",
                                 observed_generation=1, last_transition_time="2026-01-01T00:00:00Z"),)
    if origin is Mapping and typing.get_args(annotation) == (str, str):
        return {"Secret/oauth": "12"}
    if origin is Mapping:
        return {target.kind: {target.location_field: "where"} for target in TARGETS}
    pytest.fail(f"no sample for a status field of type {annotation!r}: teach _sample about it")


TARGETS = (SecretTarget, RedisTarget, UnconfiguredRedis)
STATUS_JSON_TYPES = {int: "integer", str: "string", bool: "boolean", list: "array", dict: "object"}


def test_status_has_the_operator_fields() -> None:
    schema = _version_schema()["properties"]["status"]["properties"]
    hints = typing.get_type_hints(status.EndpointStatus)
    full = status.EndpointStatus(**{field.name: _sample(hints[field.name])
                                    for field in dataclasses.fields(status.EndpointStatus)})
    written = full.to_json()
    assert set(written) == set(schema), "the status the operator writes and the CRD's status differ"
    for name, value in written.items():
        assert schema[name]["type"] == STATUS_JSON_TYPES[type(value)], name
        if schema[name].get("format") == "date-time":
            assert status.parse_timestamp(value) is not None, name

    conditions = schema["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(written["conditions"][0]) == set(item["properties"])
    assert set(item["required"]) <= set(status.Condition.from_json({}).to_json())
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]

    targets = schema["targets"]["properties"]
    assert {target.kind: {target.location_field} for target in TARGETS} == {
        kind: set(node["properties"]) for kind, node in targets.items()}


def test_every_property_has_a_description() -> None:
    for path, node in _all_nodes(_version_schema()):
        for name, prop in node.get("properties", {}).items():
            if name != "metadata":
                assert prop.get("description"), f"{path}/properties/{name}"


# -- examples ---------------------------------------------------------------------------------------------


def _example_documents() -> list[tuple[str, list[dict[str, Any]]]]:
    found = []
    # an example folder with a SecuredEndpoint; others (e.g. a gateway's configs) are not ours to parse
    for directory in sorted(path.parent for path in EXAMPLES.glob("*/securedendpoint.yaml")):
        documents = [
            document
            for file in sorted(directory.glob("*.yaml"))
            for document in yaml.safe_load_all(file.read_text())
            if document
        ]
        found.append((directory.name, documents))
    return found


EXAMPLE_DOCUMENTS = _example_documents()


def test_there_are_examples() -> None:
    assert len(EXAMPLE_DOCUMENTS) >= 3


@pytest.mark.parametrize(("example", "documents"), EXAMPLE_DOCUMENTS, ids=_ids(EXAMPLE_DOCUMENTS))
def test_example_parses(example: str, documents: list[dict[str, Any]]) -> None:
    endpoints = [doc for doc in documents if doc["kind"] == api.KIND]
    assert endpoints, f"{example} has no {api.KIND}"
    secrets = {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == "Secret"}
    for endpoint in endpoints:
        assert endpoint["apiVersion"] == f"{api.GROUP}/{api.VERSION}"
        spec = api.parse_spec(endpoint["spec"])
        present = {(doc["kind"], doc["metadata"]["name"]) for doc in documents}
        for ref in spec.referenced_sources():
            assert (ref.kind, ref.name) in present, f"{example}: {ref} is not in the example"
        wanted = [(spec.client_secret_ref.name, spec.client_secret_ref.client_id_key),
                  (spec.client_secret_ref.name, spec.client_secret_ref.client_secret_key)]
        if spec.password_secret_ref is not None:
            wanted += [(spec.password_secret_ref.name, spec.password_secret_ref.username_key),
                       (spec.password_secret_ref.name, spec.password_secret_ref.password_key)]
        for secret, key in wanted:
            assert secret in secrets, f"{example}: Secret {secret} is not in the example"
            assert key in secrets[secret].get("stringData", {}), f"{example}: Secret {secret} has no {key}"
