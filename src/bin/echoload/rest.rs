//! REST: the setup every scenario shares — one HTTP/1.1 request per connection, the admin
//! login, and registering the agents and humans a run needs (on a few threads).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::Res;

/// Threads used for REST setup (registration, logins) and for opening connections.
pub const SETUP_THREADS: usize = 8;

/// One HTTP/1.1 request with `Connection: close`; returns the status and the body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&Value>,
) -> Res<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = bearer {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if method != "GET" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes())
        .map_err(|e| format!("{method} {path}: {e}"))?;
    let mut buf = Vec::new();
    if let Err(e) = s.read_to_end(&mut buf) {
        if buf.is_empty() {
            return Err(format!("{method} {path}: {e}"));
        }
    }
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{method} {path}: malformed response"))?;
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let rest = &buf[split + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{method} {path}: malformed status line"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&b[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        b = &b[eol + 2..];
        if size == 0 || size > b.len() {
            break;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[(size + 2).min(b.len())..];
    }
    out
}

fn expect_json(r: (u16, String), want: u16, what: &str) -> Res<Value> {
    let (status, body) = r;
    if status != want {
        return Err(format!("{what}: HTTP {status}: {}", body.trim()));
    }
    serde_json::from_str(&body).map_err(|e| format!("{what}: bad JSON ({e}): {body}"))
}

pub fn login(addr: SocketAddr, user: &str, password: &str) -> Res<String> {
    let body = json!({"username": user, "password": password});
    // The server verifies a few passwords at a time and answers 503 with `Retry-After: 1`
    // to the rest (a login flood must not tie up its HTTP workers): retry, as a client should.
    let mut answer = http(addr, "POST", "/api/auth/login", None, Some(&body))?;
    for _ in 0..20 {
        if answer.0 != 503 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
        answer = http(addr, "POST", "/api/auth/login", None, Some(&body))?;
    }
    let v = expect_json(answer, 200, &format!("login {user}"))?;
    v["token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("login {user}: no token in response"))
}

/// A user the scenario created: its id and the token it connects with.
#[derive(Clone)]
pub struct Account {
    pub id: i64,
    pub token: String,
}

/// Runs `f` over `items` on `threads` scoped threads, results in input order.
pub fn par_map<T: Sync, U: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> U + Sync,
) -> Vec<U> {
    let next = AtomicUsize::new(0);
    let out: Vec<Mutex<Option<U>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, items.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= items.len() {
                    break;
                }
                let r = f(&items[i]);
                *out[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            });
        }
    });
    out.into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .expect("every index below len was taken by exactly one worker")
        })
        .collect()
}

pub fn register_agents(addr: SocketAddr, jwt: &str, names: &[String]) -> Res<Vec<Account>> {
    let started = Instant::now();
    let results = par_map(names, SETUP_THREADS, |name| {
        let v = expect_json(
            http(
                addr,
                "POST",
                "/api/users/agents",
                Some(jwt),
                Some(&json!({"username": name})),
            )?,
            201,
            &format!("register agent {name}"),
        )?;
        match (v["id"].as_i64(), v["api_token"].as_str()) {
            (Some(id), Some(token)) => Ok(Account {
                id,
                token: token.to_string(),
            }),
            _ => Err(format!("register agent {name}: no id/api_token in {v}")),
        }
    });
    let out = results.into_iter().collect::<Res<Vec<_>>>()?;
    note!(
        "registered {} agents in {:.1}s",
        out.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(out)
}

pub fn create_humans(
    addr: SocketAddr,
    jwt: &str,
    names: &[String],
    role: &str,
) -> Res<Vec<Account>> {
    let password = "echoload-password-1";
    let results = par_map(names, SETUP_THREADS, |name| {
        let v = expect_json(
            http(
                addr,
                "POST",
                "/api/users",
                Some(jwt),
                Some(&json!({"username": name, "password": password, "role": role})),
            )?,
            201,
            &format!("create user {name}"),
        )?;
        let id = v["id"]
            .as_i64()
            .ok_or_else(|| format!("create user {name}: no id"))?;
        Ok(Account {
            id,
            token: login(addr, name, password)?,
        })
    });
    results.into_iter().collect()
}

/// The Butler as an account: its id, and its raw token from the development endpoint (admin
/// JWT; a production server answers 404, and keeps no raw token to hand out anyway).
pub fn butler(addr: SocketAddr, jwt: &str) -> Res<Account> {
    let who = expect_json(
        http(addr, "GET", "/api/users/butler", Some(jwt), None)?,
        200,
        "GET /api/users/butler",
    )?;
    let (Some(id), Some(name)) = (who["id"].as_i64(), who["username"].as_str()) else {
        return Err(format!("GET /api/users/butler: no id/username in {who}"));
    };
    let path = format!("/api/dev/mock/agent-token/{name}");
    let v = expect_json(http(addr, "GET", &path, Some(jwt), None)?, 200, &path)?;
    match v["api_token"].as_str() {
        Some(token) if !token.is_empty() => Ok(Account {
            id,
            token: token.to_string(),
        }),
        _ => Err(format!(
            "{path}: no raw token for the Butler (rotated with a token of your own?)"
        )),
    }
}
