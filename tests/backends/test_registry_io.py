"""Registry YAML import/export: round trip, secrets policy, all-or-nothing validation, dry run, prune, version."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db.models import Model as DjangoModel

from backends.models import Backend, GpuPool, ModelFallback, ModelRoute, ServedModel
from backends.registry_io import (
    RegistryImportError,
    registry_export,
    registry_import,
    registry_yaml_dump,
    registry_yaml_load,
)
from backends.selectors import registry_version_get
from tests.factories import backend_create, model_create, pool_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def registry() -> None:
    """Two pools with backends (one with a key), three models, one with ordered fallbacks and aliases."""
    gpu_a = pool_create(name="gpu-a", description="A100 nodes\nrack 3")
    gpu_b = pool_create(name="gpu-b", enabled=False)
    gpu_c = pool_create(name="gpu-c")
    backend_create(pool=gpu_a, name="a2", base_url="http://a2.internal:8000/v1/", api_key="sk-a2", weight=3)
    backend_create(pool=gpu_a, name="a1", base_url="http://a1.internal:8000", read_timeout_s=60)
    backend_create(pool=gpu_b, name="b1", base_url="https://b1.internal", state="draining", status="healthy")
    llama = model_create(pool=gpu_a, name="llama-70b", served_name="meta/llama", aliases=["llama", "l70"])
    ModelFallback.objects.create(model=llama, pool=gpu_c, position=0)
    ModelFallback.objects.create(model=llama, pool=gpu_b, position=1)
    model_create(pool=gpu_b, name="embed", kind="embedding", max_context_length=512)
    model_create(pool=gpu_c, name="aardvark", enabled=False)


def _wipe() -> None:
    ServedModel.objects.all().delete()
    GpuPool.objects.all().delete()


def _import_file(tmp_path: Path, text: str, *args: str) -> str:
    """Run `import_registry` on a file and return its stdout."""
    path = tmp_path / "registry.yaml"
    path.write_text(text)
    out = io.StringIO()
    call_command("import_registry", str(path), *args, stdout=out)
    return out.getvalue()


def _doc(pools: list[dict[str, Any]] | None = None, models: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"pools": pools or [], "models": models or []}


# --- Export ----------------------------------------------------------------------------------------------------


def test_export_is_sorted_without_health_or_secrets(registry: None) -> None:
    doc = registry_export()
    assert [p["name"] for p in doc["pools"]] == ["gpu-a", "gpu-b", "gpu-c"]
    assert [b["name"] for b in doc["pools"][0]["backends"]] == ["a1", "a2"]
    assert [m["name"] for m in doc["models"]] == ["aardvark", "embed", "llama-70b"]
    assert doc["pools"][0]["backends"][1] == {
        "name": "a2",
        "base_url": "http://a2.internal:8000",
        "weight": 3,
        "max_concurrent_requests": 0,
        "connect_timeout_s": 5.0,
        "read_timeout_s": 120.0,
        "state": "enabled",
    }
    assert doc["models"][2] == {
        "name": "llama-70b",
        "served_name": "meta/llama",
        "aliases": ["llama", "l70"],
        "kind": "chat",
        "pool": "gpu-a",
        "fallback_pools": ["gpu-c", "gpu-b"],
        "max_context_length": None,
        "enabled": True,
        "split_sticky_key": "",
        "traffic_split": [],
        "shadows": [],
    }
    text = registry_yaml_dump(document=doc)
    assert "sk-a2" not in text and "api_key" not in text and "status" not in text


def test_export_with_secrets_includes_every_key(registry: None) -> None:
    keys = {b["name"]: b["api_key"] for p in registry_export(include_secrets=True)["pools"] for b in p["backends"]}
    assert keys == {"a1": "", "a2": "sk-a2", "b1": ""}


def test_export_command_warns_about_secrets_and_writes_private_file(registry: None, tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    call_command("export_registry", stdout=out, stderr=err)
    assert out.getvalue() == registry_yaml_dump(document=registry_export())
    assert err.getvalue() == ""

    target = tmp_path / "secret.yaml"
    call_command("export_registry", "--include-secrets", "--output", str(target), stdout=out, stderr=err)
    assert "API keys" in err.getvalue()
    assert "sk-a2" in target.read_text()
    assert target.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("include_secrets", [False, True])
def test_round_trip_into_empty_database(registry: None, include_secrets: bool) -> None:
    text = registry_yaml_dump(document=registry_export(include_secrets=include_secrets))
    _wipe()
    report = registry_import(document=registry_yaml_load(text=text))
    assert report.pools.created == ["gpu-a", "gpu-b", "gpu-c"]
    assert registry_yaml_dump(document=registry_export(include_secrets=include_secrets)) == text
    assert "    description: |-\n      A100 nodes\n      rack 3\n" in text
    again = registry_import(document=registry_yaml_load(text=text))
    assert not again.changed
    assert len(again.models.unchanged) == 3


# --- Import: validation, all or nothing ------------------------------------------------------------------------


def test_bad_entry_changes_nothing_and_names_entry_and_field(registry: None, tmp_path: Path) -> None:
    doc = registry_export()
    doc["pools"][0]["description"] = "changed"
    doc["pools"][0]["backends"][1]["base_url"] = "ftp://a2.internal"
    doc["models"].append({"name": "new-model", "pool": "gpu-a"})
    before = registry_export(include_secrets=True)
    with pytest.raises(CommandError) as caught:
        _import_file(tmp_path, registry_yaml_dump(document=doc))
    message = str(caught.value)
    assert "1 error, nothing was changed" in message
    assert "pools[0].backends[1] (name: a2): field 'base_url': Use an http:// or https:// URL with a host." in message
    assert registry_export(include_secrets=True) == before


def test_unknown_key_rejected() -> None:
    doc = _doc([{"name": "p", "colour": "red", "backends": [{"name": "b", "base_url": "http://x.io", "wieght": 2}]}])
    with pytest.raises(RegistryImportError) as caught:
        registry_import(document=doc)
    assert caught.value.errors == [
        "pools[0] (name: p): field 'colour': unknown key "
        "(allowed: name, description, routing_strategy, affinity_key, priority_scheduling, enabled, backends)",
        "pools[0].backends[0] (name: b): field 'wieght': unknown key (allowed: name, base_url, api_key, "
        "weight, max_concurrent_requests, connect_timeout_s, read_timeout_s, state, api_key_env)",
    ]
    assert not GpuPool.objects.exists()


def test_unknown_pool_reference_is_reported_via_command(registry: None, tmp_path: Path) -> None:
    text = registry_yaml_dump(document=registry_export()).replace("pool: gpu-a", "pool: gpu-z")
    with pytest.raises(CommandError, match=r"models\[2\] \(name: llama-70b\): field 'pool': unknown pool 'gpu-z'"):
        _import_file(tmp_path, text)
    assert ServedModel.objects.get(name="llama-70b").pool.name == "gpu-a"


def test_every_error_is_collected() -> None:
    doc = {
        "pools": [
            {"name": "p1", "enabled": "yes", "backends": [{"name": "b1"}]},
            {"name": "p1"},
            {"name": "bad name", "routing_strategy": "random"},
            "p3",
        ],
        "models": [
            {"name": "m1", "pool": "p1", "fallback_pools": ["p1", "nope"], "max_context_length": 1.5},
            {"name": "m2", "pool": "p1", "weight": 1, "kind": "speech"},
            {"name": "m3", "pool": "p9"},
        ],
        "extra": 1,
    }
    with pytest.raises(RegistryImportError) as caught:
        registry_import(document=doc)
    errors = caught.value.errors
    expected = [
        "document: field 'extra': unknown key (allowed: pools, models)",
        "pools[0] (name: p1): field 'enabled': expected true or false, got a string",
        "pools[0].backends[0] (name: b1): field 'base_url': required",
        "pools[1] (name: p1): field 'name': duplicate of pools[0]",
        "pools[3]: expected a mapping, got a string",
        "models[0] (name: m1): field 'max_context_length': expected an integer, got a number",
        "models[0] (name: m1): field 'fallback_pools': unknown pool 'nope'",
        "models[0] (name: m1): field 'fallback_pools': the model's own pool 'p1' cannot be a fallback",
        "models[1] (name: m2): field 'weight': unknown key (allowed: name, served_name, aliases, kind, pool, "
        "fallback_pools, max_context_length, enabled, split_sticky_key, traffic_split, shadows)",
        "models[2] (name: m3): field 'pool': unknown pool 'p9'",
    ]
    for line in expected:
        assert line in errors
    # Structurally sound entries are still validated by full_clean (the admin's rules).
    assert any(e.startswith("pools[2] (name: bad name): field 'name': Use letters") for e in errors)
    assert "pools[2] (name: bad name): field 'routing_strategy': Value 'random' is not a valid choice." in errors
    assert not GpuPool.objects.exists()


def test_model_rules_from_full_clean_apply(registry: None) -> None:
    doc = registry_export()
    doc["models"][1]["aliases"] = ["llama"]  # already an alias of llama-70b
    doc["models"][0]["kind"] = "speech"
    with pytest.raises(RegistryImportError) as caught:
        registry_import(document=doc)
    assert caught.value.errors == [
        "models[0] (name: aardvark): field 'kind': Value 'speech' is not a valid choice.",
        "models[1] (name: embed): field 'aliases': 'llama' is already used by model 'llama-70b'.",
    ]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("pools: [\n", "YAML syntax error: line 2, column 1:"),
        ("pools: []\npools: []\n", "found duplicate key 'pools'"),
        ("", "document: the file is empty"),
        ("- a\n", "document: expected a mapping with 'pools' and 'models', got a list"),
    ],
)
def test_unreadable_yaml_is_a_clean_error(text: str, error: str, tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="nothing was changed") as caught:
        _import_file(tmp_path, text)
    assert error in str(caught.value)


def test_missing_file_is_a_command_error(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="cannot read"):
        call_command("import_registry", str(tmp_path / "missing.yaml"))


# --- Import: behaviour -----------------------------------------------------------------------------------------


def test_dry_run_reports_and_changes_nothing(registry: None, tmp_path: Path) -> None:
    doc = registry_export()
    doc["pools"][0]["backends"][0]["weight"] = 5
    doc["pools"].append({"name": "gpu-d", "backends": [{"name": "d1", "base_url": "http://d1.internal:8000"}]})
    doc["models"] = [m for m in doc["models"] if m["name"] != "embed"]
    before = registry_export(include_secrets=True)
    version = registry_version_get()
    out = _import_file(tmp_path, registry_yaml_dump(document=doc), "--dry-run", "--prune")
    assert out.splitlines() == [
        "Dry run: nothing was saved. The import would do this:",
        "  pools: 1 created, 0 updated, 3 unchanged, 0 deleted",
        "    created: gpu-d",
        "  backends: 1 created, 1 updated, 2 unchanged, 0 deleted",
        "    created: d1",
        "    updated: a1 (weight)",
        "  models: 0 created, 0 updated, 2 unchanged, 1 deleted",
        "    deleted: embed",
    ]
    assert registry_export(include_secrets=True) == before
    assert registry_version_get() == version


def test_prune_deletes_what_is_not_in_the_file(registry: None) -> None:
    doc = registry_export()
    doc["pools"] = [p for p in doc["pools"] if p["name"] != "gpu-b"]
    doc["models"] = [m for m in doc["models"] if m["name"] != "embed"]
    doc["models"][-1]["fallback_pools"] = ["gpu-c"]
    doc["pools"][0]["backends"].pop()  # a2

    kept = registry_import(document=doc)  # without --prune nothing is deleted
    assert kept.models.deleted == [] and ServedModel.objects.filter(name="embed").exists()
    assert kept.models.updated == {"llama-70b": ["fallback_pools"]}

    report = registry_import(document=doc, prune=True)
    assert (report.pools.deleted, report.backends.deleted, report.models.deleted) == (
        ["gpu-b"],
        ["a2", "b1"],
        ["embed"],
    )
    assert registry_export() == doc


def test_prune_requires_both_top_level_lists() -> None:
    with pytest.raises(RegistryImportError, match="field 'models': required with --prune"):
        registry_import(document={"pools": []}, prune=True)


def test_api_key_kept_when_omitted_cleared_when_empty_and_read_from_env(
    registry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = registry_export()  # no api_key anywhere
    assert not registry_import(document=doc).changed
    assert Backend.objects.get(name="a2").api_key == "sk-a2"

    a1, a2 = doc["pools"][0]["backends"]
    a2["api_key"] = ""
    monkeypatch.setenv("A1_KEY", "sk-from-env")
    a1["api_key_env"] = "A1_KEY"
    report = registry_import(document=doc)
    assert report.backends.updated == {"a1": ["api_key"], "a2": ["api_key"]}
    assert Backend.objects.get(name="a2").api_key == ""
    assert Backend.objects.get(name="a1").api_key == "sk-from-env"

    a1["api_key_env"] = "UNSET_KEY_FOR_TEST"
    monkeypatch.delenv("UNSET_KEY_FOR_TEST", raising=False)
    with pytest.raises(RegistryImportError, match="field 'api_key_env': environment variable 'UNSET_KEY_FOR_TEST'"):
        registry_import(document=doc)


def test_omitted_fields_keep_values_and_defaults_apply_on_create(registry: None) -> None:
    doc = _doc(
        [{"name": "gpu-a", "backends": [{"name": "a1", "base_url": "http://a1.internal:8000"}]}],
        [{"name": "fresh", "pool": "gpu-b"}],  # gpu-b is not in the file but exists: allowed without --prune
    )
    report = registry_import(document=doc)
    assert report.pools.unchanged == ["gpu-a"] and report.backends.unchanged == ["a1"]
    assert Backend.objects.get(name="a1").read_timeout_s == 60
    fresh = ServedModel.objects.get(name="fresh")
    assert (fresh.kind, fresh.enabled, fresh.aliases, fresh.pool.name) == ("chat", True, [], "gpu-b")


def test_backend_moves_pool_and_alias_moves_model(registry: None) -> None:
    doc = registry_export()
    a1 = doc["pools"][0]["backends"].pop(0)
    doc["pools"][2]["backends"].append(a1)
    doc["models"][1]["aliases"] = ["llama"]  # embed takes llama-70b's alias; llama-70b comes later in the file
    doc["models"][2]["aliases"] = ["l70"]
    report = registry_import(document=doc)
    assert report.backends.updated == {"a1": ["pool"]}
    assert report.models.updated == {"embed": ["aliases"], "llama-70b": ["aliases"]}
    assert Backend.objects.get(name="a1").pool.name == "gpu-c"
    assert registry_export() == doc


def test_registry_version_bumped_after_import(
    registry: None, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    doc = registry_export()
    doc["pools"][0]["enabled"] = False
    version = registry_version_get()
    with django_capture_on_commit_callbacks(execute=True):
        registry_import(document=doc)
    assert registry_version_get() > version

    version = registry_version_get()  # an unchanged file saves no row: exactly the import's own bump
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        assert not registry_import(document=doc).changed
    assert (len(callbacks), registry_version_get()) == (1, version + 1)


def test_errors_are_in_document_order_and_dotless_hosts_are_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNSET_KEY_FOR_TEST", raising=False)
    backend = {"name": "b", "base_url": "http://vllm-0:8000", "api_key_env": "UNSET_KEY_FOR_TEST"}
    doc = _doc([{"name": "p", "backends": [backend]}], [{"name": "m", "pool": "nope"}])
    with pytest.raises(RegistryImportError) as caught:
        registry_import(document=doc)
    assert caught.value.errors == [
        "pools[0].backends[0] (name: b): field 'api_key_env': environment variable 'UNSET_KEY_FOR_TEST' is not set "
        "or empty",
        "models[0] (name: m): field 'pool': unknown pool 'nope'",
    ]
    del backend["api_key_env"]
    doc["models"][0]["pool"] = "p"
    assert registry_import(document=doc).backends.created == ["b"]


def test_example_file_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_A100_API_KEY", "sk-a100")
    monkeypatch.setenv("VLLM_L40S_API_KEY", "sk-l40s")
    example = Path(__file__).resolve().parents[2] / "deploy" / "registry.example.yaml"
    out = io.StringIO()
    call_command("import_registry", str(example), stdout=out)
    assert "pools: 2 created" in out.getvalue()
    assert Backend.objects.get(name="a100-eu-1").api_key == "sk-a100"
    assert list(ServedModel.objects.get(name="llama-3.1-70b").fallback_pools.values_list("name", flat=True)) == [
        "l40s-us"
    ]


# --- Every field of every registry model survives a round trip ----------------------------------------------------

# What is not configuration stays out of the YAML on purpose: keys, timestamps, health written by the probes. A
# field added to a registry model must be added to its serializer (and so to the YAML) or, if it is not
# configuration, here and to the serializer's read-only fields; otherwise the tests below fail.
NOT_IN_YAML: dict[type, set[str]] = {
    GpuPool: {"id", "created_at", "updated_at"},
    Backend: {"id", "created_at", "updated_at", "status", "last_checked_at", "last_error", "last_latency_ms"},
    ServedModel: {"id", "created_at", "updated_at", "unavailable_reason"},
    ModelFallback: {"id"},
    ModelRoute: {"id"},
}
# Given by the document's structure rather than by a key of the entry itself.
IMPLIED_BY_NESTING: dict[type, set[str]] = {
    GpuPool: set(),
    Backend: {"pool"},  # the pool it is listed under
    ServedModel: set(),
    ModelFallback: {"model", "pool", "position"},  # a model's ordered `fallback_pools`
    ModelRoute: {"model", "kind", "target", "percent"},  # a model's `traffic_split` and `shadows`
}
REGISTRY_MODELS = (GpuPool, Backend, ServedModel, ModelFallback, ModelRoute)


def _config_fields(model: type[DjangoModel]) -> list[Any]:
    """The model's own fields (many-to-many included, reverse relations not) that are configuration."""
    return [
        f
        for f in model._meta.get_fields()
        if not f.auto_created and (f.concrete or f.many_to_many)
        if f.name not in NOT_IN_YAML[model]
    ]


