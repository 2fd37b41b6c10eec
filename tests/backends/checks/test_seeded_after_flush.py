"""Every check case a data migration seeds is back after a transactional test's flush (tests/conftest.py)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from django.core.management import call_command

import backends.migrations
from backends.checks.models import CheckCase


def _seeded_names() -> set[str]:
    names: set[str] = set()
    for info in pkgutil.iter_modules(backends.migrations.__path__):
        module = importlib.import_module(f"backends.migrations.{info.name}")
        names |= {case["name"] for case in getattr(module, "SEEDED_CASES", [])}
    return names


@pytest.mark.django_db(transaction=True)
def test_every_seeded_case_survives_a_flush() -> None:
    # given the seeded cases of every data migration (the Responses and rerank ones came after the first four)
    expected = _seeded_names()
    assert {"capital-of-france-responses", "rerank-capital-of-france"} <= expected
    # when the database is flushed, as at the end of every transactional test
    call_command("flush", interactive=False, verbosity=0)
    # then every one of them is there again for the next test
    assert expected <= set(CheckCase.objects.values_list("name", flat=True))
