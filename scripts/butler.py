#!/usr/bin/env python3
"""The reference EchoCenter Butler: humans instruct it, it instructs agents.

It connects with the Butler's token (role BUTLER) and holds one WebSocket
(``websocket-client``: ``pip install websocket-client``). A human (ADMIN or MEMBER) sends it a
``CHAT`` such as::

    ask Storage-Custodian to check the disk
    @Storage-Custodian check the disk

and the Butler

* looks the agent up by name in the agent directory (``GET /api/users/agents``, with its own
  token as the Bearer token);
* if the instruction contains a risky word (restart, rm, drop, delete, shutdown, reboot, kill,
  truncate, format by default; whole words, any case), first sends the human an
  ``AUTH_REQUEST`` (payload ``{action_id, command, target_agent_name, reason, status:
  "PENDING"}``) and waits for the ``AUTH_RESPONSE`` with that ``action_id`` (over the
  WebSocket, or ``POST /api/chat/auth/response``, which reaches the Butler as the same frame);
  a rejection is reported and nothing reaches the agent. It keeps the dashboard's approval card
  current with ``AUTH_STATUS_UPDATE`` (APPROVED, REJECTED, EXPIRED);
* forwards exactly the instruction text to the agent as a ``CHAT`` (with a ``local_id``);
* waits for the agent's answer: one ``CHAT``, or a stream (``CHAT_STREAM`` chunks with a
  ``stream_id``, the final ``CHAT`` with that ``stream_id``, ``CHAT_STREAM_END``), which it
  relays to the human as a stream with the same ``stream_id``;
* relays the answer to the human as a ``CHAT``: ``Storage-Custodian: <answer>``.

An unknown or offline agent, an instruction it cannot parse, no answer within
``--answer-timeout`` and no decision within ``--approval-timeout`` each get a plain ``CHAT`` back
saying so. ``help`` gets the usage line, ``agents`` the list of agents and whether they are
online. When the human's frame carried a ``conversation_id`` (a dashboard thread), every frame
the Butler sends that human for that request carries it too.

One event loop serves every human and request at once. Frames are handled in arrival order;
state is kept per request and found again by ``action_id`` (approvals), ``stream_id`` (streams)
and agent (answers). An answer is matched to a request in this order: a ``stream_id`` already
seen for it; a ``local_id`` of ``reply-<id of the instruction>`` (what scripts/mock-agent.py
sends); otherwise the oldest request still waiting on that agent (agents that answer in order,
like the guide's). A request that timed out keeps waiting for a late answer for 10 minutes, so
that answer is passed on as late rather than mistaken for the answer to a newer request.

Store and forward is at-least-once, so frames are deduplicated by their ``id``; and the
Butler's own stored frames (``CHAT``, ``AUTH_REQUEST``) are kept until the server's ``ACK`` and
sent again with the same ``local_id`` after a reconnect (the server stores a ``local_id`` once).
An instruction that reaches it more than ``--max-instruction-age`` late (sent while the Butler
was offline) is answered, not forwarded: a stale "restart" should not run by surprise.

Usage::

    ECHOCENTER_BUTLER_TOKEN=... scripts/butler.py --url http://localhost:8080

Environment: ``ECHOCENTER_BUTLER_TOKEN`` (or ``--token``; the environment keeps the token out
of ``ps``), ``ECHOCENTER_URL`` (or ``--url``; default http://localhost:8080; http(s):// or
ws(s):// both work), ``ECHOCENTER_BUTLER_RISKY_WORDS`` (or ``--risky-words``; a comma list, an
empty one turns approvals off). Outside production the Butler's token comes from
``GET /api/dev/mock/agent-token/Butler`` (admin); anywhere, an admin can rotate it with
``PATCH /api/users/agents/<Butler's id>/token``. Logs go to stderr, one line per event; the
token is never printed (it travels in the ``Authorization`` header, not the URL).

Exit status: 0 stopped by a signal (or ``--once`` after a session), 1 ``--once`` and the
connection failed, 2 usage error or websocket-client missing, 3 token rejected by the server,
4 the token is not the Butler's (its role is not BUTLER).
"""

import argparse
import datetime
import json
import os
import random
import re
import select
import signal
import sys
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import OrderedDict

