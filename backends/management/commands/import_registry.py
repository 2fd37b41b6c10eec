"""`manage.py import_registry FILE`: create, update (and with --prune delete) registry rows from a YAML file."""

from __future__ import annotations

import sys
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from backends.registry_io import RegistryImportError, registry_import, registry_yaml_load


class Command(BaseCommand):
    """Import pools, backends and models from YAML in one transaction (see docs/registry.md)."""

    help = (
        "Create or update GPU pools, backends and models from a YAML file (upsert by name), in one transaction: "
        "an invalid file changes nothing. Backends without api_key keep their stored key."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        """Declare FILE, --dry-run and --prune."""
        parser.add_argument("file", metavar="FILE", help="Registry YAML file, or - to read standard input.")
        parser.add_argument(
            "--dry-run", action="store_true", help="Validate and report what would change, then roll everything back."
        )
        parser.add_argument(
            "--prune",
            action="store_true",
            help="Also delete pools, backends and models that are not in the file (default: leave them).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        """Read, validate and apply the file; print the report, or raise CommandError listing every problem."""
        path: str = options["file"]
        try:
            text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"cannot read {path}: {exc}") from exc
        try:
            document = registry_yaml_load(text=text)
            report = registry_import(document=document, dry_run=options["dry_run"], prune=options["prune"])
        except RegistryImportError as exc:
            count = len(exc.errors)
            source = "<stdin>" if path == "-" else path
            header = f"{source}: {count} error{'s' if count != 1 else ''}, nothing was changed:"
            raise CommandError("\n".join([header, *(f"  {error}" for error in exc.errors)])) from exc
        self.stdout.write(report.format())
