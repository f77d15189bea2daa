"""OpenAI-compatible chat-completions over HTTP: the client every judge and server call goes through, and answers
sampled by a server (vLLM, SGLang, llama.cpp's llama-server, OpenAI).

Imported only where a server is named (`--gen-url`, `--judge gpt-4o-mini`, `--judge-url`): a method script copied
with common.py alone trains without this file.

Retries are urllib3's `Retry` mounted on a `requests` session: 429, 5xx, timeouts and lost connections are retried
with bounded exponential backoff and jitter (and a server's Retry-After is honoured); 401/403 stop at once.
The key (OPENAI_API_KEY) goes in the Authorization header only; error bodies are redacted before they reach a
message or a file (some servers echo the request headers).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor, as_completed

from common import Progress, UserError


class ApiError(Exception):
    """A chat-completions call that failed for good (after its retries, or a 4xx other than 429)."""


class ApiAuthError(ApiError):
    """HTTP 401/403: the key is missing or wrong. Fatal: no later call can succeed."""


_SECRET_PATTERNS = [re.compile(r"(Bearer\s+)[^\s\"',}]+", re.I), re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}")]


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` with API keys removed: the given secrets, 'Bearer <token>' and 'sk-...' look-alikes."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _SECRET_PATTERNS[0].sub(r"\1***", text)
    return _SECRET_PATTERNS[1].sub("sk-***", text)


class ChatClient:
    """POST {url}/chat/completions (or another path) as JSON, with urllib3's retries: `max_retries` more attempts
    after the first for 429, 5xx, timeouts and connection errors, sleeping backoff * 2^(n-1) s (capped at
    max_backoff, plus jitter) between them. 401/403 raise ApiAuthError at once."""

    def __init__(
        self,
        url: str,
        key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        pool: int = 32,
    ):
        self.url = url.rstrip("/")
        self.timeout, self.max_retries, self.backoff, self.max_backoff, self.pool = (
            timeout,
            max_retries,
            backoff,
            max_backoff,
            pool,
        )
        self._key = os.environ.get(key_env) or ""
        self._sessions = {}
        self.session = self._session(max_retries)

    def _session(self, retries: int):
        """One requests session per retry budget (urllib3 sets retries per connection pool, not per call)."""
        if retries not in self._sessions:
            import requests
            from requests.adapters import HTTPAdapter
            from urllib3.util.retry import Retry

            retry = Retry(
                total=retries,
                connect=retries,
                read=retries,
                status=retries,
                other=0,
                allowed_methods=None,  # POST too: a chat completion has no side effect to repeat
                status_forcelist=[429] + list(range(500, 600)),
                backoff_factor=self.backoff,
                backoff_max=self.max_backoff,
                backoff_jitter=self.backoff / 2,
                raise_on_status=False,
                respect_retry_after_header=True,
            )
            s = requests.Session()
            adapter = HTTPAdapter(max_retries=retry, pool_connections=4, pool_maxsize=self.pool)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            if self._key:
                s.headers["Authorization"] = f"Bearer {self._key}"
            self._sessions[retries] = s
        return self._sessions[retries]

    def redact(self, text: str) -> str:
        return redact(text, (self._key,))

    def post(self, path: str, body: dict, retries: int | None = None) -> dict:
        """One JSON request with the retry rules; returns the decoded JSON answer."""
        import requests

        retries = self.max_retries if retries is None else retries
        try:
            r = self._session(retries).post(f"{self.url}{path}", json=body, timeout=self.timeout)
        except requests.RequestException as e:  # connection errors and timeouts, once the retries are spent
            raise ApiError(f"gave up after {retries + 1} attempts ({type(e).__name__})") from None
        if r.status_code in (401, 403):
            raise ApiAuthError(
                f"{self.url} answered HTTP {r.status_code} ({self.redact(r.text[:300])}): the API key "
                "is missing or not accepted; set OPENAI_API_KEY (or use a server that needs none)"
            )
        if r.status_code == 429 or r.status_code >= 500:  # what urllib3 still returns when the retries are spent
            raise ApiError(f"gave up after {retries + 1} attempts (HTTP {r.status_code})")
        if r.status_code != 200:
            raise ApiError(f"HTTP {r.status_code}: {self.redact(r.text[:300])}")
        try:
            return r.json()
        except ValueError:
            raise ApiError(f"malformed response (not JSON): {self.redact(r.text[:300])}") from None

    def chat(self, body: dict, retries: int | None = None) -> dict:
        return self.post("/chat/completions", body, retries)


class ServerGenerator:
    """Answers sampled by an OpenAI-compatible server: one chat-completions request per conversation asks for its n
    samples (the server shares the prompt), requests run `workers` at a time, with ChatClient's retries and key
    handling. `model` is the name the server serves: the base model, or a LoRA adapter served under its own name
    (vLLM --lora-modules NAME=DIR)."""

    def __init__(
        self,
        url: str,
        model: str,
        workers: int = 16,
        timeout: float = 600.0,
        max_retries: int = 6,
        backoff: float = 1.0,
    ):
        self.model, self.workers = model, workers
        self.client = ChatClient(url, timeout=timeout, max_retries=max_retries, backoff=backoff, pool=max(32, workers))
        self.name = f"{model}@{self.client.url}"

    def check(self) -> None:
        """One cheap call before any work: the server answers, accepts the key and knows the model name."""
        try:
            self.client.chat(
                {"model": self.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}, retries=2
            )
        except ApiError as e:
            raise UserError(f"--gen-url {self.client.url} with --gen-model {self.model!r}: {e}") from None

    def sample(
        self,
        messages: list[dict],
        n: int,
        temperature: float | None,
        max_tokens: int,
        seed: int | None = None,
        top_p: float | None = 1.0,
    ) -> list[str]:
        """n answers to one conversation; asks again for the rest when a server returns fewer choices than n.
        temperature/top_p None: the server's defaults (the model's generation config on vLLM)."""
        texts: list[str] = []
        while len(texts) < n:
            body = {"model": self.model, "messages": messages, "n": n - len(texts), "max_tokens": max_tokens}
            if temperature is not None:
                body["temperature"] = temperature
            if top_p is not None:
                body["top_p"] = top_p
            if seed is not None:
                body["seed"] = seed + len(texts)
            answer = self.client.chat(body)
            try:
                got = [c["message"]["content"] or "" for c in answer["choices"]]
            except (KeyError, TypeError) as e:
                raise ApiError(f"malformed answer from {self.name} ({type(e).__name__})") from None
            if not got:
                raise ApiError(f"{self.name} returned no choices")
            texts += [t.strip() for t in got]
        return texts[:n]

    def sample_all(self, requests: list[tuple], on_result, **kw) -> None:
        """requests: [(key, messages, n)]; on_result(key, texts or None, error or None) as each one finishes, in this
        thread. A rejected key (401/403) stops everything with a UserError."""
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            futures = {pool.submit(self.sample, m, n, **kw): key for key, m, n in requests}
            try:
                for fut in as_completed(futures):
                    try:
                        on_result(futures[fut], fut.result(), None)
                    except ApiAuthError:
                        raise
                    except ApiError as e:
                        on_result(futures[fut], None, str(e))
            except ApiAuthError as e:
                pool.shutdown(wait=False, cancel_futures=True)
                raise UserError(f"--gen-url: {e}") from None


def sample_texts(gen: ServerGenerator, conversations: list[list[dict]], what: str, **kw) -> list[str]:
    """One answer per conversation from a server, in order, with one progress line; a failed request is an error
    (callers that can resume keep their own accounting)."""
    out: list[str | None] = [None] * len(conversations)
    progress = Progress(len(conversations), 0, what)
    errors = []

    def done(i, texts, error):
        if error:
            errors.append(error)
        else:
            out[i] = texts[0]
        n = sum(o is not None for o in out) + len(errors)
        if n % 20 == 0 or n == len(conversations):
            progress.update(n)

    gen.sample_all([(i, c, 1) for i, c in enumerate(conversations)], done, **kw)
    if errors:
        raise UserError(f"{what}: {len(errors)} of {len(conversations)} requests to {gen.name} failed ({errors[0]})")
    return out
