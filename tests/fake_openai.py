"""A loopback OpenAI-compatible chat-completions server for tests, on 127.0.0.1 only, with switchable behaviour.

It records every request (body and Authorization header) and answers as one of:
- judge "whole":  a judge whose tokenizer has one token per integer (GPT-4o): top logprobs "85", "80", "90"
- judge "digits": a judge whose tokenizer writes numbers digit by digit (Qwen2.5, Llama, SmolLM2) and that means
                  85 (70%), 80 (20%) or 90 (10%): the first token is a digit; with an assistant prefill the next
                  token continues that prefill (unless `no_prefill`, then it answers anew, ignoring it)
- judge "garbage": a judge that never answers with a number
- generation: a request with no logprobs gets `n` choices "answer i: <question>"
- delay: seconds every answer waits (a server that hangs); logprob_as_string: logprobs sent as strings
- status: an int answers every request with that HTTP status (`echo_auth` puts the request's Authorization
  header into the error body, as some misconfigured proxies do); `fail_after` k: the first k requests are
  answered normally, the rest with status `fail_status` (500)
"""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MEANING = {85: 0.7, 80: 0.2, 90: 0.1}


def _digit_next(prefix: str) -> dict[str, float]:
    """Next-token distribution of the digit-splitting judge after the answer text `prefix`."""
    nums = {str(k): p for k, p in MEANING.items() if str(k).startswith(prefix)}
    total = sum(nums.values())
    if not total:
        return {"\n": 1.0}
    out: dict[str, float] = {}
    for s, p in nums.items():
        tok = s[len(prefix)] if len(s) > len(prefix) else "<|im_end|>"
        out[tok] = out.get(tok, 0.0) + p / total
    return out


class FakeOpenAI:
    def __init__(self):
        self.judge = "whole"
        self.no_prefill = False
        self.status: int | None = None
        self.echo_auth = False
        self.fail_after: int | None = None
        self.fail_status = 500
        self.delay = 0.0
        self.logprob_as_string = False
        self.calls: list[dict] = []
        self.auth: list[str | None] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                auth = self.headers.get("Authorization")
                with fake.lock:
                    fake.calls.append(body)
                    fake.auth.append(auth)
                    n_call = len(fake.calls)
                status = fake.status
                if fake.delay:
                    import time

                    time.sleep(fake.delay)
                if fake.fail_after is not None and n_call > fake.fail_after:
                    status = fake.fail_status
                if status:
                    msg = (
                        {"error": {"message": "rejected", "headers": {"Authorization": auth}}}
                        if fake.echo_auth
                        else {"error": {"message": "unavailable"}}
                    )
                    return self._send(status, msg)
                if not body.get("logprobs"):
                    question = body["messages"][-1]["content"]
                    n = body.get("n", 1)
                    return self._send(
                        200,
                        {
                            "choices": [
                                {
                                    "index": i,
                                    "message": {"role": "assistant", "content": f"answer {i}: {question[:40]}"},
                                    "finish_reason": "stop",
                                }
                                for i in range(n)
                            ]
                        },
                    )
                last = body["messages"][-1]
                prefix = last["content"] if last["role"] == "assistant" and not fake.no_prefill else ""
                if fake.judge == "whole":
                    dist = {str(k): p for k, p in MEANING.items()}
                elif fake.judge == "digits":
                    dist = _digit_next(prefix)
                else:
                    dist = {"I": 0.5, "The": 0.3, "REFUSAL": 0.2}
                top = [{"token": t, "logprob": math.log(p)} for t, p in sorted(dist.items(), key=lambda x: -x[1])]
                if fake.logprob_as_string:
                    top = [dict(t, logprob=str(t["logprob"])) for t in top]
                self._send(
                    200,
                    {
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": top[0]["token"]},
                                "finish_reason": "length",
                                "logprobs": {
                                    "content": [
                                        {
                                            "token": top[0]["token"],
                                            "logprob": top[0]["logprob"],
                                            "top_logprobs": top[:20],
                                        }
                                    ]
                                },
                            }
                        ]
                    },
                )

            def _send(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.handle_error = lambda request, address: None  # a client that gave up (a timeout) is no error
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
