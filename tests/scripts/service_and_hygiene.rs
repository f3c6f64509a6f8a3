//! The systemd unit, the API script (echocenter-api.sh) and the hygiene every script keeps
//! (strict mode, executable, parses, shellcheck-clean).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::common::*;
use crate::{command, python, run, script, stderr, stdout, url};

/// Parses a systemd unit: `[Section]` headers and `Key=Value` lines; comments (#, ;) and
/// blank lines skipped. Returns section → list of (key, value), in order.
fn parse_unit(text: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut sections: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(
            !line.ends_with('\\'),
            "line {}: no continuation lines expected",
            n + 1
        );
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            assert!(
                sections.iter().all(|(s, _)| s != name),
                "line {}: section [{name}] repeated",
                n + 1
            );
            sections.push((name.to_string(), Vec::new()));
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: not key=value: {raw:?}", n + 1));
        let key = key.trim();
        assert!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric()),
            "line {}: bad key {key:?}",
            n + 1
        );
        let section = sections
            .last_mut()
            .unwrap_or_else(|| panic!("line {}: setting before any [section]", n + 1));
        section.1.push((key.to_string(), value.trim().to_string()));
    }
    sections
}

/// The README's quick start begins with a bare `cargo run --release`: with two binaries
/// (echoload) Cargo refuses it ("could not determine which binary to run", exit 101) unless
/// the package names its default. Run as written, without `--release` (the same choice of
/// binary, and the build the tests already made), asking only for the version.
#[test]
fn the_readmes_first_command_runs_the_server() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let first = readme
        .split("```sh\n")
        .nth(1)
        .and_then(|block| block.lines().next())
        .expect("a first sh block in README.md");
    let words: Vec<&str> = first
        .split('#')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(words, ["cargo", "run", "--release"], "{first}");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = run({
        let mut c = command(cargo);
        c.args(["run", "--quiet", "--", "--version"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        c
    });
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("echocenter "), "{}", stdout(&out));
}

#[test]
fn systemd_unit_parses_and_carries_the_production_settings() {
    let path = script("echocenter.service");
    let text = std::fs::read_to_string(&path).unwrap();
    let sections = parse_unit(&text);
    let names: Vec<&str> = sections.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["Unit", "Service", "Install"]);
    let service = &sections[1].1;
    let all = |key: &str| -> Vec<&str> {
        service
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let one = |key: &str| -> &str {
        let v = all(key);
        assert_eq!(v.len(), 1, "{key} set once in [Service]: {v:?}");
        v[0]
    };
    let exec = one("ExecStart");
    assert!(exec.starts_with('/'), "absolute ExecStart: {exec}");
    assert!(
        exec.contains("--db /var/lib/echocenter/echocenter.db"),
        "{exec}"
    );
    assert!(all("Environment").contains(&"ECHOCENTER_ENV=production"));
    assert_eq!(one("StateDirectory"), "echocenter");
    assert!(
        one("User") == "echocenter" || all("DynamicUser") == ["yes"],
        "runs as its own user"
    );
    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(one(k), v, "{k}");
    }
    let families: Vec<&str> = one("RestrictAddressFamilies").split_whitespace().collect();
    for f in ["AF_INET", "AF_INET6", "AF_UNIX"] {
        assert!(families.contains(&f), "{f} allowed: {families:?}");
    }
    let nofile: u64 = one("LimitNOFILE").parse().unwrap();
    assert!(nofile >= 20_000, "LimitNOFILE {nofile}");
    let tasks = one("TasksMax");
    assert!(
        tasks == "infinity" || tasks.parse::<u64>().unwrap() >= 20_000,
        "two threads per WebSocket need a high TasksMax: {tasks}"
    );
    assert_eq!(
        sections[2].1,
        [("WantedBy".into(), "multi-user.target".into())]
    );

    // systemd's own checker, where installed, on a copy whose ExecStart exists here.
    let verifier = Command::new("systemd-analyze").arg("--version").output();
    if verifier.map(|o| o.status.success()).unwrap_or(false) {
        let tmp = TempDir::new();
        let unit = tmp.path().join("echocenter.service");
        let bin = exec.split_whitespace().next().unwrap();
        std::fs::write(&unit, text.replace(bin, BIN)).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .unwrap();
        let err = stderr(&out);
        let about_unit: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("echocenter.service"))
            .collect();
        assert!(
            out.status.success() && about_unit.is_empty(),
            "systemd-analyze verify: {err}"
        );
    } else {
        eprintln!("systemd-analyze not installed: checked the unit's syntax only");
    }
}

