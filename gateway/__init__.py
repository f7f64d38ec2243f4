"""The gateway: the HTTP front door, the cluster's scheduler and its memory, in rooms.

- `cluster/`: the cluster's state and the mechanisms that change it: the view (a fold of
  cluster events), the state that records them, the worker link, the dispatcher and the
  per-request streams, the migrator, the epoch loop, recovery from the journal, metrics.
- `api/`: the OpenAI-compatible HTTP surface: request bodies, response chunks, the route
  handlers, chat templates, detokenizer, stop strings, the served-model registry, error bodies.
- `admin/`: the operator's surface: the admin routes, their bearer token, the event feed.
- `policy/` (decisions, pure), `sim/` (the simulator), `journal/` (the durable event log),
  `mellctl/` (the command line, a client of the admin API).
- At the top, the wiring: `context` (what handlers read), `app` (the public aiohttp app and
  the cluster's background tasks), `main` (the process: builds every component in order).

The dependency rule between the rooms (enforced by tests/unit/test_layering.py):
`cluster` imports no other room and no aiohttp web code; `api` may import `cluster`;
`admin` may import `cluster` and `api` (for the HTTP error shape); none of them imports the
wiring modules but `context`; `policy`, `sim` and `journal` import none of the rooms.
"""
