"""`rollback dev ...`: the local demo stack's commands, added to the `rollback` command line
through the `rollback.cli` entry point (pyproject.toml), so the product never imports this package."""

from __future__ import annotations

import asyncio

import typer

from rollback.cli import checked_version, run

dev_app = typer.Typer(add_completion=False, no_args_is_help=True, help="The local demo stack.")


@dev_app.command("up")
def dev_up() -> None:
    """Start Temporal, nginx, the blue and green demo backends, the frontend behind Varnish and a worker (idempotent)."""
    from rollback.dev.stack import DevStack  # here, not at the top: every `rollback` command loads this module

    async def action() -> int:
        await asyncio.to_thread(DevStack().up)
        return 0

    run(action)


@dev_app.command("down")
def dev_down() -> None:
    """Stop everything `dev up` started."""
    from rollback.dev.stack import DevStack

    async def action() -> int:
        await asyncio.to_thread(DevStack().down)
        return 0

    run(action)


@dev_app.command("deploy")
def dev_deploy(target: str = typer.Option(..., "--target"), version: str = typer.Option(..., "--version"),
               fault: str = typer.Option("none", "--fault", help="backend: none, errors, latency, errors_after:N or noisy; "
                                                                        "frontend: none, broken-js or missing-api")) -> None:
    """Deploy a release to the demo stack the way a pipeline would (records it, switches traffic)."""
    from rollback.dev.stack import DevStack

    async def action() -> int:
        checked_version(version)  # before the stack is touched: it becomes instance arguments
        await asyncio.to_thread(DevStack().deploy, target, version, fault)
        return 0

    run(action)
