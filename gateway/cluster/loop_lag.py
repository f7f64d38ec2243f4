"""How late the gateway's event loop runs: the one number that shows a stall on the loop.

`probe_loop_lag` sleeps `interval_s` over and over and reports by how much each wake-up came
late. Anything that holds the loop (a long decode, a tokenizer call, a slow handler) shows as
lag; a process starved of CPU by its neighbours shows too, so read it next to the host's load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

INTERVAL_S = 0.01


async def probe_loop_lag(observe: Callable[[float], None], interval_s: float = INTERVAL_S) -> None:
    """Forever: observe(seconds late) once per `interval_s`. Cancel to stop."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval_s)
        observe(max(0.0, loop.time() - start - interval_s))
