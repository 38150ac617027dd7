"""A stand-in model server for the managed-engine tests: records its argv, then serves /health,
/v1/models, /v2/health/ready and a tiny /v1/chat/completions on --port / --rest_port of 127.0.0.1.

``STAND_IN_ARGV_FILE`` names a file to append its argv to (one JSON line per start);
``STAND_IN_CRASH`` = "1" makes it exit with code 3 at once (a crash loop)."""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    argv = sys.argv[1:]
    record = os.environ.get("STAND_IN_ARGV_FILE")
    if record:
        with open(record, "a", encoding="utf-8") as out:
            out.write(json.dumps(argv) + "\n")
    if os.environ.get("STAND_IN_CRASH") == "1":
        print("stand-in: crashing on purpose", flush=True)
        sys.exit(3)
    port = None
    for flag in ("--rest_port", "--port"):
        if flag in argv:
            port = int(argv[argv.index(flag) + 1])
            break
    assert port is not None, "stand-in needs --port or --rest_port"

    class Handler(BaseHTTPRequestHandler):
        def _send(self, body: dict[str, object]) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._send({"status": "ok", "data": [{"id": "stand-in"}]})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            message = {"role": "assistant", "content": f"pid {os.getpid()}"}
            self._send(
                {
                    "id": "x",
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 2},
                }
            )

        def log_message(self, *args: object) -> None:
            pass

    print(f"stand-in: serving on {port}", flush=True)
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
