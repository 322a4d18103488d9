"""The service dependency map: flows -> graph -> `/map`, `/map.json`, `/map/events`, DOT."""

from l7proxy.depmap.dot import to_dot
from l7proxy.depmap.graph import DepMap

__all__ = ["DepMap", "to_dot"]
