"""Running `bitloot_reconcile`'s runs on Dagster's Celery engine across hosts: the run launcher and the
worker app. Kept apart from the code location because both extend dagster-celery through Dagster's
internal interfaces (a launcher's health check, the run worker's entry point), which the code location
itself never uses."""
