//! The agents of a chat run: each answers every CHAT with the request's payload (chat, the
//! Butler fan-out), or with CHAT_STREAM chunks, a final CHAT and CHAT_STREAM_END (stream).

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};
use tungstenite::WebSocket;

use crate::clock::now_us;
use crate::measure::{count_into, merge_counts};
use crate::ws::{send_json, text_of};
use crate::Res;

/// What one agent saw.
#[derive(Default)]
pub struct AgentReport {
    pub requests: u64,
    pub frames_sent: u64,
    pub errors: BTreeMap<String, u64>,
    pub send_failures: u64,
}

/// Answers every CHAT with the request's payload (chat), or with `chunks` CHAT_STREAM frames, a
/// final CHAT and CHAT_STREAM_END (stream). Ends when the socket does.
pub fn agent_loop(mut ws: WebSocket<TcpStream>, chunks: usize, gap: Duration) -> AgentReport {
    let mut r = AgentReport::default();
    while let Ok(msg) = ws.read() {
        let Some(v) = text_of(&msg).and_then(|t| serde_json::from_str::<Value>(t).ok()) else {
            continue;
        };
        match v["type"].as_str() {
            Some("CHAT") => {
                let Some(sender) = v["sender_id"].as_i64().filter(|&s| s > 0) else {
                    continue;
                };
                r.requests += 1;
                let payload = &v["payload"];
                let mut frames = Vec::with_capacity(chunks + 2);
                if chunks == 0 {
                    frames.push(json!({"type": "CHAT", "target_id": sender, "payload": payload}));
                } else {
                    let seq = payload
                        .as_str()
                        .and_then(|p| p.split(' ').nth(1))
                        .unwrap_or("0");
                    let sid = format!("s{seq}");
                    for j in 0..chunks {
                        if j > 0 && !gap.is_zero() {
                            std::thread::sleep(gap);
                        }
                        let chunk = json!({"type": "CHAT_STREAM", "target_id": sender, "stream_id": sid,
                                            "payload": format!("c {j} {}", now_us())});
                        if send_json(&mut ws, &chunk).is_err() {
                            r.send_failures += 1;
                            return r;
                        }
                        r.frames_sent += 1;
                    }
                    frames.push(json!({"type": "CHAT", "target_id": sender, "stream_id": sid, "payload": payload}));
                    frames.push(json!({"type": "CHAT_STREAM_END", "target_id": sender, "stream_id": sid, "payload": ""}));
                }
                for f in &frames {
                    if send_json(&mut ws, f).is_err() {
                        r.send_failures += 1;
                        return r;
                    }
                    r.frames_sent += 1;
                }
            }
            Some("ERROR") => {
                count_into(&mut r.errors, v["payload"]["code"].as_str().unwrap_or("?"))
            }
            _ => {}
        }
    }
    r
}

pub fn finish_agents(threads: Vec<JoinHandle<AgentReport>>) -> Res<AgentReport> {
    let mut total = AgentReport::default();
    for t in threads {
        let r = t.join().map_err(|_| "an agent thread panicked")?;
        total.requests += r.requests;
        total.frames_sent += r.frames_sent;
        total.send_failures += r.send_failures;
        merge_counts(&mut total.errors, r.errors);
    }
    Ok(total)
}
