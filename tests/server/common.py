"""Shared helpers of the `lmspec serve` client tests (clients.py, load.py).

Plain ``http.client`` requests (for what the official clients hide: status
codes and error bodies of bad input, raw SSE events) and small utilities.
Loopback only: the base URL must name 127.0.0.1, ::1 or localhost.
"""

import http.client
import json
import urllib.parse

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class Raw:
    """Raw HTTP requests to the server under test."""

    def __init__(self, base_url, api_key=None, timeout=120):
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme != "http" or parsed.hostname not in LOOPBACK:
            raise SystemExit(f"{base_url}: expected http://127.0.0.1:PORT (loopback only)")
        self.host = parsed.hostname
        self.port = parsed.port or 80
        self.base = parsed.path.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[: -len("/v1")]
        self.api_key = api_key
        self.timeout = timeout

    def url(self, path=""):
        """The base URL without /v1, plus path."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.base}{path}"

    def headers(self, auth=True, extra=None):
        headers = {"Content-Type": "application/json"}
        if auth and self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        headers.update(extra or {})
        return headers

    def connect(self, timeout=None):
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)

    def request(self, method, path, body=None, auth=True, headers=None, timeout=None):
        """(status, parsed JSON or text) of one request. body: bytes, str or a JSON value."""
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        conn = self.connect(timeout)
        try:
            conn.request(method, self.base + path, body=body,
                         headers=self.headers(auth, headers))
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        try:
            return response.status, json.loads(data) if data else None
        except ValueError:
            return response.status, data.decode(errors="replace")

    def open_stream(self, path, payload, auth=True, headers=None, timeout=None):
        """(connection, response) of a streaming POST; the caller closes it."""
        conn = self.connect(timeout)
        conn.request("POST", self.base + path, body=json.dumps(payload),
                     headers=self.headers(auth, headers))
        return conn, conn.getresponse()


def sse(response):
    """(event name or None, data string) for each event of an SSE response."""
    name, data = None, []
    while True:
        line = response.readline()
        if not line:
            break
        line = line.decode().rstrip("\r\n")
        if not line:
            if data or name:
                yield name, "\n".join(data)
            name, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
    if data or name:
        yield name, "\n".join(data)


def error_shape_problem(body):
    """None when body is an OpenAI-style error ({"error": {"message", "type",
    "param", "code"}}), else what is wrong with it."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return f"body is not {{'error': {{...}}}}: {str(body)[:200]!r}"
    error = body["error"]
    missing = [k for k in ("message", "type", "param", "code") if k not in error]
    if missing:
        return f"error object lacks {missing}: {error!r}"[:300]
    if not isinstance(error["message"], str) or not error["message"]:
        return f"error.message is not a non-empty string: {error!r}"[:300]
    if not isinstance(error["type"], str):
        return f"error.type is not a string: {error!r}"[:300]
    return None


def read_rss_kb(pid):
    """VmRSS of a process in kB, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None
