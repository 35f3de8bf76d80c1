"""(being written)"""

import asyncio

from jobcell.service import Cell


async def run(cell: Cell, stop: asyncio.Event) -> None:
    await stop.wait()
