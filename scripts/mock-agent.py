#!/usr/bin/env python3
"""A mock EchoCenter agent, written the way the agent integration guide teaches.

It holds one WebSocket (``websocket-client``: ``pip install websocket-client``) and:

* on every (re)connect sends a ``SYSTEM_LOG`` (level SUCCESS) to the dashboard;
* answers a ``CHAT`` from a human (ADMIN/MEMBER) with a streamed reply: several
  ``CHAT_STREAM`` chunks, then one final ``CHAT`` with the same ``stream_id`` and the full
  text (the only part the server stores), then ``CHAT_STREAM_END``; then a ``SYSTEM_LOG``
  "Reply delivered to ...";
* answers a ``CHAT`` from the Butler (``sender_role`` BUTLER) with one plain ``CHAT``;
* ignores everything else: its own frames, CHATs from other agents (two mock agents would
  otherwise talk forever), ACK, ERROR (logged), PRESENCE and other types, and a CHAT whose
  ``id`` it already answered (the server's store-and-forward is at-least-once);
* reconnects with exponential back-off (0.5 s doubling, capped at ``--max-backoff``, 5 s by
  default, with jitter) when the server goes away or restarts; a token the server rejects
  (HTTP 401) ends it, since retrying cannot help;
* exits cleanly (close frame 1000, exit status 0) on SIGTERM or SIGINT.

Usage::

    ECHOCENTER_AGENT_TOKEN=... scripts/mock-agent.py
    scripts/mock-agent.py --token mock-storage-custodian-token --url http://localhost:8080

Environment: ``ECHOCENTER_AGENT_TOKEN`` (or ``--token``; the environment keeps the token out
of ``ps``), ``ECHOCENTER_URL`` (or ``--url``; default http://localhost:8080; http(s):// or
ws(s):// both work). Logs go to stderr, one line per event; the token is never printed.

Exit status: 0 stopped by a signal (or ``--once`` after a session), 1 ``--once`` and the
connection failed, 2 usage error or websocket-client missing, 3 token rejected by the server.
"""

import argparse
import json
import os
import random
import shutil
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

try:
    import websocket  # the websocket-client package
except ImportError:  # pragma: no cover - depends on the machine
    sys.stderr.write(
        "mock-agent: the websocket-client package is missing: pip install websocket-client\n"
    )
    sys.exit(2)

if not hasattr(websocket, "create_connection"):  # the unrelated "websocket" package
    sys.stderr.write(
        "mock-agent: the installed 'websocket' module is not websocket-client; "
        "pip install websocket-client\n"
    )
    sys.exit(2)


class Shutdown(BaseException):
    """Raised by the SIGTERM/SIGINT handler to unwind whatever is blocking."""


class TokenRejected(Exception):
    pass


def log(msg):
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    sys.stderr.write(f"{stamp} mock-agent: {msg}\n")
    sys.stderr.flush()


