"""Ray's fake multi-node provider, behaving as a cloud does when a VM is lost: a node whose raylet
is gone is no longer listed, so the autoscaler launches a replacement for the demand it left.

Ray's own fake provider keeps listing such a node (tagged "uninitialized", since it never runs the
node updaters), and its autoscaler then counts it against max_workers and never replaces it. The
autoscaling cluster of tests/test_autoscaling.py names this class as an ``external`` provider; the
monitor process imports it from this folder (PYTHONPATH)."""

from ray._private import ray_constants
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class ReclaimingFakeProvider(FakeMultiNodeProvider):
    def non_terminated_nodes(self, tag_filters):
        with self.lock:
            for node_id, node in list(self._nodes.items()):
                # The head has no process handle here (``ray start --head`` started it).
                if "node" in node and not any(kind == ray_constants.PROCESS_TYPE_RAYLET
                                              for kind, _ in node["node"].live_processes()):
                    node["node"].kill_all_processes(check_alive=False, allow_graceful=False)
                    del self._nodes[node_id]
            return super().non_terminated_nodes(tag_filters)
