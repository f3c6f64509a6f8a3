//! seed-demo.sh: the demo world, built once, and left alone where it conflicts.

use serde_json::{json, Value};
use std::collections::HashMap;

use crate::common::*;
use crate::{
    agents, command, free_port, history, logs, run, script, seed, stderr, stdout, url, AGENTS,
};

#[test]
fn seed_demo_builds_the_demo_world_once() {
    let s = Server::start();
    let admin = s.admin_token();

    let out = seed(&s);
    assert!(
        out.status.success(),
        "seed failed: {}{}",
        stdout(&out),
        stderr(&out)
    );

    // The four agents, each with its fixed token.
    let listed = agents(&s, &admin);
    let mut ids = HashMap::new();
    for (name, token) in AGENTS {
        let a = listed
            .iter()
            .find(|a| a["username"] == name)
            .unwrap_or_else(|| panic!("{name} not registered: {listed:?}"));
        assert_eq!(a["role"], "AGENT");
        ids.insert(name, a["id"].as_i64().unwrap());
        let r = s.post(
            "/api/users/agents/test-connection",
            &admin,
            json!({"api_token": token}),
        );
        assert_eq!(r.json()["agent_name"], name, "{token}: {}", r.body);
    }
    assert_eq!(listed.len(), 5, "Butler + 4 agents: {listed:?}");

    // Exactly 21 dashboard rows: 4 per agent, plus 2 for Observer and 1 for each other.
    let check_logs = || {
        let all = logs(&s, &admin, "");
        assert_eq!(all.len(), 21, "21 log rows: {all:#?}");
        for (name, n) in [
            ("Observer", 6),
            ("Diagnoser", 5),
            ("Guardian", 5),
            ("Storage-Custodian", 5),
        ] {
            let rows = all.iter().filter(|r| r["agent_id"] == name).count();
            assert_eq!(rows, n, "rows of {name}");
        }
        let errors: Vec<&Value> = all.iter().filter(|r| r["level"] == "ERROR").collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(all.iter().any(|r| r["level"] == "WARNING"));
    };
    check_logs();

    // Chat history with Observer, Diagnoser and Guardian (not Storage-Custodian).
    let check_chats = || {
        for name in ["Observer", "Diagnoser", "Guardian"] {
            let rows = history(&s, &admin, ids[name]);
            let texts: Vec<(i64, &str)> = rows
                .iter()
                .map(|r| {
                    (
                        r["sender_id"].as_i64().unwrap(),
                        r["payload"].as_str().unwrap(),
                    )
                })
                .collect();
            let init = format!("Initial link established with {name}.");
            assert_eq!(
                texts,
                [
                    (ids[name], init.as_str()),
                    (1, "Acknowledged. Report current status."),
                    (ids[name], "Status nominal. Task queue is clear."),
                ],
                "chat with {name}"
            );
        }
        assert!(history(&s, &admin, ids["Storage-Custodian"]).is_empty());
    };
    check_chats();

    // A second run adds nothing.
    let again = seed(&s);
    assert!(
        again.status.success(),
        "re-run failed: {}{}",
        stdout(&again),
        stderr(&again)
    );
    assert!(
        stdout(&again).contains("0 added, 21 already present"),
        "{}",
        stdout(&again)
    );
    assert_eq!(agents(&s, &admin).len(), 5);
    check_logs();
    check_chats();
}

#[test]
fn seed_demo_reports_bad_credentials_and_a_missing_server() {
    let s = Server::start();
    let mut cmd = command(script("seed-demo.sh"));
    cmd.env("ECHOCENTER_URL", url(&s))
        .env("ECHOCENTER_ADMIN_PASSWORD", "nope");
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let mut cmd = command(script("seed-demo.sh"));
    cmd.env(
        "ECHOCENTER_URL",
        format!("http://127.0.0.1:{}", free_port()),
    )
    .env("ECHOCENTER_ADMIN_PASSWORD", "admin123");
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let admin = s.admin_token();
    assert!(logs(&s, &admin, "").is_empty());
}

#[test]
fn seed_demo_leaves_conflicting_agents_alone() {
    let s = Server::start();
    let admin = s.admin_token();
    // Observer exists with another token; the Guardian token belongs to someone else.
    let (_, observer_token) = s.register_agent(&admin, "Observer");
    let r = s.post(
        "/api/users/agents",
        &admin,
        json!({"username": "Other", "api_token": "mock-guardian-token"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);

    let out = seed(&s);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("Observer: username already exists"), "{err}");
    assert!(
        err.contains("mock-guardian-token belongs to Other"),
        "{err}"
    );
    // Nothing was rotated or taken over.
    let r = s.post(
        "/api/users/agents/test-connection",
        &admin,
        json!({"api_token": observer_token}),
    );
    assert_eq!(r.json()["agent_name"], "Observer");
    let names: Vec<String> = agents(&s, &admin)
        .iter()
        .map(|a| a["username"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "Butler",
            "Observer",
            "Other",
            "Diagnoser",
            "Storage-Custodian"
        ]
    );
    // The log rows are all there; the chat history skips only the missing Guardian.
    assert_eq!(logs(&s, &admin, "").len(), 21);
    let ids: HashMap<String, i64> = agents(&s, &admin)
        .iter()
        .map(|a| {
            (
                a["username"].as_str().unwrap().to_string(),
                a["id"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(history(&s, &admin, ids["Observer"]).len(), 3);
    assert_eq!(history(&s, &admin, ids["Diagnoser"]).len(), 3);
    assert!(history(&s, &admin, ids["Other"]).is_empty());
}
