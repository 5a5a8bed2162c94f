#!/usr/bin/env python3
"""A stand-in for a tritonserver that hangs on shutdown: it answers Triton's health endpoints on the
ports it is given, and ignores SIGTERM and SIGINT, as Triton 2.51 was once seen to after
"Exit timeout expired. Exiting immediately." (then a futex wait). Standard library only."""

import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def flag(name: str, default: str) -> str:
    values = [arg.split("=", 1)[1] for arg in sys.argv[1:] if arg.startswith(f"--{name}=")]
    return values[-1] if values else default


class Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def ignored(signum: int, _frame: object) -> None:
    print(f"stand-in tritonserver: ignoring signal {signum}", flush=True)


def main() -> None:
    signal.signal(signal.SIGTERM, ignored)
    signal.signal(signal.SIGINT, ignored)
    for what, port in (("http", "8000"), ("metrics", "8002")):
        address = flag(f"{what}-address", "127.0.0.1")
        host = "127.0.0.1" if address in ("0.0.0.0", "::") else address
        server = ThreadingHTTPServer((host, int(flag(f"{what}-port", port))), Healthy)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("stand-in tritonserver: ready", flush=True)
    while True:  # the main thread runs Python handlers only between bytecodes, whichever thread got the signal
        time.sleep(0.1)


if __name__ == "__main__":
    main()
