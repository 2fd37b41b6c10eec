"""Registry import and export as YAML documents (the `import_registry` and `export_registry` commands).

The document has two top-level lists, `pools` (each with its `backends`) and `models`; see docs/registry.md.
Its keys and their types are derived from the management API's serializers (backends/serializers.py): every
writable field is a key, so a field added there is exported and imported without a change here.
Export is deterministic (sorted by name) and leaves out health fields and, unless asked, backend API keys.
Import upserts by name inside one transaction, validates every row with `full_clean()` (the admin's rules) plus
structural checks, and either applies the whole document or changes nothing.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml
from django.core.exceptions import NON_FIELD_ERRORS, ImproperlyConfigured, ValidationError
from django.db import models, transaction
from django.db.models import ProtectedError
from rest_framework import serializers

from backends.models import Backend, GpuPool, ModelFallback, RouteKind, ServedModel, normalize_api_key
from backends.serializers import (
    BackendSerializer,
    GpuPoolSerializer,
    ModelRoutesField,
    ServedModelSerializer,
    model_route_entries,
    route_targets_check,
)
from backends.services import model_routes_replace, registry_version_bump_on_commit

TOP_LEVEL_KEYS = ("pools", "models")
ROUTE_KEYS = {"traffic_split": RouteKind.SPLIT, "shadows": RouteKind.SHADOW}
"""A model entry's lists of routes to other models, set after every model of the document exists."""


class RegistryImportError(Exception):
    """The document is invalid and nothing was changed; `errors` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


# --- YAML ------------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """Safe YAML loader that rejects a key repeated in one mapping (PyYAML silently keeps the last)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    """Build a mapping, raising on duplicate keys (merge keys `<<` excepted)."""
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: let the normal constructor report it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Dumper(yaml.SafeDumper):
    """Safe YAML dumper that indents list items under their key and writes multi-line strings as blocks."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        """Never use indentless sequences, so `backends:` items sit under their key."""
        super().increase_indent(flow, False)


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    """Write multi-line strings (pool descriptions) as literal blocks; PyYAML falls back to quotes if unsafe."""
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_Dumper.add_representer(str, _represent_str)


def registry_yaml_load(*, text: str) -> dict[str, Any]:
    """Parse a registry YAML document; raise RegistryImportError on syntax errors or a non-mapping document."""
    try:
        document = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise RegistryImportError([f"YAML syntax error: {where}{exc.problem or exc.context}"]) from exc
    except yaml.YAMLError as exc:
        raise RegistryImportError([f"YAML syntax error: {exc}"]) from exc
    if document is None:
        raise RegistryImportError(["document: the file is empty (expected a mapping with 'pools' and 'models')"])
    if not isinstance(document, dict):
        raise RegistryImportError([f"document: expected a mapping with 'pools' and 'models', got {_type(document)}"])
    return document


def registry_yaml_dump(*, document: dict[str, Any]) -> str:
    """Serialise a registry document to YAML, keeping key order (the export is already sorted)."""
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000)


# --- Export ----------------------------------------------------------------------------------------------------


def registry_export(*, include_secrets: bool = False) -> dict[str, Any]:
    """Return the whole registry as a document, sorted by name; API keys only when `include_secrets`.

    Every entry has every key of its schema (derived from the serializers), each as its serializer represents it.
    """
    schema = registry_schema()
    backends_by_pool: dict[int, list[dict[str, Any]]] = {}
    for b in Backend.objects.order_by("name"):
        backends_by_pool.setdefault(b.pool_id, []).append(schema["backends"].export(b, include_secrets=include_secrets))
    models = (
        ServedModel.objects.select_related("pool")
        .prefetch_related("fallbacks__pool", "routes__target")
        .order_by("name")
    )
    return {
        "pools": [
            schema["pools"].export(p, include_secrets=include_secrets, backends=backends_by_pool.get(p.pk, []))
            for p in GpuPool.objects.order_by("name")
        ],
        "models": [schema["models"].export(m, include_secrets=include_secrets) for m in models],
    }


# --- Import report ---------------------------------------------------------------------------------------------


@dataclass
class KindReport:
    """What an import did (or would do) to one kind of row; names in document order."""

    created: list[str] = field(default_factory=list)
    updated: dict[str, list[str]] = field(default_factory=dict)  # name -> changed fields
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Whether any row of this kind was created, updated or deleted."""
        return bool(self.created or self.updated or self.deleted)