try:
    import websocket  # the websocket-client package
except ImportError:  # pragma: no cover - depends on the machine
    sys.stderr.write(
        "butler: the websocket-client package is missing: pip install websocket-client\n"
    )
    sys.exit(2)

if not hasattr(websocket, "create_connection"):  # the unrelated "websocket" package
    sys.stderr.write(
        "butler: the installed 'websocket' module is not websocket-client; "
        "pip install websocket-client\n"
    )
    sys.exit(2)

DEFAULT_RISKY_WORDS = "restart,rm,drop,delete,shutdown,reboot,kill,truncate,format"
USAGE = ("I can forward instructions: ask <agent> to <task>, or @<agent> <task>. "
         "Say \"agents\" to see who I can reach.")
SILENCE_LIMIT = 75.0     # the server pings every 25 s; this much silence means a dead link
LATE_WINDOW = 600.0      # how long a timed-out request still takes a late answer
SEEN_IDS_KEPT = 4096     # frame ids remembered for deduplication
UNACKED_KEPT = 1000      # own stored frames kept for resending until ACKed

# Usernames are 1-64 of A-Z a-z 0-9 - _ . (SPEC section 2).
NAME = r"[A-Za-z0-9._-]{1,64}"
ASK_RE = re.compile(r"^\s*(?:please\s+)?(?:ask|tell)\s+(?:the\s+)?@?(" + NAME + r")\s+to\s+(.+?)\s*$",
                    re.IGNORECASE | re.DOTALL)
MENTION_RE = re.compile(r"^\s*@(" + NAME + r")[:,]?\s+(.+?)\s*$", re.DOTALL)

# Request states.
APPROVAL = "awaiting approval"
ANSWER = "awaiting the answer"
LATE = "timed out, still taking a late answer"


class Shutdown(BaseException):
    """Raised by the SIGTERM/SIGINT handler to unwind whatever is blocking."""


class TokenRejected(Exception):
    pass


class NotTheButler(Exception):
    pass


class DirectoryError(Exception):
    """The agent directory could not be read."""


def log(msg):
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    sys.stderr.write(f"{stamp} butler: {msg}\n")
    sys.stderr.flush()


def base_urls(url):
    """(http base, ws endpoint) from an http(s):// or ws(s):// URL."""
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


def short(text, n=80):
    return text if len(text) <= n else text[: n - 3] + "..."


def parse_instruction(text):
    """("forward", agent, task), ("help",), ("agents",), or None when it is not understood."""
    stripped = text.strip()
    word = stripped.lower().rstrip("?!.")
    if word in ("help", "?", ""):
        return ("help",)
    if word in ("agents", "list agents", "who is online", "list"):
        return ("agents",)
    for pattern in (ASK_RE, MENTION_RE):
        m = pattern.match(stripped)
        if m and m.group(2).strip():
            return ("forward", m.group(1), m.group(2).strip())
    return None


def risky_pattern(words):
    """A regex matching any of `words` as whole words, any case; None for an empty list."""
    words = [w.strip() for w in words if w.strip()]
    if not words:
        return None
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(r"(?<!\w)(" + alternatives + r")(?!\w)", re.IGNORECASE)


