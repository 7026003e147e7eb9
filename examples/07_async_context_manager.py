# Seed: "Async Context Managers" - Creating async context managers.
import asyncio
from typing import AsyncIterator  # noqa: F401  (as in the seed)


class AsyncResource:
    async def __aenter__(self) -> "AsyncResource":
        print("Acquiring resource")
        await asyncio.sleep(0.1)
        return self

    async def __aexit__(self, exc_type, exc_val, exc_tb) -> None:
        print("Releasing resource")
        await asyncio.sleep(0.1)

    async def query(self) -> str:
        return "data"


async def main() -> None:
    async with AsyncResource() as resource:
        result = await resource.query()
        print(result)


asyncio.run(main())
