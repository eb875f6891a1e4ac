"""A cloud metadata server on 127.0.0.1 for the preemption watcher's tests: AWS IMDSv2 (a session
token, then ``spot/instance-action``: 404 until a reclaim is announced) and GCP
(``instance/preempted``: FALSE, then TRUE). ``announce(deadline)`` turns the notice on."""

from __future__ import annotations

import contextlib
import datetime
import http.server
import json
import threading


class FakeMetadata:
    def __init__(self):
        self.deadline = None  # unix time of the announced reclaim, None: none announced
        self.requests: list[str] = []
        self.token = "token-123"

    def announce(self, deadline: float) -> None:
        self.deadline = deadline


def handler_for(state: FakeMetadata):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, code: int, body: str = "") -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self):
            state.requests.append(f"PUT {self.path}")
            if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                return self.reply(200, state.token)
            return self.reply(400)

        def do_GET(self):
            state.requests.append(f"GET {self.path}")
            if self.path == "/latest/meta-data/spot/instance-action":
                if self.headers.get("X-aws-ec2-metadata-token") != state.token:
                    return self.reply(401)
                if state.deadline is None:
                    return self.reply(404)
                when = datetime.datetime.fromtimestamp(state.deadline, datetime.timezone.utc)
                return self.reply(200, json.dumps({"action": "terminate", "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}))
            if self.path == "/computeMetadata/v1/instance/preempted":
                if self.headers.get("Metadata-Flavor") != "Google":
                    return self.reply(403)
                return self.reply(200, "TRUE" if state.deadline is not None else "FALSE")
            return self.reply(404)

    return Handler


@contextlib.contextmanager
def metadata_server():
    """Yields (url, state)."""
    state = FakeMetadata()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_for(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
