# The two entry points of the README. Each installs what it needs from uv.lock first.
UV_VERSION := 0.13.8
export UV_PYTHON_DOWNLOADS := never
# Every Dagster run worker is a fresh Python process: compiled bytecode saves seconds per run where the
# environment forbids writing it at import time (PYTHONDONTWRITEBYTECODE).
export UV_COMPILE_BYTECODE := 1
UV := $(shell command -v uv 2>/dev/null || echo "$(HOME)/.local/bin/uv")

.PHONY: demo test sync postgres lint

$(UV):
	python3 -m pip install --quiet --user "uv==$(UV_VERSION)"

sync: $(UV)
	$(UV) sync --locked --quiet

demo: sync
	$(UV) run bitloot-reconcile demo

# Tests need PostgreSQL on 127.0.0.1:5432; start the machine's cluster when it is down.
postgres:
	@pg_isready -h 127.0.0.1 -p 5432 -q || pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start
	@for i in $$(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && exit 0; sleep 1; done; echo "PostgreSQL did not start"; exit 1

test: sync postgres
	$(UV) run ruff check
	$(UV) run pytest

lint: sync
	$(UV) run ruff check
