//! The shell-first tools in `scripts/`, run as an operator would, against a real server:
//! register-agent.sh, seed-demo.sh, mock-agent.py, demo.sh and the systemd unit.
//!
//! Needs `curl`, `bash` and `python3` on PATH, and `ECHOCENTER_TEST_PYTHON` pointing to a
//! Python with websocket-client (scripts/test.sh provides it).
//!
//! One module per script (the tests' names say what each pins); the helpers more than one of
//! them uses are below.
#[path = "../common/mod.rs"]
mod common;

mod demo;
mod mock_agent;
mod register_agent;
mod seed_demo;
mod service_and_hygiene;

use common::*;

use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const AGENTS: [(&str, &str); 4] = [
    ("Observer", "mock-observer-token"),
    ("Diagnoser", "mock-diagnoser-token"),
    ("Guardian", "mock-guardian-token"),
    ("Storage-Custodian", "mock-storage-custodian-token"),
];

fn python() -> String {
    std::env::var("ECHOCENTER_TEST_PYTHON").expect(
        "ECHOCENTER_TEST_PYTHON is not set: run the suite with scripts/test.sh, which makes a \
         venv with websocket-client (or point it at a python that can `import websocket`)",
    )
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

fn url(s: &Server) -> String {
    format!("http://{}", s.addr)
}

/// A command for a script with the operator's environment variables cleared, so that the
/// machine running the tests cannot change the outcome.
fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for var in [
        "ECHOCENTER_URL",
        "ECHOCENTER_ADMIN_USER",
        "ECHOCENTER_ADMIN_PASSWORD",
        "ECHOCENTER_AGENT_TOKEN",
        "ECHOCENTER_BIN",
        "ECHOCENTER_PYTHON",
        "ECHOCENTER_DEMO_PORT",
        "ECHOCENTER_DEMO_HOST",
        "ECHOCENTER_DEMO_KEEP",
        "ECHOCENTER_ENV",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null());
    cmd
}

fn run(mut cmd: Command) -> Output {
    cmd.output().expect("run script")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn register(s_url: &str, password: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = command(script("register-agent.sh"));
    cmd.args(args).env("ECHOCENTER_URL", s_url);
    if let Some(p) = password {
        cmd.env("ECHOCENTER_ADMIN_PASSWORD", p);
    }
    run(cmd)
}

fn seed(s: &Server) -> Output {
    let mut cmd = command(script("seed-demo.sh"));
    cmd.env("ECHOCENTER_URL", url(s))
        .env("ECHOCENTER_ADMIN_PASSWORD", "admin123");
    run(cmd)
}

/// A port nothing listens on (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn agents(s: &Server, admin: &str) -> Vec<Value> {
    let r = s.get("/api/users/agents", admin);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json().as_array().unwrap().clone()
}

fn logs(s: &Server, admin: &str, query: &str) -> Vec<Value> {
    let r = s.get(&format!("/api/messages?limit=200{query}"), admin);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json().as_array().unwrap().clone()
}

fn history(s: &Server, jwt: &str, peer: i64) -> Vec<Value> {
    let r = s.get(&format!("/api/chat/history/{peer}"), jwt);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json().as_array().unwrap().clone()
}
