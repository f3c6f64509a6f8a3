//! demo.sh: a running demo world that cleans up after itself however it is stopped.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::{command, free_port, python, script, stdout, AGENTS};

fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("curl");
    (out.status.success(), stdout(&out))
}

/// True while `pid` is a live (not zombie) process.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
            !matches!(state, Some(Some('Z')))
        }
        Err(_) => false,
    }
}

/// demo.sh, stopped with SIGTERM on drop if the test fails midway (it then cleans up itself).
struct Demo {
    child: Option<Child>,
    pids: Vec<u32>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in &self.pids {
            if alive(*pid) {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
        }
    }
}

/// A running demo.sh, with what its "ready" block said.
struct RunningDemo {
    demo: Demo,
    tmp: TempDir,
    stderr_path: PathBuf,
    base: String,
    port: u16,
    server_pid: u32,
    agent_pid: u32,
    data_dir: PathBuf,
}

/// Starts demo.sh (in its own process group when `own_group`, as a shell's foreground job
/// is) and waits for its ready block.
fn start_demo(args: &[&str], own_group: bool) -> RunningDemo {
    use std::os::unix::process::CommandExt;
    let tmp = TempDir::new();
    let stderr_path = tmp.path().join("demo.err");
    // With SIGINT at its default: a test run started in the background of a non-interactive
    // shell inherits it ignored, and a shell cannot trap a signal ignored on entry, so the
    // script would never see the Ctrl-C these tests send.
    let mut cmd = command("env");
    cmd.args(["--default-signal=INT", "bash"])
        .arg(script("demo.sh"))
        .args(args)
        .env("ECHOCENTER_BIN", BIN)
        .env("ECHOCENTER_PYTHON", python())
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    if own_group {
        cmd.process_group(0);
    }
    let child = cmd.spawn().expect("start demo.sh");
    let mut demo = Demo {
        child: Some(child),
        pids: Vec::new(),
    };

    // Read its stdout until the ready block has been printed.
    let out = demo.child.as_mut().unwrap().stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !lines.iter().any(|l: &String| l.starts_with("Press Ctrl-C")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(e) => panic!(
                "demo.sh never got ready ({e:?}).\nstdout:\n{}\nstderr:\n{}",
                lines.join("\n"),
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            ),
        }
    }
    let field = |name: &str| -> String {
        lines
            .iter()
            .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {name:?} line in {lines:#?}"))
    };
    let ready = lines
        .iter()
        .find_map(|l| l.strip_prefix("EchoCenter demo ready: "))
        .unwrap_or_else(|| panic!("no ready line: {lines:#?}"));
    let base = ready.trim_end_matches('/').to_string();
    let port: u16 = base
        .strip_prefix("http://127.0.0.1:")
        .unwrap_or_else(|| panic!("unexpected URL {base}"))
        .parse()
        .unwrap();
    let server_pid: u32 = field("server pid:").parse().unwrap();
    let agent_pid: u32 = field("agent pid:").parse().unwrap();
    let data_dir = PathBuf::from(field("data dir:").split(' ').next().unwrap());
    demo.pids = vec![server_pid, agent_pid];
    assert!(alive(server_pid) && alive(agent_pid));
    assert!(data_dir.starts_with(tmp.path()), "{data_dir:?}");
    assert!(data_dir.join("echocenter.db").exists());
    RunningDemo {
        demo,
        tmp,
        stderr_path,
        base,
        port,
        server_pid,
        agent_pid,
        data_dir,
    }
}

impl RunningDemo {
    /// The API answers, with the demo world and only the mock agent online.
    fn check_api(&self) {
        let base = &self.base;
        let (ok, body) = curl(&[&format!("{base}/api/ping")]);
        assert!(ok && body.contains("pong"), "{body}");
        let (ok, body) = curl(&[
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"username":"admin","password":"admin123"}"#,
            &format!("{base}/api/auth/login"),
        ]);
        assert!(ok, "{body}");
        let jwt = serde_json::from_str::<Value>(&body).unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string();
        let auth = format!("Authorization: Bearer {jwt}");
        let (ok, body) = curl(&["-H", &auth, &format!("{base}/api/users/agents")]);
        assert!(ok, "{body}");
        let listed: Vec<Value> = serde_json::from_str(&body).unwrap();
        for (name, _) in AGENTS {
            let a = listed
                .iter()
                .find(|a| a["username"] == name)
                .unwrap_or_else(|| panic!("{name} missing: {body}"));
            assert_eq!(a["online"], name == "Storage-Custodian", "{name}: {a}");
        }
        let (_, body) = curl(&["-H", &auth, &format!("{base}/api/messages?limit=200")]);
        let rows: Vec<Value> = serde_json::from_str(&body).unwrap();
        assert!(rows.len() >= 21, "seeded rows: {}", rows.len());
    }

    /// Waits for demo.sh to exit; then nothing it started may be left. Returns its exit
    /// status and stderr.
    fn wait_and_check_cleanup(mut self) -> (ExitStatus, String) {
        let status = wait_child(self.demo.child.as_mut().unwrap(), Duration::from_secs(30));
        self.demo.child = None;
        let stderr = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        assert!(!alive(self.server_pid), "server left running: {stderr}");
        assert!(!alive(self.agent_pid), "mock agent left running: {stderr}");
        assert!(!self.data_dir.exists(), "{:?} not removed", self.data_dir);
        assert!(
            TcpStream::connect(("127.0.0.1", self.port)).is_err(),
            "port {} still open",
            self.port
        );
        // Only the demo's directory was in TMPDIR (the server's private socket dir is gone too).
        let left: Vec<_> = std::fs::read_dir(self.tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != "demo.err")
            .collect();
        assert!(left.is_empty(), "left in TMPDIR: {left:?}");
        (status, stderr)
    }
}

fn kill(sig: &str, target: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(target)
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {target}");
}

#[test]
fn demo_on_a_given_port_cleans_up_when_interrupted() {
    let port = free_port();
    let demo = start_demo(&["--port", &port.to_string()], false);
    assert_eq!(demo.port, port);
    demo.check_api();
    // SIGINT to the script alone: it must stop its children itself.
    kill("INT", &demo.demo.child.as_ref().unwrap().id().to_string());
    let (status, stderr) = demo.wait_and_check_cleanup();
    assert!(status.success(), "demo.sh exit {status:?}: {stderr}");
}

#[test]
fn demo_on_a_free_port_cleans_up_after_ctrl_c_to_the_process_group() {
    let demo = start_demo(&[], true);
    demo.check_api();
    // A terminal's Ctrl-C: SIGINT to the whole foreground process group.
    let pgid = demo.demo.child.as_ref().unwrap().id();
    kill("INT", &format!("-{pgid}"));
    let (status, stderr) = demo.wait_and_check_cleanup();
    assert!(status.success(), "demo.sh exit {status:?}: {stderr}");
}

#[test]
fn demo_stops_and_cleans_up_when_the_server_dies() {
    let demo = start_demo(&[], false);
    kill("KILL", &demo.server_pid.to_string());
    let (status, stderr) = demo.wait_and_check_cleanup();
    assert_eq!(
        status.code(),
        Some(1),
        "a crashed server is a failure: {stderr}"
    );
    assert!(stderr.contains("server stopped unexpectedly"), "{stderr}");
}