def _value(row: Any, field: Any) -> Any:
    """A field's value comparable across databases: related rows by name, many-to-many as ordered names."""
    if field.many_to_many:
        return [fb.pool.name for fb in row.fallbacks.select_related("pool")]
    value = getattr(row, field.name)
    return getattr(value, "name", value) if field.is_relation else value


def _state() -> dict[str, dict[str, dict[str, Any]]]:
    """Every configuration field of every row, keyed by model and row."""
    state: dict[str, dict[str, dict[str, Any]]] = {}
    for model in REGISTRY_MODELS:
        rows = state.setdefault(model.__name__, {})
        row: Any  # a row of any of the four registry models
        for row in model.objects.all():
            if model is ModelFallback:
                key = f"{row.model.name}->{row.pool.name}"
            elif model is ModelRoute:
                key = f"{row.model.name}-{row.kind}->{row.target.name}"
            else:
                key = row.name
            rows[key] = {f.name: _value(row, f) for f in _config_fields(model)}
    return state


@pytest.fixture
def every_field_set() -> None:
    """A registry in which every configuration field of every model has a value other than its default."""
    main = pool_create(
        name="main",
        description="every field\nset",
        routing_strategy="session_affinity",
        affinity_key="header:x-session-id",
        priority_scheduling=True,
        enabled=False,
    )
    spare, last = pool_create(name="spare"), pool_create(name="last")
    backend_create(
        pool=main,
        name="b1",
        base_url="https://b1.internal:8443",
        api_key="sk-b1",
        weight=7,
        max_concurrent_requests=32,
        connect_timeout_s=1.5,
        read_timeout_s=42.0,
        state="draining",
    )
    model = model_create(
        pool=main,
        name="m1",
        served_name="org/m1",
        aliases=["m-one"],
        kind="completion",
        max_context_length=4096,
        enabled=False,
        split_sticky_key="header:x-session-id",
    )
    ModelFallback.objects.create(model=model, pool=spare, position=0)
    ModelFallback.objects.create(model=model, pool=last, position=1)
    canary = model_create(pool=spare, name="m2", kind="completion")
    ModelRoute.objects.create(model=model, kind="split", target=canary, percent=7.5)
    ModelRoute.objects.create(model=model, kind="shadow", target=canary, percent=20)


