"""Strict params checking, like the gateway's schemas (every object is
additionalProperties:false). Error texts read like the real ones, e.g.
"must have required property 'key'; at root: unexpected property 'bogus'".

Each method family declares its methods' params where it registers them
(`@method(..., params=Schema(...))`); this module holds the checker, the field kinds and the
connect schema."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Field kinds: string, nonempty, integer, number, boolean, array, strings (array of
# strings), object, any.


@dataclass(frozen=True, slots=True)
class Field:
    kind: str
    nullable: bool = False
    minimum: int | None = None
    maximum: int | None = None
    enum: tuple[str, ...] | None = None
    nested: Schema | None = None


@dataclass(frozen=True, slots=True)
class Schema:
    fields: Mapping[str, Field] = field(default_factory=dict)
    required: tuple[str, ...] = ()


_KIND_TEXT = {
    "string": "string",
    "nonempty": "string",
    "integer": "integer",
    "number": "number",
    "boolean": "boolean",
    "array": "array",
    "strings": "array",
    "object": "object",
}


def _type_ok(kind: str, value: Any) -> bool:
    if kind in ("string", "nonempty"):
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind in ("array", "strings"):
        return isinstance(value, list)
    if kind == "object":
        return isinstance(value, dict)
    return True


def check(schema: Schema, value: Any, path: str = "") -> list[str]:
    """All the errors of `value` against `schema`, in the gateway's wording."""
    where = f"at {path}: " if path else ""
    if not isinstance(value, dict):
        return [f"{where}must be object"]
    errors = [
        f"{where}must have required property '{name}'"
        for name in schema.required
        if name not in value
    ]
    for name in value:
        if name not in schema.fields:
            errors.append(f"at {path or 'root'}: unexpected property '{name}'")
    for name, spec in schema.fields.items():
        if name in value:
            errors.extend(_check_field(spec, value[name], f"{path}/{name}"))
    return errors


def _check_field(spec: Field, value: Any, path: str) -> list[str]:
    if value is None and spec.nullable:
        return []
    if not _type_ok(spec.kind, value):
        return [f"at {path}: must be {_KIND_TEXT.get(spec.kind, spec.kind)}"]
    if spec.kind == "nonempty" and not value:
        return [f"at {path}: must NOT have fewer than 1 characters"]
    if spec.kind == "strings" and not all(isinstance(v, str) for v in value):
        return [f"at {path}: must be array of strings"]
    if spec.enum is not None and value not in spec.enum:
        return [f"at {path}: must be equal to one of the allowed values"]
    if spec.minimum is not None and value < spec.minimum:
        return [f"at {path}: must be >= {spec.minimum}"]
    if spec.maximum is not None and value > spec.maximum:
        return [f"at {path}: must be <= {spec.maximum}"]
    if spec.nested is not None:
        return check(spec.nested, value, path)
    return []


S = Field("string")
NE = Field("nonempty")
INT = Field("integer")
BOOL = Field("boolean")
ANY = Field("any")
ARR = Field("array")
STRS = Field("strings")
OBJ = Field("object")
NS = Field("string", nullable=True)  # nullable string (sessions.patch)
NANY = Field("any", nullable=True)
NO_PARAMS = Schema()

CLIENT_IDS = (
    "webchat-ui",
    "openclaw-control-ui",
    "openclaw-tui",
    "webchat",
    "cli",
    "gateway-client",
    "openclaw-macos",
    "openclaw-ios",
    "openclaw-android",
    "node-host",
    "test",
    "fingerprint",
    "openclaw-probe",
)
CLIENT_MODES = ("webchat", "cli", "ui", "backend", "node", "probe", "test")


def connect_schema(protocol: int) -> Schema:
    client_fields: dict[str, Field] = {
        "id": Field("nonempty", enum=CLIENT_IDS),
        "version": NE,
        "platform": NE,
        "mode": Field("nonempty", enum=CLIENT_MODES),
        "displayName": S,
        "deviceFamily": S,
        "modelIdentifier": S,
        "instanceId": S,
    }
    if protocol >= 4:
        client_fields["buildId"] = S
    client = Schema(client_fields, ("id", "version", "platform", "mode"))
    auth = Schema(
        {"token": S, "password": S, "deviceToken": S, "bootstrapToken": S},
    )
    device = Schema(
        {"id": NE, "publicKey": NE, "signature": NE, "signedAt": INT, "nonce": S},
        ("id", "publicKey", "signature", "signedAt"),
    )
    return Schema(
        {
            "minProtocol": Field("integer", minimum=1),
            "maxProtocol": Field("integer", minimum=1),
            "client": Field("object", nested=client),
            "role": NE,
            "scopes": STRS,
            "caps": STRS,
            "commands": STRS,
            "permissions": OBJ,
            "pathEnv": S,
            "locale": S,
            "userAgent": S,
            "auth": Field("object", nested=auth),
            "device": Field("object", nested=device),
        },
        ("minProtocol", "maxProtocol", "client"),
    )
