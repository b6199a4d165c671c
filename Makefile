.PHONY: demo test bench bootstrap clean
export PATH := $(CURDIR)/.venv/bin:/usr/sbin:$(PATH)

bootstrap:
	@scripts/bootstrap.sh

demo: bootstrap
	.venv/bin/python scripts/demo.py

test: bootstrap
	.venv/bin/ruff check rollback activities workflows worker.py tests bench scripts
	.venv/bin/mypy
	.venv/bin/python -m pytest -q tests/unit tests

bench: bootstrap
	.venv/bin/python bench/switch_under_load.py
	.venv/bin/python bench/orchestration_overhead.py
	.venv/bin/python bench/detection.py
	.venv/bin/python bench/monitor_scale.py
	.venv/bin/python bench/backup_throughput.py
	.venv/bin/python bench/integrity_speed.py
	.venv/bin/python bench/migration_capture.py
	.venv/bin/python bench/db_rollback.py

clean:
	-.venv/bin/rollback dev down
	rm -rf .rollback
