"""One slice per target: its config model, its typed contract with the workflow, its engine code.

`registry.py` is the one place that names the targets. Contract modules are importable by
workflows (pydantic only); engine modules hold the I/O.
"""
