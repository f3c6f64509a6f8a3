//! A database from before threads (sql/005): its chat rows are filed into threads when the
//! server upgrades it, so the thread-only dashboard shows them.
mod common;
use common::*;

use serde_json::{json, Value};

fn payloads(rows: &Value) -> Vec<String> {
    rows.as_array()
        .unwrap_or_else(|| panic!("not a list: {rows}"))
        .iter()
        .map(|r| r["payload"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn chat_rows_that_name_no_thread_of_their_pair_are_filed_into_its_default_thread_on_upgrade() {
    if skip_on_postgres("an upgrade of SQLite databases made before threads (PostgreSQL databases were never without them)") {
        return;
    }
    let s = Server::start();
    let admin = s.admin_token();
    let (bot_id, _) = s.register_agent(&admin, "bot");
    let seed = |from: &str, to: &str, content: &str| {
        let r = s.post(
            "/api/dev/mock/chat",
            &admin,
            json!({"sender_username": from, "receiver_username": to, "content": content}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    };
    seed("admin", "bot", "one");
    seed("bot", "admin", "two");
    seed("admin", "Butler", "three");
    let t = s.post(
        "/api/chat/threads",
        &admin,
        json!({"peer_id": bot_id, "channel_kind": "agent_direct", "title": "kept"}),
    );
    let kept = t.json()["id"].as_i64().unwrap();
    let mut human = s.ws(&admin);
    human.send_json(
        json!({"type": "CHAT", "target_id": bot_id, "payload": "in a thread",
                           "conversation_id": kept, "local_id": "k1"}),
    );
    human.recv_until(|v| v["local_id"] == "k1", "the echo");
    human.close();

    // Make it look like a database of before threads: no default threads, a row with no
    // conversation_id, one with a number of the client's own.
    let (dir, db) = s.stop_keeping_data();
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(
            "UPDATE chat_messages SET conversation_id = NULL WHERE content = '\"one\"';
             UPDATE chat_messages SET conversation_id = 777 WHERE content = '\"two\"';
             DELETE FROM conversation_threads WHERE is_default = 1;
             DELETE FROM migrations WHERE name = '005_file_unthreaded_chat';",
        )
        .unwrap();
    }
    let s = Server::start_on(dir, db, &[], &[]);
    let admin = s.admin_token();

    let threads = s
        .get(&format!("/api/chat/threads?peer_id={bot_id}"), &admin)
        .json();
    let list = threads.as_array().unwrap();
    assert_eq!(list.len(), 2, "{threads}");
    let default = list
        .iter()
        .find(|t| t["is_default"] == true)
        .expect("a default thread");
    let rows = s
        .get(
            &format!("/api/chat/threads/{}/messages", default["id"]),
            &admin,
        )
        .json();
    assert_eq!(payloads(&rows), ["one", "two"]);
    assert_eq!(
        default["last_message_at"], rows[1]["timestamp"],
        "{default}"
    );
    assert_eq!(default["channel_kind"], "agent_direct");
    // A row already in a thread of its pair stays there.
    let rows = s
        .get(&format!("/api/chat/threads/{kept}/messages"), &admin)
        .json();
    assert_eq!(payloads(&rows), ["in a thread"]);

    let butler = s.get("/api/chat/threads?peer_id=2", &admin).json();
    assert_eq!(butler.as_array().unwrap().len(), 1, "{butler}");
    assert_eq!(butler[0]["channel_kind"], "butler_direct");
    let rows = s
        .get(
            &format!("/api/chat/threads/{}/messages", butler[0]["id"]),
            &admin,
        )
        .json();
    assert_eq!(payloads(&rows), ["three"]);

    // New frames find the default thread the upgrade made.
    let mut human = s.ws(&admin);
    human.send_json(
        json!({"type": "CHAT", "target_id": bot_id, "payload": "after", "local_id": "a1"}),
    );
    let echo = human.recv_until(|v| v["local_id"] == "a1", "the echo");
    assert_eq!(echo["conversation_id"], default["id"]);
}
