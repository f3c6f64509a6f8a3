//! The integration guide's Python example, run as a user would: a real websocket-client
//! process with a token from the registration API.
mod common;
use common::*;
use serde_json::json;
use std::process::{Command, Stdio};

fn python() -> String {
    std::env::var("ECHOCENTER_TEST_PYTHON")
        .expect("ECHOCENTER_TEST_PYTHON is not set: run the suite with scripts/test.sh, which provides websocket-client")
}

#[test]
fn the_guides_python_agent_reports_online_and_answers_roger_that() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent_id, token) = s.register_agent(&admin, "Guide-Agent");
    let mut dashboard = s.ws(&admin);

    let script = std::fs::read_to_string("tests/guide/agent.py")
        .unwrap()
        .replace("your_token_here", &token)
        .replace("localhost:8080", &s.addr);
    let path = s.dir.path().join("agent.py");
    std::fs::write(&path, script).unwrap();
    let mut agent = Command::new(python())
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let log = dashboard.recv_type("SYSTEM_LOG");
    assert_eq!(log["payload"]["content"], "Agent Online");
    assert_eq!(log["payload"]["level"], "SUCCESS");
    assert_eq!(log["sender_id"], agent_id);

    dashboard.send_json(
        json!({"type": "CHAT", "target_id": agent_id, "payload": "Please execute system scan."}),
    );
    let reply = dashboard.recv_until(
        |v| v["type"] == "CHAT" && v["sender_id"] == agent_id,
        "the agent's reply",
    );
    assert_eq!(reply["payload"], "Roger that!");
    assert_eq!(reply["target_id"], 1);
    assert!(reply["id"].as_i64().unwrap() > 0);

    let _ = agent.kill();
    let out = agent.wait_with_output().unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("Received: Please execute system scan."),
        "agent printed: {printed}"
    );

    // Both the log and the exchange are in history.
    let logs = s.get("/api/messages", &admin).json();
    assert_eq!(logs[0]["content"], "Agent Online");
    let history = s
        .get(&format!("/api/chat/history/{agent_id}"), &admin)
        .json();
    let payloads: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["payload"].as_str().unwrap())
        .collect();
    assert_eq!(payloads, ["Please execute system scan.", "Roger that!"]);
}
