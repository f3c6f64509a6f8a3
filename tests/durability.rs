//! Faults: a crash under load loses no acknowledged message and duplicates none; a database
//! that cannot be written gives clear errors and the server keeps serving.
mod common;
use common::*;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[test]
fn kill_9_under_load_keeps_every_acknowledged_message_exactly_once() {
    let s = Server::start();
    let admin = s.admin_token();
    let agents: Vec<(i64, String)> = (0..4)
        .map(|i| s.register_agent(&admin, &format!("load{i}")))
        .collect();
    let acked: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for (n, (_, token)) in agents.iter().enumerate() {
        let mut ws = s.ws(token);
        let (acked, stop) = (acked.clone(), stop.clone());
        workers.push(std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let local_id = format!("a{n}-{i}");
                if ws
                    .inner
                    .send(tungstenite::Message::text(
                        json!({"type": "CHAT", "target_id": 1, "payload": i, "local_id": local_id})
                            .to_string(),
                    ))
                    .is_err()
                {
                    return;
                }
                // Wait for this frame's ACK; a dead server ends the loop.
                loop {
                    match ws.inner.read() {
                        Ok(tungstenite::Message::Text(t)) => {
                            let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                            if v["type"] == "ACK" {
                                acked.lock().unwrap().insert(
                                    v["local_id"].as_str().unwrap().to_string(),
                                    v["id"].as_i64().unwrap(),
                                );
                                break;
                            }
                        }
                        Ok(_) => {}
                        Err(tungstenite::Error::Io(e))
                            if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => return,
                    }
                }
                i += 1;
            }
        }));
    }
    s.wait_for("200 acknowledged messages", Duration::from_secs(30), || {
        acked.lock().unwrap().len() >= 200
    });
    let mut s = s;
    s.kill9();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let s = s.restart(&[], &[]);
    let admin = s.admin_token();
    let mut seen_local: HashSet<String> = HashSet::new();
    let mut stored: HashMap<String, i64> = HashMap::new();
    for (id, _) in &agents {
        let mut before: Option<i64> = None;
        loop {
            let path = match before {
                Some(b) => format!("/api/chat/history/{id}?limit=500&before_id={b}"),
                None => format!("/api/chat/history/{id}?limit=500"),
            };
            let rows = s.get(&path, &admin).json();
            let rows = rows.as_array().unwrap();
            if rows.is_empty() {
                break;
            }
            for r in rows {
                let local = r["local_id"].as_str().unwrap().to_string();
                assert!(seen_local.insert(local.clone()), "duplicated {local}");
                stored.insert(local, r["id"].as_i64().unwrap());
            }
            before = rows.first().and_then(|r| r["id"].as_i64());
        }
    }
    for (local, id) in &acked {
        assert_eq!(
            stored.get(local),
            Some(id),
            "acknowledged {local} (id {id}) missing after kill -9"
        );
    }
}

#[test]
fn a_locked_database_gives_internal_errors_and_the_server_recovers() {
    if skip_on_postgres("holds SQLite's write lock from another process") {
        return;
    }
    let s = Server::start();
    let admin = s.admin_token();
    let (_, token) = s.register_agent(&admin, "patient");
    let mut agent = s.ws(&token);
    // Another process (a backup tool, say) holds the write lock longer than busy_timeout.
    let blocker = rusqlite::Connection::open(&s.db).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let mut human = s.ws(&admin);
    // A burst: the frames are in flight together, and each one's failure is reported.
    let burst: Vec<_> = (1..=3)
        .map(|i| json!({"type": "CHAT", "target_id": 1, "payload": format!("try {i}"), "local_id": format!("retry-{i}")}))
        .collect();
    agent.send_burst(&burst);
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let mut errors = Vec::new();
    while errors.len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "no ERROR frames: {errors:?}"
        );
        if let Some(v) = agent.recv_within(Duration::from_millis(500)) {
            assert_ne!(v["type"], "ACK", "{v}");
            if v["type"] == "ERROR" {
                assert_eq!(v["payload"]["code"], "internal");
                errors.push(v["local_id"].as_str().unwrap().to_string());
            }
        }
    }
    assert_eq!(errors, ["retry-1", "retry-2", "retry-3"]);
    // Nothing unstored was routed.
    human.assert_no("CHAT", Duration::from_millis(300));
    // REST reads still work while writes fail.
    assert_eq!(s.get("/api/users/agents", &admin).status, 200);
    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);
    // The same local_ids, retried, are stored once each and delivered in order.
    agent.send_burst(&burst);
    for i in 1..=3 {
        assert_eq!(agent.recv_type("ACK")["local_id"], format!("retry-{i}"));
        assert_eq!(human.recv_type("CHAT")["payload"], format!("try {i}"));
    }
    agent.send_burst(&burst);
    for i in 1..=3 {
        assert_eq!(agent.recv_type("ACK")["local_id"], format!("retry-{i}"));
    }
    human.assert_no("CHAT", Duration::from_millis(300));
    let history = s.get("/api/chat/history/1", &token).json();
    assert_eq!(history.as_array().unwrap().len(), 3);
    let log = s.stderr();
    assert!(
        log.contains("store:") || log.contains("storing a frame failed"),
        "no log line about the failure: {log}"
    );
}

