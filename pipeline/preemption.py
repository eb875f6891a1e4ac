"""On a spot or preemptible node: the cloud's reclaim notice becomes a Ray drain with reason
preemption and the real deadline.

Ray Train counts a lost node as a preemption (retried without limit, ``train.max_preemptions``)
only when the node was drained with ``DRAIN_NODE_REASON_PREEMPTION``; a node that simply
vanishes uses up ``train.max_failures``. The drain also tells the training workers in time
(``ray.train.get_preemption_info``) to write a checkpoint inside the epoch. Started beside
``ray start`` on every spot worker (``ray-cluster.yaml``, ``cluster/gcp.yaml``):

    pipeline drain-on-preemption --address $RAY_HEAD_IP:6379 --cloud aws

AWS: the spot instance-action notice (IMDSv2), two minutes ahead, with its time. GCP: the
``preempted`` metadata value; Compute Engine stops a preempted VM 30 s after it turns TRUE.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request

from pipeline import InputError

log = logging.getLogger(__name__)

METADATA_URLS = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal"}
GCP_NOTICE_SECONDS = 30  # Compute Engine: ACPI soft-off, then stopped 30 s later
AWS_TOKEN_SECONDS = 21600


@dataclasses.dataclass(frozen=True)
class Notice:
    deadline: float  # unix time the node is taken away
    reason: str      # what the cloud said, for the drain's message and the log


class AwsSpotNotice:
    """``/latest/meta-data/spot/instance-action``: 404 until a reclaim is scheduled, then
    ``{"action": "terminate", "time": "2026-12-07T10:00:00Z"}``. IMDSv2: a session token first."""

    def __init__(self, base_url: str = METADATA_URLS["aws"], timeout: float = 2.0, clock=time.time):
        self.base_url, self.timeout, self.clock = base_url.rstrip("/"), timeout, clock
        self.token, self.token_expires = None, 0.0

    def _token(self) -> str:
        if self.token is None or self.clock() > self.token_expires - 60:
            request = urllib.request.Request(f"{self.base_url}/latest/api/token", method="PUT",
                                             headers={"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_SECONDS)})
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                self.token = response.read().decode()
            self.token_expires = self.clock() + AWS_TOKEN_SECONDS
        return self.token

    def __call__(self) -> Notice | None:
        request = urllib.request.Request(f"{self.base_url}/latest/meta-data/spot/instance-action",
                                         headers={"X-aws-ec2-metadata-token": self._token()})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                action = json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code == 401:
                self.token = None  # expired or revoked: a new one next time
            if error.code in (401, 404):
                return None
            raise
        when = datetime.datetime.strptime(action["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
        return Notice(deadline=when.timestamp(), reason=f"AWS spot instance-action {action.get('action')}")


class GcpPreemptedNotice:
    """``instance/preempted`` is ``FALSE`` until Compute Engine preempts the VM (spot or
    preemptible), then ``TRUE``; the VM is stopped ``GCP_NOTICE_SECONDS`` later."""

    def __init__(self, base_url: str = METADATA_URLS["gcp"], timeout: float = 2.0, clock=time.time):
        self.base_url, self.timeout, self.clock = base_url.rstrip("/"), timeout, clock
        self.first_seen = None

    def __call__(self) -> Notice | None:
        request = urllib.request.Request(f"{self.base_url}/computeMetadata/v1/instance/preempted",
                                         headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            if response.read().decode().strip().upper() != "TRUE":
                return None
        if self.first_seen is None:
            self.first_seen = self.clock()
        return Notice(deadline=self.first_seen + GCP_NOTICE_SECONDS, reason="GCP instance preempted")


NOTICES = {"aws": AwsSpotNotice, "gcp": GcpPreemptedNotice}


def local_node_id(gcs_address: str, temp_dir: str | None = None) -> str:
    """The alive Ray node this watcher runs on: the one at this host's IP, or, where one host runs
    several Ray nodes, the one started with ``ray start --temp-dir=<temp_dir>``."""
    from ray._private.services import get_node_ip_address
    from ray._raylet import GcsClient
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    nodes = GcsClient(address=gcs_address).get_all_node_info(
        timeout=30, state_filter=GcsNodeInfo.GcsNodeState.ALIVE).values()
    ip = get_node_ip_address()
    found = [node for node in nodes if node.node_manager_address == ip
             and (temp_dir is None or os.path.realpath(node.temp_dir) == os.path.realpath(temp_dir))]
    if len(found) != 1:
        what = f"at {ip}" + (f" with temp dir {temp_dir}" if temp_dir else "")
        raise InputError(f"{len(found)} alive Ray nodes {what} in the cluster at {gcs_address}; start this "
                         f"watcher after `ray start` on that node" + ("" if temp_dir else
                                                                     ", and name a node by its --temp-dir"))
    return found[0].node_id.hex()


def drain(gcs_address: str, node_id: str, notice: Notice, clock=time.time) -> None:
    """Drain the node with reason preemption: Ray schedules nothing new on it, Ray Train sees the
    notice with its deadline, and a worker lost with the node counts as a preemption."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    # Not in the past: a deadline of 0 would mean "no deadline" to Ray.
    deadline_ms = int(max(notice.deadline, clock() + 1) * 1000)
    accepted, why = GcsClient(address=gcs_address).drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), notice.reason, deadline_ms)
    if not accepted:
        raise RuntimeError(f"Ray refused to drain node {node_id}: {why}")


def watch(gcs_address: str, cloud: str, *, temp_dir: str | None = None, metadata_url: str | None = None,
          poll_seconds: float = 2.0, clock=time.time, sleep=time.sleep) -> Notice:
    """Poll the cloud's metadata server until a reclaim is announced, drain this node, return.
    An unreachable metadata server is retried (a hiccup must not end the watch)."""
    if cloud not in NOTICES:
        raise InputError(f"--cloud {cloud!r}: one of {', '.join(NOTICES)}")
    node_id = local_node_id(gcs_address, temp_dir)
    notice_of = NOTICES[cloud](metadata_url or METADATA_URLS[cloud], clock=clock)
    log.info(f"watching {cloud} metadata for a reclaim of node {node_id} every {poll_seconds:g} s")
    failures = 0
    while True:
        try:
            notice = notice_of()
            failures = 0
        except (OSError, ValueError, KeyError, socket.timeout) as error:
            failures += 1
            if failures in (1, 10) or failures % 100 == 0:
                log.warning(f"the {cloud} metadata server did not answer ({failures} time(s)): {error}")
            notice = None
        if notice is not None:
            drain(gcs_address, node_id, notice, clock=clock)
            log.warning(f"{notice.reason}: node {node_id} drained with reason preemption, "
                        f"{notice.deadline - clock():.0f} s before it goes")
            return notice
        sleep(poll_seconds)
