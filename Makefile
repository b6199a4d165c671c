.PHONY: demo test bench bootstrap clean
export PATH := $(CURDIR)/.venv/bin:/usr/sbin:$(PATH)

bootstrap:
	@scripts/bootstrap.sh

demo: bootstrap
	.venv/bin/python scripts/demo.py

# The integration suite runs in TEST_WORKERS processes (pytest-xdist), each with its own Temporal
# dev server and its own share of ports. Most tests wait on timers and child processes, so three
# processes on two cores still gain (measured: 1 process 650 s, 2 by file 365 s, 3 by test 265 s,
# 4 by test 260 s); the few marked `alone` run afterwards by themselves.
TEST_WORKERS ?= 3

test: bootstrap
	.venv/bin/ruff check rollback activities workflows worker.py tests bench scripts
	.venv/bin/mypy
	.venv/bin/python -m pytest -q tests/unit
	.venv/bin/python -m pytest -q -n $(TEST_WORKERS) --dist load tests --ignore=tests/unit -m "not alone"
	.venv/bin/python -m pytest -q tests --ignore=tests/unit -m alone

bench: bootstrap
	.venv/bin/python bench/switch_under_load.py
	.venv/bin/python bench/orchestration_overhead.py
	.venv/bin/python bench/detection.py
	.venv/bin/python bench/monitor_scale.py
	.venv/bin/python bench/backup_throughput.py
	.venv/bin/python bench/integrity_speed.py
	.venv/bin/python bench/migration_capture.py
	.venv/bin/python bench/db_rollback.py
	.venv/bin/python bench/frontend_switch.py

clean:
	-.venv/bin/rollback dev down
	rm -rf .rollback