/// A small tmpfs mounted for one test, unmounted (and removed) on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// None where this machine does not let us mount (not root).
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = std::env::temp_dir().join(format!("echocenter-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        Some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_disk_gives_clear_errors_loses_nothing_acknowledged_and_recovers() {
    if skip_on_postgres("fills the disk under the SQLite file") {
        return;
    }
    let Some(fs) = Tmpfs::mount("4m") else {
        eprintln!(
            "SKIPPED: mounting a tmpfs needs root; run the suite as root to cover a full disk"
        );
        return;
    };
    let dir = TempDir::new();
    let db = fs.0.join("echocenter.db");
    let s = Server::start_on(dir, db, &[], &[]);
    let admin = s.admin_token();
    let (_, token) = s.register_agent(&admin, "filler");
    let mut agent = s.ws(&token);
    // Leave the database only a little room.
    let ballast = fs.0.join("ballast");
    let free = {
        let out = std::process::Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(&fs.0)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    std::fs::write(&ballast, vec![0u8; free.saturating_sub(64 * 1024) as usize]).unwrap_or(());
    // Write until the disk refuses; every acknowledged frame is remembered.
    let big = "x".repeat(30_000);
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..200 {
        let local_id = format!("fill-{i}");
        agent.send_json(
            json!({"type": "CHAT", "target_id": 1, "payload": big, "local_id": local_id}),
        );
        let v = agent.recv_until(
            |v| v["type"] == "ACK" || v["type"] == "ERROR",
            "ACK or ERROR",
        );
        if v["type"] == "ERROR" {
            assert_eq!(v["payload"]["code"], "internal", "{v}");
            assert_eq!(v["local_id"], local_id.as_str());
            refused = Some(local_id);
            break;
        }
        acked.push((local_id, v["id"].as_i64().unwrap()));
    }
    let refused = refused.expect("the full disk never refused a write");
    // REST writes fail with a generic 500, reads keep working, and the log says why.
    let r = s.post(
        "/api/messages",
        &admin,
        json!({"agent_id": "filler", "level": "INFO", "content": big}),
    );
    assert_eq!(
        (r.status, r.error().as_str()),
        (500, "internal server error")
    );
    assert_eq!(s.get("/api/users/agents", &admin).status, 200);
    assert!(
        s.stderr().contains("store:") || s.stderr().contains("storing a frame failed"),
        "{}",
        s.stderr()
    );
    // Room again: the refused frame, retried with its local_id, is stored once.
    std::fs::remove_file(&ballast).unwrap();
    agent.send_json(
        json!({"type": "CHAT", "target_id": 1, "payload": "small", "local_id": refused}),
    );
    assert_eq!(agent.recv_type("ACK")["local_id"], refused.as_str());
    // Nothing acknowledged was lost.
    let history = s.get("/api/chat/history/1?limit=500", &token).json();
    let stored: Vec<i64> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    for (local_id, id) in &acked {
        assert!(
            stored.contains(id),
            "acknowledged {local_id} (id {id}) missing"
        );
    }
    drop(s);
    drop(fs);
}