fn api(s: &Server, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = command(script("echocenter-api.sh"));
    cmd.args(args)
        .env("ECHOCENTER_URL", url(s))
        .env("ECHOCENTER_ADMIN_PASSWORD", "admin123");
    match stdin {
        None => run(cmd),
        Some(input) => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = cmd.spawn().unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
            child.wait_with_output().unwrap()
        }
    }
}

#[test]
fn the_api_script_mirrors_the_command_line_against_a_live_server() {
    let s = Server::start();
    let added = api(
        &s,
        &["agent", "add", "remote-bot", "--description", "over curl"],
        None,
    );
    assert!(added.status.success(), "{}", stderr(&added));
    let token = stdout(&added).trim().to_string();
    assert!(token.starts_with("ec_"), "{token}");
    assert_eq!(s.get("/api/users/me", &token).status, 200);

    let listed = api(&s, &["agent", "list"], None);
    assert!(listed.status.success(), "{}", stderr(&listed));
    let table = stdout(&listed);
    assert!(
        table
            .lines()
            .any(|l| l.contains("remote-bot") && l.contains("AGENT")),
        "{table}"
    );
    assert!(!table.contains(&token), "the list must not show raw tokens");

    let rotated = api(&s, &["agent", "rotate", "remote-bot"], None);
    assert!(rotated.status.success(), "{}", stderr(&rotated));
    let fresh = stdout(&rotated).trim().to_string();
    assert!(fresh.starts_with("ec_") && fresh != token);
    assert_eq!(s.get("/api/users/me", &token).status, 401);
    assert_eq!(s.get("/api/users/me", &fresh).status, 200);

    let removed = api(&s, &["agent", "remove", "remote-bot"], None);
    assert!(removed.status.success(), "{}", stderr(&removed));
    assert_eq!(s.get("/api/users/me", &fresh).status, 401);
    assert_eq!(
        api(&s, &["agent", "remove", "remote-bot"], None)
            .status
            .code(),
        Some(6)
    );
    assert_eq!(
        api(&s, &["agent", "rotate", "nobody"], None).status.code(),
        Some(6)
    );

    let user = api(
        &s,
        &["user", "add", "carol", "--role", "MEMBER"],
        Some("carol-pass-1\n"),
    );
    assert!(user.status.success(), "{}", stderr(&user));
    assert_eq!(s.login("carol", "carol-pass-1").status, 200);
    let again = api(
        &s,
        &["user", "add", "carol", "--role", "MEMBER"],
        Some("carol-pass-2\n"),
    );
    assert_eq!(again.status.code(), Some(5));
    assert_eq!(
        api(&s, &["user", "add", "dave"], Some("x\n")).status.code(),
        Some(2)
    );
    assert_eq!(api(&s, &["agent"], None).status.code(), Some(2));
}

#[test]
fn scripts_are_strict_and_parse() {
    for name in [
        "register-agent.sh",
        "seed-demo.sh",
        "demo.sh",
        "echocenter-api.sh",
        "lib/api.sh",
    ] {
        let path = script(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let out = Command::new("bash").arg("-n").arg(&path).output().unwrap();
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        if !name.starts_with("lib/") {
            assert!(text.starts_with("#!/usr/bin/env bash\n"), "{name}: shebang");
            assert!(
                text.contains("\nset -euo pipefail\n"),
                "{name}: strict mode"
            );
            assert!(is_executable(&path), "{name} is not executable");
        }
        match Command::new("shellcheck").arg("-x").arg(&path).output() {
            Ok(out) => assert!(out.status.success(), "shellcheck {name}:\n{}", stdout(&out)),
            Err(_) => eprintln!("shellcheck not installed: skipped for {name}"),
        }
    }
    let agent = script("mock-agent.py");
    assert!(is_executable(&agent));
    // Compiles without writing __pycache__ next to the script.
    let out = Command::new(python())
        .args([
            "-c",
            "import sys; compile(open(sys.argv[1]).read(), sys.argv[1], 'exec')",
        ])
        .arg(&agent)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o111 == 0o111
}
