"""`manage.py export_registry`: write the registry (pools, backends, models) as YAML."""

from __future__ import annotations

import os
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from backends.registry_io import registry_export, registry_yaml_dump


class Command(BaseCommand):
    """Export the registry as YAML that `import_registry` reads back (see docs/registry.md)."""

    help = (
        "Write GPU pools, backends and models as YAML to standard output or --output FILE. "
        "Health fields are never exported; backend API keys only with --include-secrets."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        """Declare --output and --include-secrets."""
        parser.add_argument("--output", "-o", metavar="FILE", help="Write to FILE instead of standard output.")
        parser.add_argument(
            "--include-secrets",
            action="store_true",
            help="Include backend API keys in clear text (the output is then a secret; files are created 0600).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        """Export and write the document."""
        include_secrets: bool = options["include_secrets"]
        document = registry_export(include_secrets=include_secrets)
        text = registry_yaml_dump(document=document)
        if include_secrets:
            self.stderr.write(
                self.style.WARNING(
                    "Warning: the export contains backend API keys in clear text; store and share it as a secret."
                )
            )
        output: str | None = options["output"]
        if not output:
            self.stdout.write(text, ending="")
            return
        try:
            fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if include_secrets else 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                if include_secrets:
                    os.fchmod(handle.fileno(), 0o600)  # also when the file already existed
                handle.write(text)
        except OSError as exc:
            raise CommandError(f"cannot write {output}: {exc}") from exc
        backends = sum(len(p["backends"]) for p in document["pools"])
        self.stdout.write(
            f"Wrote {output}: {len(document['pools'])} pool(s), {backends} backend(s), "
            f"{len(document['models'])} model(s)."
        )
