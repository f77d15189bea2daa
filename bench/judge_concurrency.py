"""Benchmark: the judge's concurrency gain. 200 judgments against a chat-completions server on 127.0.0.1 that
waits --delay seconds per call, with 16 workers and with 1; prints both times and the ratio (expected >= 8x).

    python bench/judge_concurrency.py [--n 200] [--delay 0.1] [--workers 16]
"""

import argparse
import json
import math
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from judge import OpenAIJudge  # noqa: E402


def serve(delay: float) -> tuple[ThreadingHTTPServer, str]:
    body = json.dumps(
        {
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "90"},
                    "logprobs": {
                        "content": [
                            {
                                "token": "90",
                                "logprob": 0.0,
                                "top_logprobs": [
                                    {"token": "90", "logprob": math.log(0.9)},
                                    {"token": "80", "logprob": math.log(0.1)},
                                ],
                            }
                        ]
                    },
                }
            ]
        }
    ).encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(delay)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"


def timed(url: str, n: int, workers: int) -> float:
    judge = OpenAIJudge("bench", url, workers=workers)
    results = []
    t0 = time.perf_counter()
    judge.score_all({i: f"prompt {i}" for i in range(n)}, lambda k, s, e: results.append((s, e)))
    dt = time.perf_counter() - t0
    assert len(results) == n and all(e is None and abs(s - 89.0) < 1e-6 for s, e in results)
    return dt


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="judgments (default: %(default)s)")
    p.add_argument("--delay", type=float, default=0.1, help="server wait per call in seconds (default: %(default)s)")
    p.add_argument(
        "--workers", type=int, default=16, help="concurrent workers to compare with 1 (default: %(default)s)"
    )
    args = p.parse_args()
    srv, url = serve(args.delay)
    one = timed(url, args.n, 1)
    many = timed(url, args.n, args.workers)
    srv.shutdown()
    print(f"{args.n} judgments, server wait {args.delay * 1000:.0f} ms per call")
    print(f"  1 worker : {one:7.2f} s  ({args.n / one:6.1f} judgments/s)")
    print(f"  {args.workers} workers: {many:7.2f} s  ({args.n / many:6.1f} judgments/s)")
    print(f"  speed-up : {one / many:.1f}x (ideal {args.workers}x)")


if __name__ == "__main__":
    main()
