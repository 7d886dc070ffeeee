"""An HTTP proxy in front of moto that injects the failures moto cannot: S3's 503 SlowDown
and 500 InternalError answers (S3's XML error bodies) and connections reset in the
middle of a GetObject body. Everything else is forwarded to moto unchanged (SQS too, so
the daemon can use it as its one endpoint). Standard library only.

    python3 s3_fault_proxy.py PORT UPSTREAM CONFIG_JSON

CONFIG_JSON (all optional):
    get_errors   the first N GetObject requests (of keys containing `match`) fail,
                 alternately 503 SlowDown and 500 InternalError
    list_errors  the first N ListObjectsV2 requests fail the same way
    get_resets   the N GetObject requests after those are forwarded, but the body is cut
                 in the middle and the connection reset (TCP RST)
    match        a substring of the keys that get_errors and get_resets apply to
    poison       key substrings whose GetObject always fails with 503 SlowDown
    deny_assume_roles
                 role ARNs whose STS AssumeRole is refused with 403 AccessDenied, as
                 STS does when the role's trust policy does not allow the caller (moto
                 lets anyone assume any role)
    kms_errors   {"Operation": N}: the first N KMS requests of that operation
                 (X-Amz-Target TrentService.Operation) fail with 500
                 KMSInternalException, as KMS answers when it has an internal error

GET /__faults/stats answers what happened, as JSON (no S3 bucket can be named
`__faults`): requests seen per kind, failures injected, resets, GetObject requests per
key, AssumeRole requests refused (`assume_denied`), KMS requests per operation
(`kms`) and KMS failures injected per operation (`kms_errors`).
"""

import http.client
import http.server
import json
import socket
import struct
import sys
import threading
import urllib.parse

PORT = int(sys.argv[1])
UPSTREAM = urllib.parse.urlsplit(sys.argv[2])
CONFIG = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}

LOCK = threading.Lock()
STATS = {
    "get": 0,
    "list": 0,
    "other": 0,
    "get_errors": 0,
    "list_errors": 0,
    "resets": 0,
    "poisoned": 0,
    "assume_denied": 0,
    "per_key": {},
    "kms": {},
    "kms_errors": {},
}
ERRORS = [
    (503, "SlowDown", "Please reduce your request rate."),
    (500, "InternalError", "We encountered an internal error. Please try again."),
]
HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


def classify(method, path, query):
    """('get', key), ('list', None) or ('other', None) for a path-style S3 request."""
    if method != "GET":
        return "other", None
    parts = path.lstrip("/").split("/", 1)
    q = urllib.parse.parse_qs(query, keep_blank_values=True)
    if len(parts) == 2 and parts[1]:
        # GetObject (the Rust SDK adds x-id=GetObject); subresources are something else.
        if set(q) <= {"x-id", "partNumber", "versionId"}:
            return "get", urllib.parse.unquote(parts[1])
        return "other", None
    if q.get("list-type") == ["2"]:
        return "list", None
    return "other", None


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.handle_any()

    def do_PUT(self):
        self.handle_any()

    def do_POST(self):
        self.handle_any()

    def do_HEAD(self):
        self.handle_any()

    def do_DELETE(self):
        self.handle_any()

    def handle_any(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/__faults/stats":
            with LOCK:
                body = json.dumps(STATS).encode()
            return self.answer(200, body, "application/json")
        length = int(self.headers.get("Content-Length") or 0)
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self.answer(501, b"chunked request bodies are not supported", "text/plain")
        body = self.rfile.read(length) if length else b""
        kind, key = classify(self.command, url.path, url.query)
        fault = None
        if self.command == "POST" and CONFIG.get("deny_assume_roles"):
            form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
            role = (form.get("RoleArn") or [""])[0]
            if form.get("Action") == ["AssumeRole"] and role in CONFIG["deny_assume_roles"]:
                with LOCK:
                    STATS["assume_denied"] += 1
                xml = (
                    '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error>'
                    "<Type>Sender</Type><Code>AccessDenied</Code><Message>User: arn:aws:iam::"
                    "123456789012:user/moto is not authorized to perform: sts:AssumeRole on "
                    "resource: %s</Message></Error><RequestId>fault-proxy</RequestId></ErrorResponse>"
                    % role
                ).encode()
                return self.answer(403, xml, "text/xml")
        target = self.headers.get("X-Amz-Target") or ""
        if target.startswith("TrentService."):
            op = target.split(".", 1)[1]
            with LOCK:
                STATS["kms"][op] = STATS["kms"].get(op, 0) + 1
                failed = STATS["kms_errors"].get(op, 0)
                inject = failed < CONFIG.get("kms_errors", {}).get(op, 0)
                if inject:
                    STATS["kms_errors"][op] = failed + 1
            if inject:
                body = json.dumps(
                    {"__type": "KMSInternalException", "message": "injected by the fault proxy"}
                ).encode()
                return self.answer(500, body, "application/x-amz-json-1.1")
        with LOCK:
            if kind == "get":
                STATS["get"] += 1
                STATS["per_key"][key] = STATS["per_key"].get(key, 0) + 1
                eligible = CONFIG.get("match", "") in key
                if any(p in key for p in CONFIG.get("poison", [])):
                    STATS["poisoned"] += 1
                    fault = ERRORS[0]
                elif eligible and STATS["get_errors"] < CONFIG.get("get_errors", 0):
                    fault = ERRORS[STATS["get_errors"] % 2]
                    STATS["get_errors"] += 1
                elif eligible and STATS["resets"] < CONFIG.get("get_resets", 0):
                    STATS["resets"] += 1
                    fault = "reset"
            elif kind == "list":
                STATS["list"] += 1
                if STATS["list_errors"] < CONFIG.get("list_errors", 0):
                    fault = ERRORS[STATS["list_errors"] % 2]
                    STATS["list_errors"] += 1
            else:
                STATS["other"] += 1
        if isinstance(fault, tuple):
            status, code, message = fault
            xml = (
                '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code><Message>%s</Message>'
                "<Resource>%s</Resource><RequestId>FAULT%06d</RequestId><HostId>fault-proxy</HostId></Error>"
                % (code, message, url.path, STATS["get"] + STATS["list"])
            ).encode()
            return self.answer(status, xml, "application/xml")
        conn = http.client.HTTPConnection(UPSTREAM.hostname, UPSTREAM.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in HOP and k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault == "reset" and len(data) > 1:
            # Half the body, then a TCP reset: the client sees the download cut short.
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        self.wfile.write(data)

    def answer(self, status, body, ctype):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", "fault-proxy")
        self.end_headers()
        self.wfile.write(body)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        pass  # a reset connection is the point, not a problem


if __name__ == "__main__":
    Server(("127.0.0.1", PORT), Handler).serve_forever()