@dataclass
class ImportReport:
    """Outcome of `registry_import`, per kind (pools, backends, models)."""

    dry_run: bool = False
    prune: bool = False
    pools: KindReport = field(default_factory=KindReport)
    backends: KindReport = field(default_factory=KindReport)
    models: KindReport = field(default_factory=KindReport)

    @property
    def changed(self) -> bool:
        """Whether the import changed (or would change) anything."""
        return self.pools.changed or self.backends.changed or self.models.changed

    def format(self) -> str:
        """Human-readable summary: counts per kind, then the names created, updated (with fields) and deleted."""
        lines = ["Dry run: nothing was saved. The import would do this:" if self.dry_run else "Imported the registry:"]
        for kind, rep in (("pools", self.pools), ("backends", self.backends), ("models", self.models)):
            counts = f"{len(rep.created)} created, {len(rep.updated)} updated, {len(rep.unchanged)} unchanged"
            if self.prune:
                counts += f", {len(rep.deleted)} deleted"
            lines.append(f"  {kind}: {counts}")
            if rep.created:
                lines.append(f"    created: {', '.join(rep.created)}")
            if rep.updated:
                lines.append(
                    "    updated: " + ", ".join(f"{name} ({', '.join(fields)})" for name, fields in rep.updated.items())
                )
            if rep.deleted:
                lines.append(f"    deleted: {', '.join(rep.deleted)}")
        if not self.changed:
            lines.append("  No changes.")
        return "\n".join(lines)


# --- Structural checks -----------------------------------------------------------------------------------------


def _type(value: Any) -> str:
    """Name a YAML value's type the way a YAML author thinks of it."""
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def _expect_str(value: Any) -> str | None:
    return None if isinstance(value, str) else f"expected a string, got {_type(value)}"


def _expect_bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected true or false, got {_type(value)}"


