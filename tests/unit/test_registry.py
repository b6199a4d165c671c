"""The registry is the one place naming the targets: every slice it names is complete, and
nothing else decides which targets exist (the config, the planner, the worker and the workflow
all follow it)."""

from __future__ import annotations

import inspect
from importlib import import_module
from types import ModuleType

import httpx
import pytest
from temporalio import activity

from activities.health import HttpHealth
from activities.targets import Shared, defined_activities

from rollback.config import CONFIGURABLE_TARGETS, ConfigSource, Targets
from rollback.models import EXECUTION_ORDER, RollbackTarget, TargetPlan
from rollback.targets.registry import TARGETS
from workflows.flows import TargetFlow
from workflows.rollback import FLOWS

SLICES = [pytest.param(t, id=t.name) for t in TARGETS]


def _contract(name: str) -> ModuleType:
    return import_module(f"rollback.targets.{name}.contract")


def test_every_target_named_is_in_the_request_format_and_the_config():
    assert [t.name for t in TARGETS if t.name not in {r.value for r in RollbackTarget}] == []
    assert set(Targets.model_fields) == {t.name for t in TARGETS}, "a target's config model is a field of Targets"
    assert set(CONFIGURABLE_TARGETS) == {t.value for t in EXECUTION_ORDER}
    assert set(CONFIGURABLE_TARGETS) == {t.name for t in TARGETS}


@pytest.mark.parametrize("target", SLICES)
def test_each_slice_has_a_flow_for_the_workflow(target):
    flow = FLOWS[target.name]
    assert isinstance(flow, TargetFlow)
    assert inspect.iscoroutinefunction(flow.execute) and inspect.iscoroutinefunction(flow.validate)


@pytest.mark.parametrize("target", SLICES)
async def test_each_slice_registers_every_activity_its_contract_names_and_no_other(target, tmp_path):
    async with httpx.AsyncClient() as http:
        built = import_module(target.activities).build(Shared(config=ConfigSource(tmp_path / "unused.yaml"), health=HttpHealth(http)))
        registered = sorted(activity._Definition.must_from_callable(f).name for f in defined_activities(built))
    named = sorted(v for k, v in vars(_contract(target.name)).items() if k.isupper() and isinstance(v, str) and "." in v)
    assert registered == named, "the worker registers each name the workflows call by, once"


@pytest.mark.parametrize("target", SLICES)
def test_each_strategy_has_its_parameters_and_names_itself(target):
    for params in target.params:
        strategy = params.model_fields["strategy"].default
        assert isinstance(strategy, str) and strategy
        # A plan recorded before the parameters were typed (strategy beside them, not in them) still reads.
        assert TargetPlan.model_validate({"target": target.name, "strategy": strategy, "from_version": None, "to_version": "v1",
                                          "checks": [], "params": _example(params)}).params.__class__ is params


def _example(params) -> dict:
    examples = {"blue_green": {"colour": "blue"}, "rolling": {"batches": [["app-1"]]}, "pitr": {"restore_point": "p"},
                "schema_rollback": {"undo": [{"revision": "0002", "label": "0002_x", "backup_id": "b"}], "target_backup_id": "b"},
                "release_switch": {"build": "b1", "purge_paths": ["/"]}}
    return examples[params.model_fields["strategy"].default]


def test_params_of_one_strategy_under_another_are_refused():
    with pytest.raises(ValueError, match="params are for strategy 'rolling'"):
        TargetPlan.model_validate({"target": "backend", "strategy": "blue_green", "from_version": None, "to_version": "v1",
                                   "checks": [], "params": {"strategy": "rolling", "batches": [["a"]]}})
