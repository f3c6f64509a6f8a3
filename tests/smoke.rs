mod common;
use common::*;
use serde_json::json;

#[test]
fn guide_flow_in_rust() {
    let s = Server::start();
    let admin = s.admin_token();
    let (agent_id, token) = s.register_agent(&admin, "bot");
    let mut human = s.ws(&admin);
    let mut agent = s.ws(&token);
    human.recv_type("PRESENCE");
    agent.send_json(
        json!({"type": "SYSTEM_LOG", "payload": {"level": "SUCCESS", "content": "Agent Online"}}),
    );
    let log = human.recv_type("SYSTEM_LOG");
    assert_eq!(log["payload"]["content"], "Agent Online");
    human.send_json(
        json!({"type": "CHAT", "target_id": agent_id, "payload": "scan", "local_id": "l1"}),
    );
    let got = agent.recv_type("CHAT");
    assert_eq!(got["sender_id"], 1);
    agent.send_json(
        json!({"type": "CHAT", "target_id": got["sender_id"], "payload": "Roger that!"}),
    );
    let echo = human.recv_until(|v| v["type"] == "CHAT" && v["local_id"] == "l1", "echo");
    assert_eq!(echo["id"], got["id"]);
    let reply = human.recv_until(
        |v| v["type"] == "CHAT" && v["sender_id"] == agent_id,
        "reply",
    );
    assert_eq!(reply["payload"], "Roger that!");
}