def age_of(timestamp):
    """Seconds since an RFC 3339 timestamp (the server's), or None if it is unreadable."""
    if not isinstance(timestamp, str):
        return None
    try:
        when = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return (datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()


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
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code}"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def seconds(value):
    """'30', '30s', '10m', '1h' or '1.5' → seconds (argparse type)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", value or "")
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {value!r} (e.g. 30, 30s, 10m)")
    n = float(m.group(1))
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


class Request:
    """One instruction from one human, from its arrival to the answer relayed back."""

    def __init__(self, human, conversation_id, agent_name, task):
        self.rid = uuid.uuid4().hex
        self.human = human                  # {"id", "name", "role"}
        self.conversation_id = conversation_id
        self.agent_name = agent_name
        self.agent_id = None
        self.task = task
        self.state = None
        self.deadline = None                # monotonic time the current wait ends
        self.action_id = None
        self.forward_local_id = None
        self.forward_id = None              # the stored id of the forwarded CHAT (from ACK)
        self.forwarded_at = None
        self.stream_id = None               # the agent's stream relayed for this request
        self.chunks = []
        self.prefix = None                  # what the relayed answer starts with
        self.sent = 0                       # frames sent to the human (local_id suffixes)

    def label(self):
        return f"{self.human['name']} → {self.agent_name}: {short(self.task, 60)!r}"


class Butler:
    def __init__(self, args):
        self.token = args.token
        self.http_base, self.ws_endpoint = base_urls(args.url)
        self.max_backoff = args.max_backoff
        self.answer_timeout = args.answer_timeout
        self.approval_timeout = args.approval_timeout
        self.max_age = args.max_instruction_age
        self.once = args.once
        self.risky_words = [w.strip() for w in args.risky_words.split(",") if w.strip()]
        self.risky = risky_pattern(self.risky_words)
        self.me = None            # {"id", "username", "role"} from GET /api/users/me
        self.ws = None
        self.broken = None        # why sending failed on the current connection
        self.sessions = 0
        self.requests = {}        # rid -> Request
        self.by_action = {}       # action_id -> rid, while the approval is pending
        self.by_local = {}        # local_id of a forwarded CHAT -> rid
        self.streams = {}         # (agent id, stream_id) -> rid
        self.closed_streams = OrderedDict()   # (agent id, stream_id) already finished
        self.answered_actions = OrderedDict()  # action_id -> APPROVED/REJECTED/EXPIRED
        self.seen = OrderedDict()  # ids of frames already handled (replays)
        self.unacked = OrderedDict()  # local_id -> own stored frame, until ACKed

    # -- connection management ------------------------------------------------------------

    def run(self):
        attempt = 0
        while True:
            try:
                self.connect()
            except TokenRejected as e:
                log(f"the server rejected the token ({e}); giving up")
                return 3
            except NotTheButler as e:
                log(str(e))
                return 4
            except (OSError, websocket.WebSocketException, DirectoryError) as e:
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
            self.idle(delay)

    def idle(self, duration):
        """Waits while disconnected; approvals and answers still time out meanwhile."""
        end = time.monotonic() + duration
        while True:
            self.check_deadlines()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.25))

    def connect(self):
        if self.me is None:
            me = self.api_get("/api/users/me")
            self.me = {"id": me.get("id"), "username": me.get("username"),
                       "role": me.get("role")}
            if self.me["role"] != "BUTLER":
                raise NotTheButler(
                    f"the token belongs to {self.me['username']} (role {self.me['role']}), "
                    "not to the Butler; use the BUTLER user's token")
        try:
            ws = websocket.create_connection(
                self.ws_endpoint, timeout=10, suppress_origin=True,
                header=["Authorization: Bearer " + self.token])
        except websocket.WebSocketBadStatusException as e:
            if e.status_code == 401:
                raise TokenRejected(f"HTTP {e.status_code}") from None
            raise
        self.ws = ws
        self.broken = None
        log(f"connected to {self.ws_endpoint} as {self.me['username']} (id {self.me['id']})")
        again = "" if self.sessions == 0 else f" (reconnected, session {self.sessions + 1})"
        risky = ", ".join(self.risky_words) if self.risky_words else "none"
        self.send({
            "type": "SYSTEM_LOG",
            "payload": {"level": "SUCCESS",
                        "content": f"{self.me['username']} online{again}: forwarding "
                                   f"instructions to agents; approval needed for: {risky}."},
        })
        if self.broken:
            self.ws = None
            ws.shutdown()
            raise OSError(self.broken)
        self.sessions += 1

    def session(self):
        """Serves frames and timers until the connection ends; returns why it ended."""
        ws = self.ws
        last_rx = time.monotonic()
        # Frames the server may not have stored before the last connection ended.
        for frame in list(self.unacked.values()):
            self.send(frame)
        reason = None
        try:
            while self.broken is None:
                self.check_deadlines()
                if self.broken is not None:
                    break
                now = time.monotonic()
                wait = min(1.0, max(0.0, self.next_deadline() - now))
                if not readable(ws, wait):
                    if time.monotonic() - last_rx > SILENCE_LIMIT:
                        reason = f"no traffic for {SILENCE_LIMIT:.0f} s"
                        break
                    continue
                opcode, data = ws.recv_data(control_frame=True)
                last_rx = time.monotonic()
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    code, text = close_info(data)
                    reason = f"server closed the connection ({code} {text})".rstrip()
                    break
                if opcode not in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                    continue  # ping (answered by websocket-client) or pong
                try:
                    msg = json.loads(data)
                except ValueError:
                    log("ignoring a frame that is not JSON")
                    continue
                if isinstance(msg, dict):
                    self.handle_safely(msg)
        except websocket.WebSocketTimeoutException:
            reason = "the server stalled in the middle of a frame"
        except (OSError, websocket.WebSocketException) as e:
            reason = describe(e)
        # (A Shutdown raised by the signal handler passes through; main() closes cleanly.)
        self.ws = None
        try:
            ws.shutdown()
        except Exception:
            pass
        return reason or self.broken or "connection ended"

    def close(self):
        """On a signal: says goodbye to whoever is waiting, then closes with 1000."""
        ws = self.ws
        if ws is None:
            return
        self.farewell()
        self.ws = None
        try:
            ws.close(status=websocket.STATUS_NORMAL, timeout=2)
        except Exception:
            pass

    def farewell(self):
        """On shutdown, tells everyone still waiting that their request ends here."""
        for req in list(self.requests.values()):
            if req.state == APPROVAL:
                self.status_update(req, "EXPIRED")
                self.tell(req, f"I am shutting down, so \"{req.task}\" was not forwarded to "
                               f"{req.agent_name}.")
            elif req.state == ANSWER:
                self.tell(req, f"I am shutting down before {req.agent_name} answered "
                               f"\"{req.task}\".")
            if self.broken:
                return

    def send(self, frame):
        """Sends a frame if connected; a stored type with a local_id is kept until ACKed."""
        local_id = frame.get("local_id")
        if local_id and frame["type"] in ("CHAT", "AUTH_REQUEST"):
            self.unacked[local_id] = frame
            while len(self.unacked) > UNACKED_KEPT:
                dropped, _ = self.unacked.popitem(last=False)
                log(f"never acknowledged, giving up on frame {dropped}")
        if self.ws is None or self.broken:
            return
        try:
            self.ws.send(json.dumps(frame))
        except (OSError, websocket.WebSocketException) as e:
            self.broken = f"sending failed: {describe(e)}"

    # -- REST -----------------------------------------------------------------------------

    def api_get(self, path):
        req = urllib.request.Request(
            self.http_base + path,
            headers={"Authorization": "Bearer " + self.token, "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as e:
            if e.code == 401:
                raise TokenRejected(f"HTTP 401 from {path}") from None
            raise DirectoryError(f"{path}: HTTP {e.code}") from None
        except ValueError as e:
            raise DirectoryError(f"{path}: not JSON ({e})") from None
        except OSError as e:  # URLError is an OSError
            raise DirectoryError(f"{path}: {describe(e)}") from None

    def directory(self):
        """Every AGENT and the Butler, with presence (the Butler may read the directory)."""
        agents = self.api_get("/api/users/agents")
        if not isinstance(agents, list):
            raise DirectoryError("/api/users/agents: not a list")
        return [a for a in agents if isinstance(a, dict)]

    def resolve(self, name):
        """(agent, None) or (None, the reason to tell the human)."""
        try:
            agents = self.directory()
        except (DirectoryError, TokenRejected) as e:
            # (A rejected token: the server closes this session too, and run() gives up.)
            log(f"cannot read the agent directory: {e}")
            return None, ("I cannot read the agent directory right now, so nothing was "
                          "forwarded. Please try again in a moment.")
        exact = [a for a in agents if a.get("username") == name]
        if not exact:
            exact = [a for a in agents if str(a.get("username", "")).lower() == name.lower()]
        if len(exact) != 1:
            known = [a["username"] for a in agents
                     if a.get("role") == "AGENT" and isinstance(a.get("username"), str)]
            listing = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
            return None, (f"I don't know an agent called \"{name}\"; nothing was forwarded. "
                          + (f"Agents I can instruct: {listing}." if known
                             else "There are no agents registered yet."))
        agent = exact[0]
        if agent.get("role") != "AGENT":
            return None, ("That is me. Tell me which agent should do it: ask <agent> to "
                          "<task>, or @<agent> <task>.")
        if agent.get("online") is not True:
            return None, (f"{agent['username']} is offline, so I did not forward it. "
                          "Ask again when it is online.")
        return agent, None

    # -- frames in ------------------------------------------------------------------------

    def handle_safely(self, msg):
        """One frame that trips a bug must not take every other request down with it."""
        try:
            self.handle(msg)
        except Exception:
            log(f"internal error while handling a {msg.get('type')} frame (id "
                f"{msg.get('id')}); carrying on:\n{traceback.format_exc().rstrip()}")

    def handle(self, msg):
        kind = msg.get("type")
        if kind == "ACK":
            self.on_ack(msg)
            return
        if kind == "ERROR":
            self.on_error(msg)
            return
        msg_id = msg.get("id")
        if msg_id is not None:
            if msg_id in self.seen:
                return  # a repeat from store-and-forward
            self.seen[msg_id] = True
            while len(self.seen) > SEEN_IDS_KEPT:
                self.seen.popitem(last=False)
        sender_id = msg.get("sender_id")
        if not isinstance(sender_id, int) or sender_id <= 0 or sender_id == self.me["id"]:
            return  # server frames, our own frames
        role = str(msg.get("sender_role") or "").upper()
        human = role in ("ADMIN", "MEMBER")
        if kind == "CHAT" and human:
            self.on_instruction(msg)
        elif kind == "AUTH_RESPONSE" and human:
            self.on_auth_response(msg)
        elif kind in ("CHAT", "CHAT_STREAM", "CHAT_STREAM_END") and role == "AGENT":
            self.on_agent_frame(kind, msg)
        # Anything else (a human's stream, PRESENCE, custom types) needs nothing from us.

    def on_ack(self, msg):
        local_id = msg.get("local_id")
        self.unacked.pop(local_id, None)
        rid = self.by_local.get(local_id)
        req = self.requests.get(rid)
        if req is not None and isinstance(msg.get("id"), int):
            req.forward_id = msg["id"]

    def on_error(self, msg):
        payload = msg.get("payload") or {}
        local_id = msg.get("local_id")
        log(f"server reported an error: {json.dumps(payload)}"
            + (f" (frame {local_id})" if local_id else ""))
        if not local_id or local_id not in self.unacked:
            return
        code = payload.get("code") if isinstance(payload, dict) else None
        if code in ("internal", "rate_limited"):
            return  # not stored: stays in unacked, resent on the next connection
        self.unacked.pop(local_id, None)
        req = self.requests.get(self.by_local.get(local_id))
        if req is not None and req.state == ANSWER:
            self.tell(req, f"I could not forward \"{req.task}\" to {req.agent_name}: "
                           f"{payload.get('message', code)}.")
            self.finish(req)

    def on_instruction(self, msg):
        human = {"id": msg["sender_id"], "name": msg.get("sender_name") or
                 f"user {msg['sender_id']}", "role": msg.get("sender_role")}
        text = text_of(msg.get("payload"))
        conversation_id = msg.get("conversation_id")
        parsed = parse_instruction(text)
        log(f"CHAT from {human['name']}: {short(text)!r}")
        req = Request(human, conversation_id, None, text)
        if parsed is None or parsed[0] == "help":
            self.tell(req, USAGE)
            return
        if parsed[0] == "agents":
            self.tell(req, self.agents_listing())
            return
        _, req.agent_name, req.task = parsed
        age = age_of(msg.get("timestamp"))
        if self.max_age > 0 and age is not None and age > self.max_age:
            self.tell(req, f"Your instruction \"{req.task}\" for {req.agent_name} reached me "
                           f"{age / 60:.0f} min late (I was offline), so I did not forward it. "
                           "Send it again if it is still wanted.")
            return
        agent, why_not = self.resolve(req.agent_name)
        if agent is None:
            self.tell(req, why_not)
            return
        req.agent_name, req.agent_id = agent["username"], agent["id"]
        m = self.risky.search(req.task) if self.risky else None
        if m:
            self.ask_approval(req, m.group(1))
        else:
            self.forward(req)

    def agents_listing(self):
        try:
            agents = [a for a in self.directory() if a.get("role") == "AGENT"]
        except (DirectoryError, TokenRejected) as e:
            log(f"cannot read the agent directory: {e}")
            return "I cannot read the agent directory right now."
        if not agents:
            return "There are no agents registered yet."
        return "Agents: " + ", ".join(
            f"{a.get('username')} ({'online' if a.get('online') is True else 'offline'})"
            for a in agents) + ". " + USAGE

    def on_auth_response(self, msg):
        payload = msg.get("payload")
        if not isinstance(payload, dict):
            log("ignoring an AUTH_RESPONSE without an object payload")
            return
        action_id, approved = payload.get("action_id"), payload.get("approved")
        who = msg.get("sender_name") or f"user {msg['sender_id']}"
        rid = self.by_action.get(action_id) if isinstance(action_id, str) else None
        req = self.requests.get(rid)
        if req is None:
            # Not pending (any more): put the human's card right, say why if it matters.
            note = Request({"id": msg["sender_id"], "name": who,
                            "role": msg.get("sender_role")},
                           msg.get("conversation_id"), None, "")
            note.action_id = action_id
            outcome = self.answered_actions.get(action_id)
            if outcome in ("APPROVED", "REJECTED"):
                # Answered twice (the WebSocket and REST): the first answer counted.
                self.status_update(note, outcome)
                return
            if isinstance(action_id, str):
                self.status_update(note, "EXPIRED")
            if outcome == "EXPIRED":
                self.tell(note, "That approval request had already expired, so nothing was "
                                "forwarded. Ask again if it is still wanted.")
            else:
                log(f"AUTH_RESPONSE from {who} for unknown action {action_id!r}")
                self.tell(note, f"There is no pending approval {action_id}: it was asked "
                                "before I restarted, or never. Nothing was forwarded for it.")
            return
        if not isinstance(approved, bool):
            log(f"ignoring an AUTH_RESPONSE from {who} whose 'approved' is not a boolean")
            return
        if msg["sender_id"] != req.human["id"] and str(msg.get("sender_role")) != "ADMIN":
            note = Request({"id": msg["sender_id"], "name": who,
                            "role": msg.get("sender_role")},
                           msg.get("conversation_id"), None, "")
            self.tell(note, f"Only {req.human['name']} (who asked) or an admin can decide that "
                            "request.")
            return
        del self.by_action[action_id]
        self.remember_action(action_id, "APPROVED" if approved else "REJECTED")
        by = "" if msg["sender_id"] == req.human["id"] else f" by {who}"
        if approved:
            log(f"approved{by}: {req.label()}")
            self.status_update(req, "APPROVED")
            agent, why_not = self.resolve(req.agent_name)
            if agent is None:
                self.tell(req, f"Approved{by}, but I cannot forward it now: {why_not}")
                self.finish(req)
                return
            req.agent_id = agent["id"]
            self.tell(req, f"Approved{by}, forwarding \"{req.task}\" to {req.agent_name}…")
            self.forward(req)
        else:
            log(f"rejected{by}: {req.label()}")
            self.status_update(req, "REJECTED")
            self.tell(req, f"Not forwarded: \"{req.task}\" for {req.agent_name} was "
                           f"rejected{by}.")
            self.finish(req)

    def on_agent_frame(self, kind, msg):
        agent_id = msg["sender_id"]
        stream_id = msg.get("stream_id") or None
        key = (agent_id, stream_id)
        if stream_id is not None and key in self.closed_streams:
            return  # the rest of a stream already relayed (or a final CHAT after its END)
        req = self.match_answer(agent_id, msg, stream_id)
        if req is None:
            if kind == "CHAT":
                log(f"CHAT from {msg.get('sender_name')} that answers no open request: "
                    f"{short(text_of(msg.get('payload')))!r}")
            return
        text = text_of(msg.get("payload"))
        if kind == "CHAT_STREAM":
            if req.stream_id is None:
                req.stream_id = stream_id
                self.streams[key] = req.rid
            if req.prefix is None:
                req.prefix = self.answer_prefix(req)
                text = req.prefix + text
            req.chunks.append(text)
            if req.state == ANSWER:
                req.deadline = time.monotonic() + self.answer_timeout  # still talking
            self.to_human(req, {"type": "CHAT_STREAM", "payload": text,
                                "stream_id": stream_id})
        elif kind == "CHAT":
            self.relay_answer(req, text)
        elif req.chunks:  # CHAT_STREAM_END without a final CHAT: the chunks are the answer
            self.relay_answer(req, "".join(req.chunks)[len(req.prefix):])

    def match_answer(self, agent_id, msg, stream_id):
        if stream_id is not None and (agent_id, stream_id) in self.streams:
            return self.requests.get(self.streams[(agent_id, stream_id)])
        waiting = sorted((r for r in self.requests.values()
                          if r.agent_id == agent_id and r.state in (ANSWER, LATE)),
                         key=lambda r: r.forwarded_at)
        local_id = msg.get("local_id")
        if isinstance(local_id, str) and local_id.startswith("reply-"):
            for r in waiting:
                if r.forward_id is not None and local_id == f"reply-{r.forward_id}":
                    return r
        for r in waiting:
            if r.stream_id is None:
                return r
        return None

    def answer_prefix(self, req):
        if req.state == LATE:
            return f"{req.agent_name} (late answer to \"{short(req.task, 60)}\"): "
        return f"{req.agent_name}: "

    # -- frames out -----------------------------------------------------------------------

    def to_human(self, req, frame):
        """A frame to the request's human, in the human's conversation if it named one."""
        frame = dict(frame, target_id=req.human["id"])
        if req.conversation_id is not None:
            frame["conversation_id"] = req.conversation_id
        if frame["type"] in ("CHAT", "AUTH_REQUEST") and "local_id" not in frame:
            req.sent += 1
            frame["local_id"] = f"butler-{req.rid}-{req.sent}"
        self.send(frame)

    def tell(self, req, text):
        self.to_human(req, {"type": "CHAT", "payload": text})

    def status_update(self, req, status):
        self.to_human(req, {"type": "AUTH_STATUS_UPDATE",
                            "payload": {"action_id": req.action_id, "status": status}})

    def ask_approval(self, req, word):
        req.action_id = str(uuid.uuid4())
        req.state = APPROVAL
        req.deadline = time.monotonic() + self.approval_timeout
        self.requests[req.rid] = req
        self.by_action[req.action_id] = req.rid
        log(f"asking {req.human['name']} to approve ({word!r}): {req.label()}")
        self.to_human(req, {
            "type": "AUTH_REQUEST",
            "local_id": f"auth-{req.action_id}",
            "payload": {
                "action_id": req.action_id,
                "command": req.task,
                "target_agent_name": req.agent_name,
                "reason": f"\"{word}\" is on the list of risky words, so a human must approve "
                          f"this instruction before it reaches {req.agent_name}.",
                "status": "PENDING",
            },
        })

    def forward(self, req):
        req.state = ANSWER
        req.forwarded_at = time.monotonic()
        req.deadline = req.forwarded_at + self.answer_timeout
        req.forward_local_id = f"forward-{req.rid}"
        self.requests[req.rid] = req
        self.by_local[req.forward_local_id] = req.rid
        log(f"forwarding: {req.label()}")
        self.send({"type": "CHAT", "target_id": req.agent_id, "payload": req.task,
                   "local_id": req.forward_local_id})

    def relay_answer(self, req, answer):
        if req.prefix is None:
            req.prefix = self.answer_prefix(req)
        log(f"answer relayed: {req.label()}")
        frame = {"type": "CHAT", "payload": req.prefix + answer}
        if req.stream_id is not None:
            frame["stream_id"] = req.stream_id
        self.to_human(req, frame)
        if req.stream_id is not None:
            self.to_human(req, {"type": "CHAT_STREAM_END", "payload": "",
                                "stream_id": req.stream_id})
        self.finish(req)

    def finish(self, req):
        self.requests.pop(req.rid, None)
        self.by_local.pop(req.forward_local_id, None)
        if req.action_id is not None:
            self.by_action.pop(req.action_id, None)
        if req.stream_id is not None:
            key = (req.agent_id, req.stream_id)
            self.streams.pop(key, None)
            self.closed_streams[key] = True
            while len(self.closed_streams) > SEEN_IDS_KEPT:
                self.closed_streams.popitem(last=False)

    def remember_action(self, action_id, outcome):
        self.answered_actions[action_id] = outcome
        while len(self.answered_actions) > SEEN_IDS_KEPT:
            self.answered_actions.popitem(last=False)

    # -- timers ---------------------------------------------------------------------------

    def next_deadline(self):
        deadlines = [r.deadline for r in self.requests.values() if r.deadline is not None]
        return min(deadlines) if deadlines else time.monotonic() + 3600

    def check_deadlines(self):
        now = time.monotonic()
        for req in [r for r in self.requests.values() if r.deadline is not None]:
            if req.deadline > now:
                continue
            if req.state == APPROVAL:
                log(f"approval timed out: {req.label()}")
                self.by_action.pop(req.action_id, None)
                self.remember_action(req.action_id, "EXPIRED")
                self.status_update(req, "EXPIRED")
                self.tell(req, f"No decision on \"{req.task}\" for {req.agent_name} within "
                               f"{fmt_duration(self.approval_timeout)}, so I did not forward "
                               "it. Ask again if it is still wanted.")
                self.finish(req)
            elif req.state == ANSWER:
                log(f"no answer in time: {req.label()}")
                self.tell(req, f"No answer from {req.agent_name} within "
                               f"{fmt_duration(self.answer_timeout)} to \"{req.task}\". I will "
                               "pass on its answer if it comes later.")
                req.state = LATE
                req.deadline = now + LATE_WINDOW
            else:
                self.finish(req)  # no late answer came either


def fmt_duration(s):
    if s >= 120 and s % 60 == 0:
        return f"{s / 60:.0f} min"
    return f"{s:g} s"


def readable(ws, timeout):
    """True when the connection has bytes to read (TLS may hold some already decrypted)."""
    sock = ws.sock
    if sock is None:
        raise websocket.WebSocketConnectionClosedException("the socket is closed")
    pending = getattr(sock, "pending", None)
    if pending is not None and pending() > 0:
        return True
    r, _, _ = select.select([sock], [], [], timeout)
    return bool(r)


def main(argv=None):
    p = argparse.ArgumentParser(
        description="The EchoCenter Butler: forwards humans' instructions to agents, asks "
                    "approval for risky ones, and relays the answers.")
    p.add_argument("--token", default=os.environ.get("ECHOCENTER_BUTLER_TOKEN"),
                   help="the Butler's API token (default: $ECHOCENTER_BUTLER_TOKEN)")
    p.add_argument("--url", default=os.environ.get("ECHOCENTER_URL") or "http://localhost:8080",
                   help="server URL (default: $ECHOCENTER_URL or http://localhost:8080)")
    p.add_argument("--risky-words",
                   default=os.environ.get("ECHOCENTER_BUTLER_RISKY_WORDS", DEFAULT_RISKY_WORDS),
                   help="comma-separated words that need a human's approval, matched as whole "
                        "words in any case; empty: never ask (default: "
                        "$ECHOCENTER_BUTLER_RISKY_WORDS or " + DEFAULT_RISKY_WORDS + ")")
    p.add_argument("--answer-timeout", type=seconds, default=30.0,
                   help="how long to wait for an agent's answer (default 30s)")
    p.add_argument("--approval-timeout", type=seconds, default=600.0,
                   help="how long an approval may stay pending (default 10m)")
    p.add_argument("--max-instruction-age", type=seconds, default=600.0,
                   help="instructions that arrive later than this after they were sent (the "
                        "Butler was offline) are not forwarded; 0: no limit (default 10m)")
    p.add_argument("--max-backoff", type=float, default=5.0,
                   help="longest wait between reconnection attempts, seconds (default 5)")
    p.add_argument("--once", action="store_true",
                   help="do not reconnect: exit when the first connection ends")
    args = p.parse_args(argv)
    if not args.token:
        p.error("no token: pass --token or set ECHOCENTER_BUTLER_TOKEN")
    if args.answer_timeout <= 0 or args.approval_timeout <= 0:
        p.error("timeouts must be greater than 0")
    try:
        butler = Butler(args)
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
        return butler.run()
    except Shutdown as s:
        log(f"signal {s.args[0]}: closing the connection and exiting")
        butler.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
