#!/usr/bin/env python3
"""A small agent for the dashboard end-to-end test, written the way the integration guide
tells agents to be written (websocket-client, one WebSocket, JSON frames).

- On connect it sends a SYSTEM_LOG ("<name> online").
- On every CHAT it answers the sender with the guide's streaming pattern: three CHAT_STREAM
  chunks, then one final CHAT with the same stream_id (the only persisted part), then
  CHAT_STREAM_END. It pauses --delay seconds between steps so a browser can watch the stream.
  It also logs one SYSTEM_LOG per CHAT handled.
- With --auth-request-to USER_ID (run it with the Butler's token) it also sends an
  AUTH_REQUEST to that human (one per --ask COMMAND, else one for --command) and logs each
  AUTH_RESPONSE it gets back as a SYSTEM_LOG.
- --send JSON (repeatable) sends that frame, verbatim, right after connecting (an
  AGENT_STATUS, a custom type such as WEATHER_UPDATE). With --frames-by-chat, a CHAT whose
  text is "frame: JSON" makes it send that frame instead of answering, so a test can choose
  when (AGENT_STATUS IDLE later, say).
- With --silent it answers nothing: it counts the CHATs it receives and logs the count
  every 100 (a receiver for store and forward's replay).
- With --connect URL it connects to that exact URL: the connect line the dashboard's token
  card shows (ws://HOST/api/ws?token=...), so the test proves that line works as printed.

It prints one line per event on stdout and exits 0 when the server closes the connection.
"""

import argparse
import json
import sys
import time
import uuid

import websocket


def say(line):
    print(line, flush=True)


def send(ws, frame):
    ws.send(json.dumps(frame))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", help="server base, e.g. ws://127.0.0.1:8080")
    ap.add_argument("--token")
    ap.add_argument("--connect", help="the whole connect line instead of --url and --token, "
                    "e.g. ws://127.0.0.1:8080/api/ws?token=ec_... (as the dashboard's token card shows it)")
    ap.add_argument("--name", default="agent")
    ap.add_argument("--delay", type=float, default=0.4)
    ap.add_argument("--auth-request-to", type=int, default=0)
    ap.add_argument("--command", default="systemctl restart storage")
    ap.add_argument("--ask", action="append", default=[],
                    help="with --auth-request-to: one AUTH_REQUEST per command (repeatable)")
    ap.add_argument("--send", action="append", default=[], help="a frame (JSON) to send on connect")
    ap.add_argument("--frames-by-chat", action="store_true",
                    help='a CHAT "frame: JSON" makes the agent send that frame')
    ap.add_argument("--silent", action="store_true",
                    help="do not answer CHATs: count them and log the count every 100")
    args = ap.parse_args()
    if not args.connect and not (args.url and args.token):
        ap.error("give --connect, or --url and --token")

    ws = websocket.create_connection(args.connect or f"{args.url}/api/ws?token={args.token}")
    say("connected")
    send(ws, {"type": "SYSTEM_LOG", "payload": {"level": "SUCCESS", "content": f"{args.name} online"}})

    for raw in args.send:
        ws.send(raw)
        say(f"sent {raw}")

    if args.auth_request_to:
        for command in args.ask or [args.command]:
            action_id = str(uuid.uuid4())
            send(ws, {
                "type": "AUTH_REQUEST",
                "target_id": args.auth_request_to,
                "local_id": str(uuid.uuid4()),
                "payload": {
                    "action_id": action_id,
                    "target_agent_name": "Storage-Custodian",
                    "command": command,
                    "reason": "disk usage above 90%",
                    "status": "PENDING",
                },
            })
            say(f"auth request {action_id} {command}")

    handled = 0
    while True:
        try:
            raw = ws.recv()
        except (websocket.WebSocketConnectionClosedException, ConnectionError, OSError):
            break
        if not raw:
            break
        try:
            msg = json.loads(raw)
        except ValueError:
            continue
        kind = msg.get("type")
        if kind == "CHAT" and msg.get("sender_id") and args.silent:
            handled += 1
            if handled % 100 == 0:
                send(ws, {"type": "SYSTEM_LOG", "payload": {"level": "INFO", "content": f"{args.name} received {handled} chats"}})
                say(f"received {handled} chats")
        elif (kind == "CHAT" and args.frames_by_chat and isinstance(msg.get("payload"), str)
              and msg["payload"].startswith("frame: ")):
            raw = msg["payload"][len("frame: "):]
            ws.send(raw)
            say(f"sent {raw}")
        elif kind == "CHAT" and msg.get("sender_id"):
            handled += 1
            text = msg.get("payload")
            if not isinstance(text, str):
                text = json.dumps(text)
            say(f"chat from {msg.get('sender_name')}: {text}")
            to = msg["sender_id"]
            stream_id = str(uuid.uuid4())
            chunks = ["Echo: ", text, " (3 chunks)"]
            for chunk in chunks:
                send(ws, {"type": "CHAT_STREAM", "target_id": to, "stream_id": stream_id, "payload": chunk})
                time.sleep(args.delay)
            send(ws, {
                "type": "CHAT",
                "target_id": to,
                "stream_id": stream_id,
                "local_id": str(uuid.uuid4()),
                "payload": "".join(chunks),
            })
            send(ws, {"type": "CHAT_STREAM_END", "target_id": to, "stream_id": stream_id, "payload": ""})
            send(ws, {"type": "SYSTEM_LOG", "payload": {"level": "INFO", "content": f"{args.name} handled chat #{handled}"}})
            say(f"replied on stream {stream_id}")
        elif kind == "AUTH_RESPONSE":
            p = msg.get("payload") or {}
            verdict = "approved" if p.get("approved") else "rejected"
            say(f"auth response {verdict}")
            send(ws, {"type": "SYSTEM_LOG", "payload": {"level": "AUTH", "content": f"auth response received: {verdict}"}})
        elif kind == "ERROR":
            say(f"error frame: {json.dumps(msg.get('payload'))}")
    say("closed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
