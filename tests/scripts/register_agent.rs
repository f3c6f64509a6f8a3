//! register-agent.sh: prints only the token, and its exit codes tell failures apart.

use serde_json::{json, Value};

use crate::common::*;
use crate::{agents, command, free_port, register, run, script, stderr, stdout, url};

#[test]
fn register_agent_prints_only_a_working_token() {
    let s = Server::start();
    let admin = s.admin_token();

    let out = register(&url(&s), Some("admin123"), &["shell-bot"]);
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        stderr(&out)
    );
    let printed = stdout(&out);
    assert!(printed.ends_with('\n'), "one line: {printed:?}");
    let token = printed.trim_end_matches('\n');
    assert!(
        !token.contains('\n'),
        "only the token on stdout: {printed:?}"
    );
    assert!(
        token.starts_with("ec_") && token.len() == 67,
        "a generated token: {token:?}"
    );

    // The token authenticates as the new agent, over REST and over the WebSocket.
    let r = s.post(
        "/api/users/agents/test-connection",
        &admin,
        json!({"api_token": token}),
    );
    assert_eq!(r.json()["agent_name"], "shell-bot", "{}", r.body);
    let r = s.post(
        "/api/messages",
        token,
        json!({"level": "INFO", "content": "hello from cron"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["agent_id"], "shell-bot");
    let mut ws = s.ws(token);
    ws.send_json(json!({"type": "CHAT", "target_id": 1, "payload": "hi", "local_id": "a"}));
    assert_eq!(ws.recv_type("ACK")["local_id"], "a");

    // Without ECHOCENTER_ADMIN_PASSWORD the development default is used, with a note;
    // --description and --token are passed through.
    let out = register(
        &format!("{}/", url(&s)),
        None,
        &[
            "--description",
            "nightly jobs",
            "--token",
            "cron-bot-token-0123456789",
            "cron-bot",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "cron-bot-token-0123456789\n");
    assert!(
        stderr(&out).contains("ECHOCENTER_ADMIN_PASSWORD"),
        "a note about the default password: {}",
        stderr(&out)
    );
    let cron = agents(&s, &admin)
        .into_iter()
        .find(|a| a["username"] == "cron-bot")
        .expect("cron-bot listed");
    assert_eq!(cron["description"], "nightly jobs");
}

#[test]
fn register_agent_exit_codes_tell_failures_apart() {
    let s = Server::start();
    let u = url(&s);

    let bad = register(&u, Some("wrong-password"), &["bot-a"]);
    assert_eq!(
        bad.status.code(),
        Some(4),
        "bad credentials: {}",
        stderr(&bad)
    );
    assert_eq!(stdout(&bad), "");
    assert!(
        stderr(&bad).contains("invalid credentials"),
        "{}",
        stderr(&bad)
    );

    let first = register(&u, Some("admin123"), &["bot-a"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let taken = register(&u, Some("admin123"), &["bot-a"]);
    assert_eq!(
        taken.status.code(),
        Some(5),
        "name taken: {}",
        stderr(&taken)
    );
    assert_eq!(stdout(&taken), "");
    assert!(
        stderr(&taken).contains("already exists"),
        "{}",
        stderr(&taken)
    );

    let down = register(
        &format!("http://127.0.0.1:{}", free_port()),
        Some("admin123"),
        &["bot-b"],
    );
    assert_eq!(
        down.status.code(),
        Some(3),
        "server down: {}",
        stderr(&down)
    );
    assert_eq!(stdout(&down), "");
    assert!(
        stderr(&down).contains("cannot connect"),
        "{}",
        stderr(&down)
    );

    let invalid = register(&u, Some("admin123"), &["bad name!"]);
    assert_eq!(invalid.status.code(), Some(1), "{}", stderr(&invalid));
    assert!(
        stderr(&invalid).contains("invalid username"),
        "{}",
        stderr(&invalid)
    );

    let usage = register(&u, Some("admin123"), &[]);
    assert_eq!(usage.status.code(), Some(2), "{}", stderr(&usage));
    assert!(stderr(&usage).contains("usage"), "{}", stderr(&usage));

    // A member may log in but not register agents.
    let admin = s.admin_token();
    s.create_human(&admin, "mia", "MEMBER");
    let mut cmd = command(script("register-agent.sh"));
    cmd.arg("bot-c")
        .env("ECHOCENTER_URL", &u)
        .env("ECHOCENTER_ADMIN_USER", "mia")
        .env("ECHOCENTER_ADMIN_PASSWORD", "pw-123456-long");
    let member = run(cmd);
    assert_eq!(member.status.code(), Some(4), "{}", stderr(&member));

    // Nothing above registered bot-b or bot-c.
    let names: Vec<Value> = agents(&s, &admin)
        .iter()
        .map(|a| a["username"].clone())
        .collect();
    assert_eq!(names, [json!("Butler"), json!("bot-a")]);
}
