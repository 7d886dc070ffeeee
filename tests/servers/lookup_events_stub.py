"""A local stand-in for the CloudTrail LookupEvents API (moto does not implement it).

    python lookup_events_stub.py PORT CORPUS_DIR [THROTTLE_EVERY]

Serves the records of every *.json.gz / *.json CloudTrail file under CORPUS_DIR over
CloudTrail's JSON protocol (POST /, X-Amz-Target: CloudTrail_20131101.LookupEvents,
Content-Type: application/x-amz-json-1.1): LookupAttributes (one, as the real API
allows), StartTime/EndTime (epoch seconds, inclusive), MaxResults (at most 50) and
NextToken pagination, newest event first. Every THROTTLE_EVERY-th request (default 5)
gets a ThrottlingException, and so does any request that makes more than 2 in one
second (the real limit per account and region); those are counted as violations.
Only events of the region in the request's SigV4 credential scope are served, as the
real API serves its own region. GET /stats returns the counters as JSON. Listens on 127.0.0.1 only.
"""
import base64
import gzip
import json
import os
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
STATS = {"requests": 0, "throttled": 0, "violations": 0, "bad_requests": 0, "pages": 0}
ARRIVALS = []
EVENTS = []  # (epoch, record), newest first
THROTTLE_EVERY = 5


def load(corpus):
    for root, _, files in os.walk(corpus):
        for name in files:
            path = os.path.join(root, name)
            if not (name.endswith(".json.gz") or name.endswith(".json")) or "Digest" in path:
                continue
            with open(path, "rb") as f:
                data = f.read()
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            try:
                doc = json.loads(data)
            except ValueError:
                continue
            for r in doc.get("Records", []) if isinstance(doc, dict) else []:
                t = datetime.strptime(r["eventTime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
                EVENTS.append((t.timestamp(), r))
    EVENTS.sort(key=lambda e: e[0], reverse=True)


def matches(record, attrs):
    for a in attrs:
        key, value = a.get("AttributeKey"), a.get("AttributeValue")
        field = {"EventSource": "eventSource", "EventName": "eventName", "EventId": "eventID"}.get(key)
        if field is None or record.get(field) != value:
            return False
    return True


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", "stub-%d" % STATS["requests"])
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        with LOCK:
            self.reply(200, dict(STATS))

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        now = time.monotonic()
        with LOCK:
            STATS["requests"] += 1
            n = STATS["requests"]
            ARRIVALS.append(now)
            recent = [t for t in ARRIVALS if now - t < 1.0]
            ARRIVALS[:] = recent
            too_fast = len(recent) > 2
            if too_fast:
                STATS["violations"] += 1
        if self.headers.get("X-Amz-Target") != "CloudTrail_20131101.LookupEvents" or \
                not self.headers.get("Content-Type", "").startswith("application/x-amz-json-1.1"):
            with LOCK:
                STATS["bad_requests"] += 1
            return self.reply(400, {"__type": "UnknownOperationException", "message": "unknown target or content type"})
        if too_fast or n % THROTTLE_EVERY == 0:
            with LOCK:
                STATS["throttled"] += 1
            return self.reply(400, {"__type": "ThrottlingException", "message": "Rate exceeded"})
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            return self.reply(400, {"__type": "InvalidParameterException", "message": "bad JSON"})
        attrs = req.get("LookupAttributes", [])
        if len(attrs) > 1:
            return self.reply(400, {"__type": "InvalidLookupAttributesException", "message": "one attribute at most"})
        start = float(req.get("StartTime", 0))
        end = float(req.get("EndTime", 1e12))
        limit = max(1, min(int(req.get("MaxResults", 50)), 50))
        offset = int(base64.b64decode(req["NextToken"]).decode()) if req.get("NextToken") else 0
        # The region is the one the request was signed for (its credential scope), as the
        # real API serves only its own region's events.
        auth = self.headers.get("Authorization", "")
        scope = auth.split("Credential=", 1)[1].split(",", 1)[0].split("/") if "Credential=" in auth else []
        region = scope[2] if len(scope) > 2 else None
        hits = [r for (t, r) in EVENTS
                if start <= t <= end and matches(r, attrs) and (region is None or r.get("awsRegion") == region)]
        page = hits[offset:offset + limit]
        out = {"Events": [{
            "EventId": r.get("eventID"), "EventName": r.get("eventName"),
            "ReadOnly": str(r.get("readOnly", True)).lower(), "EventTime": datetime.strptime(
                r["eventTime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp(),
            "EventSource": r.get("eventSource"), "Username": "stub",
            "Resources": [], "CloudTrailEvent": json.dumps(r),
        } for r in page]}
        if offset + limit < len(hits):
            out["NextToken"] = base64.b64encode(str(offset + limit).encode()).decode()
        with LOCK:
            STATS["pages"] += 1
        return self.reply(200, out)


if __name__ == "__main__":
    port = int(sys.argv[1])
    load(sys.argv[2])
    if len(sys.argv) > 3:
        THROTTLE_EVERY = int(sys.argv[3])
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
