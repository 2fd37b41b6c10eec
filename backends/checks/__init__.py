"""End-to-end checks: prompts with expected answers, sent to every backend on a schedule or on demand.

Cases, runs and results are models of the `backends` app (imported by `backends.models`). The runner calls each
backend directly (not through the router) from the Celery worker or the `run_checks` command, never from a web
process; results are stored, reported (admin, Markdown, webhook) and reach routing through backend status.
"""
