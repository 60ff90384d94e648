"""`vllm-worker console`: the lab console (fleet charts, playground, usage) served from this machine.

The pages and their server live in `worker/console/`; this is the command: its flags, the one MQTT
client, the optional shared state for the Usage page, and the loops that keep it all running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import Sequence

from worker.cli.commands import broker_from_env, cli_identity, run_tool
from worker.cli.terminal import say
from worker.config import WorkerConfig


def console(argv: Sequence[str]) -> int:
    """The lab console: fleet charts and a chat playground in the browser."""
    p = argparse.ArgumentParser(prog="vllm-worker console", description="Fleet charts and a playground in a browser.")
    p.add_argument("--broker", default=os.environ.get("VLLM_WORKER_BROKER__URL", "mqtt://127.0.0.1:1883"))
    p.add_argument("--topic-prefix", default="")
    p.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback requires the token")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--client-id", default=None, help="v2 clientId of the playground (default: as `ask`)")
    p.add_argument(
        "--state-url",
        default=os.environ.get("VLLM_WORKER_STATE__URL", "memory"),
        help="the fleet's Redis, for the Usage page's 14 days per client (default: the workers' telemetry)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("VLLM_WORKER_CONSOLE_TOKEN"),
        help="required to open the console when not on loopback (default: a random one, printed)",
    )
    return run_tool(_console(p.parse_args(argv)))


async def _console(args: argparse.Namespace) -> int:
    import secrets  # noqa: PLC0415

    from aiohttp import web  # noqa: PLC0415

    from worker.client import Client  # noqa: PLC0415
    from worker.console.samples import Samples  # noqa: PLC0415
    from worker.console.server import ConsoleApp  # noqa: PLC0415
    from worker.console.usage import UsageView  # noqa: PLC0415
    from worker.fleet.view import FleetState  # noqa: PLC0415
    from worker.state import open_state  # noqa: PLC0415

    loopback = args.host in {"localhost", "::1"} or args.host.startswith("127.")
    token = args.token or (None if loopback else secrets.token_urlsafe(18))
    broker = broker_from_env(args.broker)
    fleet_state = FleetState(topic_prefix=args.topic_prefix)
    client_id = args.client_id or broker.username or cli_identity()
    cfg = WorkerConfig.model_validate({"state": {"url": args.state_url}, "worker": {"topic_prefix": args.topic_prefix}})
    async with (
        Client(broker, client_id, args.topic_prefix, connection_id=f"console-{secrets.token_hex(4)}") as c,
        contextlib.AsyncExitStack() as stack,
    ):
        state = None if args.state_url == "memory" else await stack.enter_async_context(open_state(cfg))
        await c.watch(fleet_state.filters, fleet_state.handle)
        hosts = {"127.0.0.1", "localhost", "::1"} if loopback else None
        usage = UsageView(fleet_state, state)
        console_app = ConsoleApp(c, Samples(fleet_state), token=token, hosts=hosts, usage=usage)
        runner = web.AppRunner(console_app.app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port).start()
        url = f"http://{'127.0.0.1' if loopback else args.host}:{args.port}/" + (f"?token={token}" if token else "")
        say(f"console on {url} (broker {args.broker})")
        try:
            async with asyncio.TaskGroup() as loops:  # run until Ctrl-C; if one raises, the console exits loudly
                loops.create_task(console_app.run_sampler())  # supervised: the task group ends the console
                if state is not None:  # supervised likewise; it probes Redis, so the page recovers with it
                    loops.create_task(state.monitor())
        finally:
            await runner.cleanup()
    return 1
