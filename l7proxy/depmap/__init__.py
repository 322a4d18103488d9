"""The service dependency map: flows -> graph -> `/map`, `/map.json`, `/map/events`, DOT.

Start-up paths call `mount(admin, flow_sink)`; `make demo` (demo/live_map.py) asks `hold.wait_plan`
whether to keep the agent, and so its map, up for a person.
"""

from l7proxy.depmap.dot import to_dot
from l7proxy.depmap.graph import DepMap
from l7proxy.depmap.hold import hold, hold_async
from l7proxy.depmap.web import MapService, mount

__all__ = ["DepMap", "MapService", "hold", "hold_async", "mount", "to_dot"]