def test_the_fixture_sets_every_configuration_field(every_field_set: None) -> None:
    # A new field left at its default in the fixture could be dropped by the YAML without any test noticing.
    for model in REGISTRY_MODELS:
        for field in _config_fields(model):
            values = [_value(row, field) for row in model.objects.all()]
            default = [] if field.many_to_many else field.get_default()
            assert any(v not in (default, None, "", []) for v in values), (
                f"{model.__name__}.{field.name}: give it a non-default value in the every_field_set fixture"
            )


def test_every_configuration_field_is_a_yaml_key(every_field_set: None) -> None:
    document = registry_export(include_secrets=True)
    main = next(p for p in document["pools"] if p["name"] == "main")
    entries = {
        GpuPool: main,
        Backend: main["backends"][0],
        ServedModel: document["models"][0],
        ModelFallback: {},
        ModelRoute: {},
    }
    for model, entry in entries.items():
        for field in _config_fields(model):
            if field.name in IMPLIED_BY_NESTING[model]:
                continue
            assert field.name in entry, f"{model.__name__}.{field.name} is missing from the YAML export"


def test_every_configuration_field_survives_export_and_import(every_field_set: None) -> None:
    # given a registry with every field set, exported with its secrets
    before = _state()
    text = registry_yaml_dump(document=registry_export(include_secrets=True))
    # when it is imported into an empty database
    _wipe()
    registry_import(document=registry_yaml_load(text=text))
    # then every field of every row is back as it was, and a second export is identical
    assert _state() == before
    assert registry_yaml_dump(document=registry_export(include_secrets=True)) == text


def test_affinity_key_is_validated_on_import() -> None:
    doc = _doc([{"name": "p", "routing_strategy": "session_affinity", "affinity_key": "header:"}])
    with pytest.raises(RegistryImportError) as caught:
        registry_import(document=doc)
    assert caught.value.errors == ['pools[0] (name: p): field \'affinity_key\': Use "user" or "header:<header name>".']
    registry_import(document=_doc([{"name": "p", "affinity_key": "header:x-user"}]))
    assert GpuPool.objects.get(name="p").affinity_key == "header:x-user"