def _expect_int(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    return None if ok else f"expected an integer, got {_type(value)}"


def _expect_int_or_null(value: Any) -> str | None:
    return None if value is None else _expect_int(value)


def _expect_number(value: Any) -> str | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return None if ok else f"expected a number, got {_type(value)}"


def _expect_list(value: Any) -> str | None:
    return None if isinstance(value, list) else f"expected a list, got {_type(value)}"


def _expect_str_list(value: Any) -> str | None:
    if not isinstance(value, list):
        return f"expected a list of strings, got {_type(value)}"
    for i, item in enumerate(value):
        if not isinstance(item, str):
            return f"item {i}: expected a string, got {_type(item)}"
    return None


def _expect_route_list(value: Any) -> str | None:
    """A traffic split or shadow list: mappings with exactly `model` (a string) and `percent` (a number)."""
    if not isinstance(value, list):
        return f"expected a list of {{model, percent}} mappings, got {_type(value)}"
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            return f"item {i}: expected a mapping with 'model' and 'percent', got {_type(item)}"
        if set(item) != {"model", "percent"}:
            return f"item {i}: expected exactly the keys 'model' and 'percent', got {', '.join(map(str, item))}"
        problem = _expect_str(item["model"]) or _expect_number(item["percent"])
        if problem:
            return f"item {i}: {problem}"
    return None


Check = Callable[[Any], str | None]


def _check_for(serializer: type[serializers.Serializer], name: str, field: serializers.Field) -> Check:
    """The strict YAML type check of a serializer field (YAML has types: `1.0` is not the string "1.0")."""
    if isinstance(field, ModelRoutesField):
        check = _expect_route_list
    elif isinstance(field, serializers.BooleanField):
        check = _expect_bool
    elif isinstance(field, serializers.IntegerField):
        check = _expect_int
    elif isinstance(field, serializers.FloatField):
        check = _expect_number
    elif isinstance(field, serializers.ListField) and isinstance(field.child, serializers.CharField):
        check = _expect_str_list
    elif isinstance(field, serializers.CharField | serializers.ChoiceField | serializers.SlugRelatedField):
        check = _expect_str
    else:
        raise ImproperlyConfigured(
            f"registry YAML: no type check for {serializer.__name__}.{name} ({type(field).__name__}); "
            "add one in backends/registry_io.py:_check_for"
        )
    if getattr(field, "allow_null", False):
        return lambda value: None if value is None else check(value)
    return check


@dataclass(frozen=True)
class _Kind:
    """The YAML schema of one kind of entry, derived from its serializer: its writable fields, in their order."""

    serializer: type[serializers.ModelSerializer]
    keys: tuple[str, ...]  # export order
    schema: dict[str, tuple[Check, bool]]  # key -> (type check, required); what the import accepts
    secret: frozenset[str]  # write-only fields: exported only with include_secrets
    fields: dict[str, serializers.Field]

    @classmethod
    def derive(
        cls,
        serializer: type[serializers.ModelSerializer],
        *,
        nested_in_parent: tuple[str, ...] = (),
        children: tuple[str, ...] = (),
        import_only: tuple[str, ...] = (),
    ) -> _Kind:
        """Every writable field of the serializer but `nested_in_parent` (the entry's place in the document gives
        it), then the lists of `children` entries (exported), then `import_only` string keys (`api_key_env`)."""
        fields = {
            name: field
            for name, field in serializer().fields.items()
            if not field.read_only and name not in nested_in_parent
        }
        schema = {name: (_check_for(serializer, name, f), f.required) for name, f in fields.items()}
        schema.update({name: (_expect_list, False) for name in children})
        schema.update({name: (_expect_str, False) for name in import_only})
        keys = (*fields, *children)
        secret = frozenset(name for name, f in fields.items() if f.write_only)
        return cls(serializer, keys, schema, secret, fields)

    @property
    def settable(self) -> tuple[str, ...]:
        """Keys copied onto the row as they are: not the name (the lookup key), nor the relations and children,
        which the importer resolves by name (`pool`, `fallback_pools`, `backends`)."""
        return tuple(k for k in self.keys if k not in {*ROUTE_KEYS, "name", "pool", "fallback_pools", "backends"})

    def export(self, row: Any, *, include_secrets: bool, **given: Any) -> dict[str, Any]:
        """The entry of a row: each key's value as its serializer field represents it, unless `given`."""
        entry: dict[str, Any] = {}
        for key in self.keys:
            if key in self.secret and not include_secrets:
                continue
            if key in given:
                entry[key] = given[key]
                continue
            field = self.fields[key]
            value = field.get_attribute(row)
            entry[key] = None if value is None else field.to_representation(value)
        return entry


@functools.cache
def registry_schema() -> dict[str, _Kind]:
    """The YAML schema of pools, backends and models, derived from the serializers once (on first use: building
    serializer fields at import time would import DRF's settings too early)."""
    return {
        "pools": _Kind.derive(GpuPoolSerializer, children=("backends",)),
        "backends": _Kind.derive(BackendSerializer, nested_in_parent=("pool",), import_only=("api_key_env",)),
        "models": _Kind.derive(ServedModelSerializer),
    }


@dataclass
class _Entry:
    """One structurally valid document entry, with where it is (for messages)."""

    label: str
    data: dict[str, Any]
    parent: _Entry | None = None  # a backend's pool entry
    ok: bool = True  # cleared when the row failed validation (its children are then only validated, not saved)

    @property
    def name(self) -> str:
        """The entry's name (checked to be a string)."""
        return self.data["name"]


def _by_model(entry: dict[str, Any]) -> str:
    return str(entry["model"])


def _label(where: str, entry: Any) -> str:
    """`models[2] (name: llama-70b)`, or just `models[2]` when the entry has no usable name."""
    name = entry.get("name") if isinstance(entry, dict) else None
    return f"{where} (name: {name})" if isinstance(name, str) and name else where


def _check_entry(entry: Any, where: str, schema: dict[str, tuple[Check, bool]], errors: list[str]) -> bool:
    """Check one entry's keys and value types against its schema; append problems to `errors`."""
    label = _label(where, entry)
    if not isinstance(entry, dict):
        errors.append(f"{where}: expected a mapping, got {_type(entry)}")
        return False
    ok = True
    for key in entry:
        if key not in schema:
            errors.append(f"{label}: field {key!r}: unknown key (allowed: {', '.join(schema)})")
            ok = False
    for key, (check, required) in schema.items():
        if key not in entry:
            if required:
                errors.append(f"{label}: field {key!r}: required")
                ok = False
            continue
        problem = check(entry[key])
        if problem:
            errors.append(f"{label}: field {key!r}: {problem}")
            ok = False
    return ok


def _messages(exc: ValidationError) -> list[tuple[str | None, str]]:
    """Flatten a ValidationError into (field or None, message) pairs."""
    if hasattr(exc, "error_dict"):
        return [
            (None if name == NON_FIELD_ERRORS else name, message)
            for name, messages in exc.message_dict.items()
            for message in messages
        ]
    return [(None, message) for message in exc.messages]


# --- Import ----------------------------------------------------------------------------------------------------


_ERROR_PATH = re.compile(r"^(document|pools|models)(?:\[(\d+)\])?(?:\.backends\[(\d+)\])?")


def _error_order(error: str) -> tuple[int, int, int]:
    """Sort key putting errors in document order (structural and model-validation errors interleaved)."""
    match = _ERROR_PATH.match(error)
    if not match:
        return (3, 0, 0)
    kind, index, backend = match.groups()
    unindexed = 1 << 30  # prune errors name no index: after the entries of their kind
    return (
        ("document", "pools", "models").index(kind),
        int(index) if index else unindexed,
        int(backend) if backend else -1,
    )


class _DryRunRollback(Exception):
    """Raised inside the import transaction to roll a dry run back."""


def registry_import(*, document: dict[str, Any], dry_run: bool = False, prune: bool = False) -> ImportReport:
    """Apply a registry document in one transaction (upsert by name; delete the rest with `prune`).

    Raises RegistryImportError listing every problem found (nothing is changed then). With `dry_run`, the
    changes are made, reported and rolled back. A successful import bumps the registry version once on commit.
    """
    report = ImportReport(dry_run=dry_run, prune=prune)
    try:
        with transaction.atomic():
            _Importer(document=document, prune=prune, report=report).run()
            if dry_run:
                raise _DryRunRollback
            registry_version_bump_on_commit()
    except _DryRunRollback:
        pass
    return report


class _Importer:
    """One import run: structural checks, then upserts and deletes with model validation, inside a transaction."""

    def __init__(self, *, document: dict[str, Any], prune: bool, report: ImportReport) -> None:
        self.document = document
        self.prune = prune
        self.report = report
        self.errors: list[str] = []
        self.pools: list[_Entry] = []
        self.backends: list[_Entry] = []
        self.models: list[_Entry] = []
        # Names used anywhere in the document (even in entries with errors), so prune never deletes them.
        self.named: dict[str, set[str]] = {"pools": set(), "backends": set(), "models": set()}
        self._first_seen: dict[tuple[str, str], str] = {}  # (kind, name): where it is first named
        self.pool_rows: dict[str, GpuPool] = {p.name: p for p in GpuPool.objects.all()}
        self.model_rows: dict[str, ServedModel] = {}

    def run(self) -> None:
        """Check, apply, prune; raise RegistryImportError if anything was wrong."""
        self._check_document()
        if self.prune:
            self._prune(ServedModel, "models", self.report.models)
        self._upsert_pools()
        self._upsert_backends()
        self._upsert_models()
        if self.prune and not self.errors:
            self._prune(Backend, "backends", self.report.backends)
            self._prune(GpuPool, "pools", self.report.pools)
        if self.errors:
            raise RegistryImportError(sorted(self.errors, key=_error_order))

    # Structure -------------------------------------------------------------------------------------------------

    def _check_document(self) -> None:
        """Check keys, types, required fields, duplicate names and pool references; keep the valid entries."""
        doc = self.document
        if not isinstance(doc, dict):
            self.errors.append(f"document: expected a mapping with 'pools' and 'models', got {_type(doc)}")
            return
        self._check_top_level(doc)
        schema = registry_schema()
        pools_doc, models_doc = doc.get("pools"), doc.get("models")
        for i, raw in enumerate(pools_doc if isinstance(pools_doc, list) else []):
            self._check_pool(raw, f"pools[{i}]", schema)
        known_pools = self.named["pools"] | (set() if self.prune else set(self.pool_rows))
        for i, raw in enumerate(models_doc if isinstance(models_doc, list) else []):
            self._check_model(raw, f"models[{i}]", schema, known_pools)

    def _check_top_level(self, doc: dict[str, Any]) -> None:
        """Only the known top-level keys, each a list; all of them with --prune."""
        for key in doc:
            if key not in TOP_LEVEL_KEYS:
                self.errors.append(f"document: field {key!r}: unknown key (allowed: {', '.join(TOP_LEVEL_KEYS)})")
        for key in TOP_LEVEL_KEYS:
            if key not in doc and self.prune:
                self.errors.append(
                    f"document: field {key!r}: required with --prune (use [] to delete every {key[:-1]})"
                )
            elif key in doc and not isinstance(doc[key], list):
                self.errors.append(f"document: field {key!r}: expected a list, got {_type(doc[key])}")

    def _unique(self, kind: str, where: str, entry: dict[str, Any]) -> bool:
        """Record the entry's name as used; False (with an error) when an earlier entry of the kind has it."""
        name = entry.get("name")
        if not isinstance(name, str):
            return True
        self.named[kind].add(name)
        if (kind, name) in self._first_seen:
            self.errors.append(f"{_label(where, entry)}: field 'name': duplicate of {self._first_seen[kind, name]}")
            return False
        self._first_seen[kind, name] = where
        return True

    def _check_pool(self, raw: Any, where: str, schema: dict[str, _Kind]) -> None:
        """One pool entry and its nested backends (kept only when the pool is valid too)."""
        ok = _check_entry(raw, where, schema["pools"].schema, self.errors)
        ok = self._unique("pools", where, raw) and ok if isinstance(raw, dict) else ok
        pool = _Entry(_label(where, raw), raw) if ok else None
        if pool:
            self.pools.append(pool)
        backends_raw = raw.get("backends", []) if isinstance(raw, dict) else []
        for j, braw in enumerate(backends_raw if isinstance(backends_raw, list) else []):
            bwhere = f"{where}.backends[{j}]"
            bok = _check_entry(braw, bwhere, schema["backends"].schema, self.errors)
            bok = self._unique("backends", bwhere, braw) and bok if isinstance(braw, dict) else bok
            if bok and "api_key" in braw and "api_key_env" in braw:
                self.errors.append(
                    f"{_label(bwhere, braw)}: field 'api_key_env': give api_key or api_key_env, not both"
                )
                bok = False
            if bok and pool:
                self.backends.append(_Entry(_label(bwhere, braw), braw, parent=pool))

    def _check_model(self, raw: Any, where: str, schema: dict[str, _Kind], known_pools: set[str]) -> None:
        """One model entry: its fields, a unique name, and its pool and fallback pools known."""
        ok = _check_entry(raw, where, schema["models"].schema, self.errors)
        if not isinstance(raw, dict):
            return
        ok = self._unique("models", where, raw) and ok
        label = _label(where, raw)
        pool = raw.get("pool")
        if isinstance(pool, str) and pool not in known_pools:
            self.errors.append(f"{label}: field 'pool': unknown pool {pool!r}")
            ok = False
        ok = self._check_fallback_pools(label, pool, raw.get("fallback_pools"), known_pools) and ok
        if ok:
            self.models.append(_Entry(label, raw))

    def _check_fallback_pools(self, label: str, pool: Any, fallbacks: Any, known_pools: set[str]) -> bool:
        """A model's fallback pools are known, listed once each, and not its own pool (a wrong type is reported by
        the field check)."""
        if not (isinstance(fallbacks, list) and all(isinstance(f, str) for f in fallbacks)):
            return True
        ok = True
        for f in fallbacks:
            if f not in known_pools:
                self.errors.append(f"{label}: field 'fallback_pools': unknown pool {f!r}")
                ok = False
        if len(set(fallbacks)) != len(fallbacks):
            self.errors.append(f"{label}: field 'fallback_pools': a pool is listed more than once")
            ok = False
        if pool in fallbacks:
            self.errors.append(f"{label}: field 'fallback_pools': the model's own pool {pool!r} cannot be a fallback")
            ok = False
        return ok

    # Upserts ---------------------------------------------------------------------------------------------------

    def _validate(
        self,
        obj: models.Model,
        entry: _Entry,
        *,
        exclude: list[str] | None = None,
        rename: dict[str, str] | None = None,
    ) -> bool:
        """Run `full_clean()`; record each message as `<entry>: field '<f>': <message>`."""
        try:
            obj.full_clean(exclude=exclude)
        except ValidationError as exc:
            for name, message in _messages(exc):
                name = (rename or {}).get(name, name) if name else None
                self.errors.append(f"{entry.label}: field {name!r}: {message}" if name else f"{entry.label}: {message}")
            entry.ok = False
            return False
        return True

    def _apply(
        self,
        obj: models.Model,
        values: dict[str, Any],
        tracked: tuple[str, ...],
        entry: _Entry,
        kind: KindReport,
        *,
        save: bool = True,
        exclude: list[str] | None = None,
        extra_changes: list[str] | None = None,
    ) -> bool:
        """Set values, validate, save if anything changed, and record created/updated/unchanged in `kind`."""
        before = {f: getattr(obj, f) for f in tracked} if obj.pk else None
        for key, value in values.items():
            setattr(obj, key, value)
        if not self._validate(obj, entry, exclude=exclude) or not save:
            return False
        if before is None:
            obj.save()
            kind.created.append(entry.name)
            return True
        changed = [f.removesuffix("_id") for f in tracked if getattr(obj, f) != before[f]] + (extra_changes or [])
        if changed:
            obj.save()
            kind.updated[entry.name] = changed
        else:
            kind.unchanged.append(entry.name)
        return True

    def _upsert_pools(self) -> None:
        """Create or update each pool from its entry."""
        settable = registry_schema()["pools"].settable
        for entry in self.pools:
            row = self.pool_rows.get(entry.name) or GpuPool(name=entry.name)
            values = {k: entry.data[k] for k in settable if k in entry.data}
            if self._apply(row, values, settable, entry, self.report.pools):
                self.pool_rows[entry.name] = row

    def _upsert_backends(self) -> None:
        """Create or update each backend (moving it to its entry's pool if needed)."""
        tracked = ("pool_id", *registry_schema()["backends"].settable)
        existing = {b.name: b for b in Backend.objects.filter(name__in=[e.name for e in self.backends])}
        for entry in self.backends:
            data = entry.data
            row = existing.get(entry.name) or Backend(name=entry.name)
            values = {k: data[k] for k in tracked[1:] if k in data}
            if "api_key_env" in data:
                # A secret file mounted into the variable ends with a newline: stripped, as on every save.
                key = normalize_api_key(os.environ.get(data["api_key_env"], ""))
                if not key:
                    variable = data["api_key_env"]
                    self.errors.append(
                        f"{entry.label}: field 'api_key_env': environment variable {variable!r} is not set or empty"
                    )
                    entry.ok = False
                    continue
                values["api_key"] = key
            assert entry.parent is not None
            parent_ok = entry.parent.ok and entry.parent.name in self.pool_rows
            if parent_ok:
                values["pool"] = self.pool_rows[entry.parent.name]
            self._apply(
                row,
                values,
                tracked,
                entry,
                self.report.backends,
                save=parent_ok,
                exclude=None if parent_ok else ["pool"],
            )

    def _upsert_models(self) -> None:
        """Create or update each model and replace its fallback pools when their list changed."""
        tracked = ("pool_id", *registry_schema()["models"].settable)
        existing = {m.name: m for m in ServedModel.objects.filter(name__in=[e.name for e in self.models])}
        current_fallbacks: dict[int, list[str]] = {}
        for fb in ModelFallback.objects.filter(model__in=existing.values()).select_related("pool"):
            current_fallbacks.setdefault(fb.model_id, []).append(fb.pool.name)
        # Free the aliases that change first, so an alias can move from one model to another in any order.
        moving = [
            row.pk
            for e in self.models
            if (row := existing.get(e.name)) and "aliases" in e.data and e.data["aliases"] != row.aliases
        ]
        ServedModel.objects.filter(pk__in=moving).update(aliases=[])

        for entry in self.models:
            data = entry.data
            row = existing.get(entry.name) or ServedModel(name=entry.name)
            values = {k: data[k] for k in tracked[1:] if k in data}
            pool = self.pool_rows.get(data["pool"])
            pools_ok = all(p in self.pool_rows for p in [data["pool"], *data.get("fallback_pools", [])])
            if pool is not None:
                values["pool"] = pool
            old_fallbacks = current_fallbacks.get(row.pk, []) if row.pk else []
            new_fallbacks = data.get("fallback_pools", old_fallbacks)
            fallbacks_changed = new_fallbacks != old_fallbacks
            saved = self._apply(
                row,
                values,
                tracked,
                entry,
                self.report.models,
                save=pools_ok,
                exclude=None if pool is not None else ["pool"],
                extra_changes=["fallback_pools"] if fallbacks_changed and row.pk else None,
            )
            if saved and fallbacks_changed:
                self._fallbacks_replace(row, new_fallbacks, entry)
            if saved:
                self.model_rows[entry.name] = row
        for entry in self.models:  # every model of the document exists now: routes may point at any of them
            row = self.model_rows.get(entry.name)
            if row is not None and entry.ok:
                self._routes_replace(row, entry)

    def _routes_replace(self, model: ServedModel, entry: _Entry) -> None:
        """Replace the model's traffic split and shadows given in its entry (unchanged when the key is absent)."""
        for key, kind in ROUTE_KEYS.items():
            entries = entry.data.get(key)
            if entries is None:
                continue
            before = model_route_entries(model, kind)
            wanted = sorted(({"model": e["model"], "percent": float(e["percent"])} for e in entries), key=_by_model)
            problems = route_targets_check(name=model.name, kind=kind, entries=wanted)
            names = [e["model"] for e in wanted]
            targets = {m.name: m for m in ServedModel.objects.filter(name__in=names)}
            problems += [f"unknown model {n!r}" for n in names if n not in targets]
            if problems:
                self.errors.extend(f"{entry.label}: field {key!r}: {p}" for p in problems)
                entry.ok = False
                continue
            if wanted == before:
                continue
            try:
                model_routes_replace(
                    model=model, kind=kind, entries=[(targets[e["model"]], e["percent"]) for e in wanted]
                )
            except ValidationError as exc:
                self.errors.extend(f"{entry.label}: field {key!r}: {m}" for _, m in _messages(exc))
                entry.ok = False
                continue
            if entry.name in self.report.models.unchanged:
                self.report.models.unchanged.remove(entry.name)
            if entry.name not in self.report.models.created:
                self.report.models.updated.setdefault(entry.name, []).append(key)

    def _fallbacks_replace(self, model: ServedModel, pool_names: list[str], entry: _Entry) -> None:
        """Replace a model's fallback pools with the given ordered list."""
        ModelFallback.objects.filter(model=model).delete()
        for position, name in enumerate(pool_names):
            fallback = ModelFallback(model=model, pool=self.pool_rows[name], position=position)
            if self._validate(fallback, entry, rename={"pool": "fallback_pools"}):
                fallback.save()

    # Prune -----------------------------------------------------------------------------------------------------

    def _prune(self, model: type[GpuPool | Backend | ServedModel], kind_name: str, kind: KindReport) -> None:
        """Delete the rows of one kind whose names are not in the document."""
        for row in model.objects.exclude(name__in=self.named[kind_name]).order_by("name"):
            name = row.name
            try:
                row.delete()
            except ProtectedError as exc:
                users = ", ".join(sorted(str(o) for o in exc.protected_objects))
                self.errors.append(f"{kind_name} (name: {name}): cannot delete, still used by {users}")
                continue
            kind.deleted.append(name)
            if model is GpuPool:
                self.pool_rows.pop(name, None)