def base_urls(url):
    """(http base, ws endpoint without token) from an http(s):// or ws(s):// URL."""
    parts = urllib.parse.urlsplit(url.strip())
    schemes = {"http": ("http", "ws"), "https": ("https", "wss"),
               "ws": ("http", "ws"), "wss": ("https", "wss")}
    if parts.scheme not in schemes or not parts.netloc:
        raise ValueError(f"not an http(s):// or ws(s):// URL: {url!r}")
    http_scheme, ws_scheme = schemes[parts.scheme]
    path = parts.path.rstrip("/")
    for suffix in ("/api/ws", "/api"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    http_base = urllib.parse.urlunsplit((http_scheme, parts.netloc, path, "", ""))
    ws_endpoint = urllib.parse.urlunsplit((ws_scheme, parts.netloc, path + "/api/ws", "", ""))
    return http_base, ws_endpoint


def text_of(payload):
    """The text of a CHAT payload (a string, or an object with content/text)."""
    if isinstance(payload, str):
        return payload
    if isinstance(payload, dict):
        for key in ("content", "text", "message"):
            if isinstance(payload.get(key), str):
                return payload[key]
    return json.dumps(payload)


def chunks_of(text, parts=4):
    """Splits text into `parts` pieces (at word boundaries) whose concatenation is text."""
    words = text.split(" ")
    if len(words) < parts:
        return [text]
    size = -(-len(words) // parts)
    pieces = [" ".join(words[i:i + size]) for i in range(0, len(words), size)]
    return [p + " " for p in pieces[:-1]] + [pieces[-1]]


class Agent:
    def __init__(self, args):
        self.token = args.token
        self.http_base, self.ws_endpoint = base_urls(args.url)
        self.max_backoff = args.max_backoff
        self.chunk_delay = args.chunk_delay
        self.once = args.once
        self.watch_dir = args.watch_dir
        self.me = None  # {"id", "username", "role"} from GET /api/users/me
        self.ws = None
        self.answered = []  # ids of CHATs already answered (bounded)
        self.answered_set = set()
        self.sessions = 0

    # -- connection management ------------------------------------------------------------

    def run(self):
        attempt = 0
        while True:
            try:
                self.connect()
            except TokenRejected as e:
                log(f"the server rejected the token ({e}); giving up")
                return 3
            except (OSError, websocket.WebSocketException) as e:
                log(f"cannot connect to {self.ws_endpoint}: {describe(e)}")
                if self.once:
                    return 1
            else:
                attempt = 0
                reason = self.session()
                log(f"disconnected: {reason}")
                if self.once:
                    return 0
            delay = min(self.max_backoff, 0.5 * (2 ** attempt))
            delay *= random.uniform(0.8, 1.0)
            attempt = min(attempt + 1, 16)
            log(f"reconnecting in {delay:.1f} s")
            time.sleep(delay)

    def connect(self):
        url = self.ws_endpoint + "?token=" + urllib.parse.quote(self.token, safe="")
        try:
            ws = websocket.create_connection(url, timeout=10)
        except websocket.WebSocketBadStatusException as e:
            if e.status_code == 401:
                raise TokenRejected(f"HTTP {e.status_code}") from None
            raise
        # The server pings every 25 s and websocket-client answers pings inside recv();
        # total silence for this long means the link is dead.
        ws.settimeout(75)
        self.ws = ws
        try:
            if self.me is None:
                self.me = self.whoami()
            name = self.name()
            who = f"{name} (id {self.me['id']})" if self.me else name
            log(f"connected to {self.ws_endpoint} as {who}")
            again = "" if self.sessions == 0 else f" (reconnected, session {self.sessions + 1})"
            self.send({
                "type": "SYSTEM_LOG",
                "payload": {"level": "SUCCESS",
                            "content": f"{name} online{again}. {self.disk_report()}"},
            })
        except (OSError, websocket.WebSocketException):
            self.ws = None
            ws.shutdown()
            raise
        self.sessions += 1

    def session(self):
        """Reads frames until the connection ends; returns why it ended."""
        ws = self.ws
        reason = "connection ended"
        try:
            while True:
                opcode, data = ws.recv_data()
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    code, text = close_info(data)
                    reason = f"server closed the connection ({code} {text})".rstrip()
                    break
                if opcode not in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                    continue
                try:
                    msg = json.loads(data)
                except ValueError:
                    log("ignoring a frame that is not JSON")
                    continue
                if isinstance(msg, dict):
                    self.handle(msg)
        except websocket.WebSocketTimeoutException:
            reason = "no traffic for 75 s"
        except (OSError, websocket.WebSocketException) as e:
            reason = describe(e)
        # (A Shutdown raised by the signal handler passes through; main() closes cleanly.)
        self.ws = None
        try:
            ws.shutdown()
        except Exception:
            pass
        return reason

    def close(self):
        ws, self.ws = self.ws, None
        if ws is not None:
            try:
                ws.close(status=websocket.STATUS_NORMAL, timeout=2)
            except Exception:
                pass

    def send(self, frame):
        self.ws.send(json.dumps(frame))

    # -- identity -------------------------------------------------------------------------

    def whoami(self):
        req = urllib.request.Request(
            self.http_base + "/api/users/me",
            headers={"Authorization": "Bearer " + self.token, "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                me = json.load(resp)
                return {"id": me.get("id"), "username": me.get("username"),
                        "role": me.get("role")}
        except (OSError, ValueError, urllib.error.URLError) as e:
            log(f"could not read /api/users/me ({describe(e)}); carrying on without a name")
            return None

    def name(self):
        return (self.me or {}).get("username") or "mock-agent"

    def disk_report(self):
        try:
            du = shutil.disk_usage(self.watch_dir)
            used = 100.0 * (du.total - du.free) / du.total if du.total else 0.0
            return (f"Monitoring {os.path.abspath(self.watch_dir)}: {used:.0f}% used, "
                    f"{du.free // (1 << 30)} GiB free.")
        except OSError:
            return f"Monitoring {self.watch_dir}."

    # -- frames ---------------------------------------------------------------------------

    def handle(self, msg):
        kind = msg.get("type")
        if kind == "ERROR":
            log(f"server reported an error: {json.dumps(msg.get('payload'))}")
            return
        if kind != "CHAT":
            return  # ACK, PRESENCE, CHAT_STREAM from others, AUTH_*, unknown types
        sender_id = msg.get("sender_id")
        role = str(msg.get("sender_role") or "USER").upper()
        if self.me is not None and sender_id == self.me.get("id"):
            return  # our own frame
        if not isinstance(sender_id, int) or sender_id <= 0:
            return  # not from a user (server frames carry sender_id 0)
        if role == "AGENT":
            log(f"ignoring a CHAT from agent {msg.get('sender_name')}")
            return
        msg_id = msg.get("id")
        if msg_id is not None:
            if msg_id in self.answered_set:
                return  # a repeat from store-and-forward
            self.answered.append(msg_id)
            self.answered_set.add(msg_id)
            if len(self.answered) > 4096:
                self.answered_set.discard(self.answered.pop(0))
        text = text_of(msg.get("payload"))
        sender = msg.get("sender_name") or f"user {sender_id}"
        log(f"CHAT from {sender} ({role}): {text[:80]!r}")
        local_id = f"reply-{msg_id}" if msg_id is not None else f"reply-{uuid.uuid4().hex}"
        if role == "BUTLER":
            self.send({
                "type": "CHAT",
                "target_id": sender_id,
                "payload": self.butler_reply(text),
                "local_id": local_id,
            })
            return
        full = self.human_reply(text)
        stream_id = f"{self.name()}-{uuid.uuid4().hex[:16]}"
        for chunk in chunks_of(full):
            self.send({"type": "CHAT_STREAM", "target_id": sender_id, "payload": chunk,
                       "stream_id": stream_id})
            if self.chunk_delay > 0:
                time.sleep(self.chunk_delay)
        self.send({"type": "CHAT", "target_id": sender_id, "payload": full,
                   "stream_id": stream_id, "local_id": local_id})
        self.send({"type": "CHAT_STREAM_END", "target_id": sender_id, "payload": "",
                   "stream_id": stream_id})
        self.send({"type": "SYSTEM_LOG",
                   "payload": {"level": "INFO", "content": f"Reply delivered to {sender}."}})

    def human_reply(self, text):
        quoted = text if len(text) <= 200 else text[:197] + "..."
        return (f"{self.name()} here. You said: \"{quoted}\". {self.disk_report()} "
                "No pending alerts; the last backup verified cleanly.")

    def butler_reply(self, text):
        quoted = text if len(text) <= 200 else text[:197] + "..."
        return f"{self.name()} acknowledges the instruction \"{quoted}\". Done; status nominal."


def close_info(data):
    if isinstance(data, (bytes, bytearray)) and len(data) >= 2:
        code = int.from_bytes(data[:2], "big")
        return code, data[2:].decode("utf-8", "replace")
    return "", ""


def describe(e):
    if isinstance(e, websocket.WebSocketBadStatusException):
        body = getattr(e, "resp_body", None) or b""
        if isinstance(body, bytes):
            body = body.decode("utf-8", "replace")
        return f"HTTP {e.status_code} {body}".strip()
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def main(argv=None):
    p = argparse.ArgumentParser(
        description="A mock EchoCenter agent that answers chats with streamed replies.")
    p.add_argument("--token", default=os.environ.get("ECHOCENTER_AGENT_TOKEN"),
                   help="agent API token (default: $ECHOCENTER_AGENT_TOKEN)")
    p.add_argument("--url", default=os.environ.get("ECHOCENTER_URL") or "http://localhost:8080",
                   help="server URL (default: $ECHOCENTER_URL or http://localhost:8080)")
    p.add_argument("--max-backoff", type=float, default=5.0,
                   help="longest wait between reconnection attempts, seconds (default 5)")
    p.add_argument("--chunk-delay", type=float, default=0.05,
                   help="pause between streamed chunks, seconds (default 0.05)")
    p.add_argument("--watch-dir", default=".",
                   help="directory whose disk usage the replies report (default .)")
    p.add_argument("--once", action="store_true",
                   help="do not reconnect: exit when the first connection ends")
    args = p.parse_args(argv)
    if not args.token:
        p.error("no token: pass --token or set ECHOCENTER_AGENT_TOKEN")
    try:
        agent = Agent(args)
    except ValueError as e:
        p.error(str(e))

    def on_signal(signum, _frame):
        # Only the first signal unwinds; a second one during cleanup is ignored.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise Shutdown(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return agent.run()
    except Shutdown as s:
        log(f"signal {s.args[0]}: closing the connection and exiting")
        agent.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
