"""Checked with `mypy --strict` by `make lint` and CI (not a pytest module): the public API as a
typed program uses it, so a user's strict type check passes and sees real types."""

import asyncio

import ferroloop


async def main() -> int:
    await asyncio.sleep(0)
    return 1


result: int = ferroloop.run(main())
debug_result: int = ferroloop.run(main(), debug=True)
loop: asyncio.AbstractEventLoop = ferroloop.new_event_loop()
timer = loop.call_later(1, print)
timer.cancel()
loop.close()
ferroloop.install()
with asyncio.Runner(loop_factory=ferroloop.new_event_loop) as runner:
    runner_result: int = runner.run(main())
policy: asyncio.AbstractEventLoopPolicy = ferroloop.EventLoopPolicy()
version: str = ferroloop.__version__
