//! `chat`, `stream` and `butler`: senders (humans, or the Butler) send CHAT to agents that
//! answer each one (a CHAT with the request's payload; stream: CHAT_STREAM chunks, the final
//! CHAT and CHAT_STREAM_END), paced at an offered rate (open loop) or with K requests in flight
//! (closed loop). Round-trip latency, lost and duplicated replies and echoes (the Butler:
//! ACKs), and whether a stream's order was kept.
//!
//! `agent` answers, `sender` sends, `receiver` tallies what comes back to a sender; this file
//! runs a scenario and writes its report.

mod agent;
mod receiver;
mod sender;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::protocol::Role;
use tungstenite::WebSocket;

use crate::clock::now_us;
use crate::measure::{latency, merge_counts, ms, round2, Observer, ThreadBusy};
use crate::options::{ChatArgs, Common};
use crate::rest::{self, create_humans, login, register_agents};
use crate::ws::{
    is_timeout, open_all_ok, shutdown_all, spawn_small, split, text_of, ws_config, Split,
};
use crate::Res;

use agent::{agent_loop, finish_agents, AgentReport};
use receiver::SenderRx;
use sender::{closed_loop_human, paced_sender, Requests, SendReport};

pub fn run(c: &Common, a: &ChatArgs) -> Res<Value> {
    let butler = a.butler_interval.is_some();
    let (scenario, role) = if a.stream {
        ("stream", "human")
    } else if butler {
        ("butler", "butler")
    } else {
        ("chat", "human")
    };
    let tag = if a.stream {
        "s"
    } else if butler {
        "b"
    } else if a.closed_loop > 0 {
        "k"
    } else {
        "r"
    };
    let jwt = login(c.addr, &c.admin_user, &c.admin_password)?;
    let agent_names: Vec<String> = (0..a.agents)
        .map(|i| format!("{}-{tag}a{i}", c.prefix))
        .collect();
    let human_names: Vec<String> = (0..a.humans)
        .map(|i| format!("{}-{tag}h{i}", c.prefix))
        .collect();
    let agents = register_agents(c.addr, &jwt, &agent_names)?;
    // The senders: humans made for the run, or the Butler that every server has.
    let humans = if butler {
        vec![rest::butler(c.addr, &jwt)?]
    } else {
        create_humans(c.addr, &jwt, &human_names, "MEMBER")?
    };
    if butler {
        note!(
            "the Butler (id {}), {} agents ready",
            humans[0].id,
            agents.len()
        );
    } else {
        note!("{} humans, {} agents ready", humans.len(), agents.len());
    }

    let agent_tokens: Vec<&str> = agents.iter().map(|x| x.token.as_str()).collect();
    let human_tokens: Vec<&str> = humans.iter().map(|x| x.token.as_str()).collect();
    let agent_socks = open_all_ok(c.agent_addr.unwrap_or(c.addr), &agent_tokens, "agent")?;
    let mut ctls = Vec::new();
    let mut agent_threads = Vec::new();
    for (i, s) in agent_socks.into_iter().enumerate() {
        ctls.push(s.try_clone().map_err(|e| e.to_string())?);
        let ws = WebSocket::from_raw_socket(s, Role::Client, Some(ws_config()));
        let (chunks, gap) = (a.chunks, a.chunk_gap);
        agent_threads.push(spawn_small(format!("agent-{i}"), move || {
            agent_loop(ws, chunks, gap)
        })?);
    }
    let human_socks = open_all_ok(c.addr, &human_tokens, role)?;
    // Let the PRESENCE frames of the agents' connects pass before measuring.
    std::thread::sleep(Duration::from_millis(500));

    let agent_ids = Arc::new(agents.iter().map(|x| x.id).collect::<Vec<_>>());
    let peers: Arc<HashSet<i64>> = Arc::new(agent_ids.iter().copied().collect());
    let req = Requests {
        pad: "x".repeat(a.payload_bytes),
        timed_local_id: butler,
    };
    let done: Vec<Arc<AtomicU64>> = (0..a.humans).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let observer = Observer::start(c, true);
    let start = Instant::now();
    let end = start + a.duration;
    let drain_until = end + a.drain;
    let start_us = now_us();
    let window = if a.closed_loop > 0 {
        (
            start_us + a.warmup.as_micros() as u64,
            start_us + a.duration.as_micros() as u64,
        )
    } else {
        (0, u64::MAX)
    };

    let mut rxs: Vec<SenderRx> = Vec::new();
    let mut sends: Vec<SendReport> = Vec::new();
    if a.closed_loop > 0 {
        let mut threads = Vec::new();
        for (i, s) in human_socks.into_iter().enumerate() {
            let sp = split(s)?;
            ctls.push(sp.ctl.try_clone().map_err(|e| e.to_string())?);
            let inflight = a.closed_loop / a.humans + usize::from(i < a.closed_loop % a.humans);
            let (ids, peers, req, me, chunks, d) = (
                agent_ids.clone(),
                peers.clone(),
                req.clone(),
                humans[i].id,
                a.chunks,
                done[i].clone(),
            );
            let nh = a.humans;
            threads.push(spawn_small(format!("{role}-{i}"), move || {
                let mut rx = SenderRx::new(me, butler, peers, chunks, window, d);
                let r =
                    closed_loop_human(sp, &mut rx, i, nh, &ids, inflight, end, drain_until, &req);
                (rx, r)
            })?);
        }
        for t in threads {
            let (rx, r) = t.join().map_err(|_| "a human thread panicked")?;
            rxs.push(rx);
            sends.push(r);
        }
    } else {
        let interval = Duration::from_secs_f64(a.humans as f64 / a.rate);
        let mut readers = Vec::new();
        let mut senders = Vec::new();
        for (i, s) in human_socks.into_iter().enumerate() {
            let Split {
                writer,
                mut reader,
                ctl,
            } = split(s)?;
            ctls.push(ctl);
            let (me, peers, chunks, d) = (humans[i].id, peers.clone(), a.chunks, done[i].clone());
            readers.push(spawn_small(format!("{role}-rx-{i}"), move || {
                let busy = ThreadBusy::start();
                let mut rx = SenderRx::new(me, butler, peers, chunks, window, d);
                loop {
                    match reader.read() {
                        Ok(m) => {
                            if let Some(t) = text_of(&m) {
                                rx.handle(t);
                            }
                        }
                        Err(e) if is_timeout(&e) => continue,
                        Err(_) => break,
                    }
                }
                rx.busy_pct = busy.pct();
                rx
            })?);
            let (ids, req, nh) = (agent_ids.clone(), req.clone(), a.humans);
            senders.push(spawn_small(format!("{role}-tx-{i}"), move || {
                paced_sender(writer, i, nh, ids, interval, start, end, req)
            })?);
        }
        for t in senders {
            sends.push(t.join().map_err(|_| "a sender thread panicked")?);
        }
        let sent_total: u64 = sends.iter().map(|s| s.sent).sum();
        // Drain: wait until every request is answered, or give up at the deadline.
        while Instant::now() < drain_until {
            let done_total: u64 = done.iter().map(|d| d.load(Relaxed)).sum();
            if done_total >= sent_total {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let measured = observer.finish();
        shutdown_all(&ctls);
        for t in readers {
            rxs.push(t.join().map_err(|_| "a reader thread panicked")?);
        }
        return chat_report(
            scenario,
            a,
            rxs,
            sends,
            finish_agents(agent_threads)?,
            measured,
        );
    }
    let measured = observer.finish();
    shutdown_all(&ctls);
    chat_report(
        scenario,
        a,
        rxs,
        sends,
        finish_agents(agent_threads)?,
        measured,
    )
}

fn chat_report(
    scenario: &str,
    a: &ChatArgs,
    rxs: Vec<SenderRx>,
    sends: Vec<SendReport>,
    agents: AgentReport,
    measured: Value,
) -> Res<Value> {
    let sent: u64 = sends.iter().map(|s| s.sent).sum();
    let send_failures: u64 = sends.iter().map(|s| s.send_failures).sum();
    let max_lag = sends.iter().map(|s| s.max_lag).max().unwrap_or_default();
    let busiest = sends
        .iter()
        .filter_map(|s| s.busy_pct)
        .chain(rxs.iter().filter_map(|r| r.busy_pct))
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    let (mut rtt, mut echo, mut chunk, mut stream) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut errors = BTreeMap::new();
    let (mut answered, mut echoed, mut replies, mut echoes) = (0u64, 0u64, 0u64, 0u64);
    let (mut dup_replies, mut dup_echoes, mut bad_echo, mut order, mut unknown) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut chunks, mut ends, mut dup_ends, mut in_window, mut complete_chunks) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for (rx, s) in rxs.into_iter().zip(&sends) {
        let slots = &rx.slots[..(s.sent as usize).min(rx.slots.len())];
        answered += slots
            .iter()
            .filter(|x| {
                if rx.chunks == 0 {
                    x.replies > 0
                } else {
                    x.ends > 0
                }
            })
            .count() as u64;
        echoed += slots.iter().filter(|x| x.echoes > 0).count() as u64;
        complete_chunks += slots.iter().filter(|x| x.next_chunk == rx.chunks).count() as u64;
        replies += rx.replies_received;
        echoes += rx.echoes_received;
        dup_replies += rx.dup_replies;
        dup_echoes += rx.dup_echoes;
        bad_echo += rx.bad_echo;
        order += rx.order_violations;
        unknown += rx.unknown;
        chunks += rx.chunks_received;
        ends += rx.ends_received;
        dup_ends += rx.dup_ends;
        in_window += rx.in_window;
        rtt.extend(rx.rtt);
        echo.extend(rx.echo_lat);
        chunk.extend(rx.chunk_lat);
        stream.extend(rx.stream_lat);
        merge_counts(&mut errors, rx.errors);
    }
    let mut out = json!({
        "scenario": scenario,
        "mode": if a.closed_loop > 0 { "closed" } else { "open" },
        "humans": a.humans,
        "agents": a.agents,
        "duration_s": a.duration.as_secs_f64(),
        "sent": sent,
        "received": replies,
        "answered": answered,
        "lost": sent - answered,
        "duplicated": dup_replies,
        "echo": {"received": echoes, "lost": sent - echoed, "duplicated": dup_echoes, "bad": bad_echo,
                 "latency": latency(echo)},
        "send_failures": send_failures,
        "max_send_lag_ms": ms(max_lag.as_micros() as u64),
        "errors": errors,
        "unknown_frames": unknown,
        "agent_side": {"requests": agents.requests, "frames_sent": agents.frames_sent,
                       "send_failures": agents.send_failures, "errors": agents.errors},
        "observed": measured,
    });
    if a.closed_loop > 0 {
        let window = (a.duration - a.warmup).as_secs_f64();
        out["closed_loop"] = json!(a.closed_loop);
        out["warmup_s"] = json!(a.warmup.as_secs_f64());
        out["rt_per_s"] = json!(round2(in_window as f64 / window));
    } else {
        out["rate_offered"] = json!(a.rate);
        out["rt_per_s"] = json!(round2(answered as f64 / a.duration.as_secs_f64()));
    }
    if let Some(pct) = busiest {
        out["busiest_sender_thread_cpu_pct"] = json!(pct);
    }
    if let Some(interval) = a.butler_interval {
        // One sender, the Butler: its stored frames come back as ACKs, not echoes.
        let map = out.as_object_mut().expect("built as an object above");
        map.remove("humans");
        if let Some(acks) = map.remove("echo") {
            map.insert("ack".into(), acks);
        }
        out["interval_ms"] = json!(round2(interval.as_secs_f64() * 1000.0));
    }
    if a.stream {
        out["chunks_per_stream"] = json!(a.chunks);
        out["chunks_received"] = json!(chunks);
        out["chunks_expected"] = json!(sent * a.chunks as u64);
        out["streams_with_all_chunks"] = json!(complete_chunks);
        out["ends_received"] = json!(ends);
        out["duplicated_ends"] = json!(dup_ends);
        out["order_violations"] = json!(order);
        out["order_kept"] = json!(order == 0);
        out["chunk_latency"] = latency(chunk);
        out["stream_latency"] = latency(stream);
        out["final_latency"] = latency(rtt);
    } else {
        out["latency"] = latency(rtt);
    }
    Ok(out)
}
