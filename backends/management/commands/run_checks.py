"""`manage.py run_checks`: run the end-to-end checks now, print the report, exit non-zero when any failed."""

from __future__ import annotations

import getpass
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from backends.checks.models import RunStatus, RunTrigger
from backends.checks.report import run_markdown, run_text_table
from backends.checks.selectors import CheckFilterError
from backends.checks.services import check_run_now


class Command(BaseCommand):
    """Run every enabled check case against the backends in this process (no worker needed) and gate on it."""

    help = (
        "Send every enabled check case to every backend serving each chat model (directly, not through the "
        "router), store the run, print a report and exit 1 when any check failed (deploy pipelines gate on it)."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        """Declare --model, --backend (repeatable) and --markdown."""
        parser.add_argument("--model", action="append", default=[], metavar="M", help="Only this model (repeatable).")
        parser.add_argument(
            "--backend", action="append", default=[], metavar="B", help="Only this backend (repeatable)."
        )
        parser.add_argument("--markdown", action="store_true", help="Print the Markdown report instead of a table.")

    def handle(self, *args: Any, **options: Any) -> None:
        """Run, print, and raise CommandError (exit status 1) unless every check passed."""
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = ""
        try:
            run = check_run_now(
                trigger=RunTrigger.COMMAND,
                triggered_by=user,
                model_names=options["model"],
                backend_names=options["backend"],
            )
        except CheckFilterError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(run_markdown(run=run) if options["markdown"] else run_text_table(run=run))
        if run.status == RunStatus.ERROR:
            raise CommandError(run.error or "the check run did not complete", returncode=2)
        if run.failed:
            raise CommandError(f"{run.failed} of {run.total} checks failed (run #{run.pk})", returncode=1)
