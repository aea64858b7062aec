"""A test workload: an HTTP server that reports who it is.

GET /        -> JSON {"pod": $POD_NAME, "ip": $POD_IP, "port": ...}
GET /ready   -> 200 once the file named by $READY_FILE exists (or always when unset), else 503
GET /metrics -> a Prometheus text exposition with one gauge
"""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/ready":
            ready_file = os.environ.get("READY_FILE")
            ok = not ready_file or Path(ready_file).exists()
            self._reply(200 if ok else 503, "text/plain", b"ready" if ok else b"not ready")
        elif self.path == "/metrics":
            body = f'e2e_web_up{{pod="{os.environ.get("POD_NAME", "")}"}} 1\n'.encode()
            self._reply(200, "text/plain; version=0.0.4", body)
        else:
            info = {"pod": os.environ.get("POD_NAME"), "ip": os.environ.get("POD_IP"), "port": PORT}
            self._reply(200, "application/json", json.dumps(info).encode())

    def _reply(self, code: int, kind: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
server = ThreadingHTTPServer(("0.0.0.0", PORT), Handler)
print(f"serving on {PORT}", flush=True)
server.serve_forever()
