//! The command line: `serve` (the default) and the shell-script subcommands of SPEC section 5,
//! plus accounts, retention and backups. Subcommands work directly on the database file,
//! with or without a running server; they refuse a database that does not exist unless told
//! to create it (`--create`), so a typo in `--db` is an error, not a fresh empty database.
//!
//! Exit status, shared with the curl twins in `scripts/` (README "Exit status"): 0 done,
//! 1 any other error, 2 usage, 3 the database (here) or the server (scripts) cannot be
//! reached, 4 login refused / not an admin (scripts only), 5 conflict (a name or token is
//! taken), 6 no such agent or user.

use std::ffi::OsString;
use std::io::Read;

use crate::auth;
use crate::config::{Config, Database, Environment, Loader};
use crate::identity::Role;
use crate::store::{HumanChange, NewMachine, Store, StoreError, UserRow};
use crate::wire::Close;

const USAGE: &str = "\
echocenter: a self-hosted hub for machine agents

usage:
  echocenter [serve] [flags]                 run the server (the default)
  echocenter agent add NAME [--description D] register an agent; prints only its token
  echocenter agent list [--json]             list agents and the Butler
  echocenter agent rotate NAME               new token for an agent or the Butler; prints it
  echocenter agent remove NAME               delete an agent (history is kept)
  echocenter user add NAME --role ADMIN|MEMBER   create a human; password read from stdin
  echocenter user list [--json]              list humans
  echocenter user passwd NAME                set a human's password (read from stdin)
  echocenter user disable NAME | enable NAME stop or allow a human's logins and sessions
  echocenter user remove NAME                delete a human (history is kept)
  echocenter prune [--json]                  apply the retention rules now
  echocenter backup FILE                     a consistent copy of the database, safe while serving
  echocenter help [COMMAND]                  this text, or one command's (also COMMAND --help)

Subcommands work on the database (--db: a file, default ./echocenter.db, or a postgres://
URL) and refuse a file that does not exist unless given --create. Exit status: 0 done, 1 error, 2 usage, 3 database
unreachable, 5 name or token taken, 6 no such agent or user.

Run `echocenter serve --help` for the server's flags and their defaults.
";

const SERVE_HELP: &str = "\
echocenter serve [flags]: run the server (each flag is also an ECHOCENTER_* variable)

  --addr HOST:PORT              listen address                      0.0.0.0:8080
  --db PATH|URL                 SQLite file or postgres:// URL      ./echocenter.db
  --env development|production  production: no dev endpoints, no raw tokens   development
  --jwt-secret S                HS256 secret, at least 32 bytes     generated, kept in the database
  --jwt-ttl D                   JWT lifetime (Go syntax: 90s, 24h)  24h
  --admin-user U                first admin's name                  admin
  --admin-password P            first admin's password              dev: admin123; prod: random, printed once
  --max-message-bytes N         largest WebSocket message           65536
  --max-connections N           connections of every kind           10000
  --max-connections-per-ip N    per client address                  256
  --trusted-proxies LIST        peers whose X-Forwarded-For counts  127.0.0.1/32,::1/128
  --max-auth-failures N         failed token auths per address/min  120
  --allowed-origins LIST        extra browser origins (CORS, WS)    same host only
  --max-frames-per-second N     per connection (burst 2x)           1000
  --metrics-token T             enables GET /metrics                unset
  --log LEVEL                   error, warn, info, debug            info
  --sync full|normal            commit durability                   full
  --ws-ping-interval D          server pings                        25s
  --ws-idle-timeout D           silence that closes a WebSocket     60s
  --retain-logs D               keep dashboard logs this long (0: for ever)      30d
  --retain-chat D               keep chat history this long (0: for ever)        365d
  --max-log-rows-per-agent N    newest log lines kept per agent (0: no limit)    100000
  --max-log-bytes-per-agent N   newest log content kept per agent (0: no limit)  67108864
  --max-log-bytes-per-second N  log content per sender (bursts of 4 s)           262144
  --approval-ttl D              a Butler request nobody answers expires after    24h
  --node-timeout D              several nodes: a silent node counts as dead after 30s
";

const AGENT_HELP: &str = "\
echocenter agent COMMAND [--db PATH] [--create] [--env E]

  agent add NAME [--description D]   register an agent; prints only its token on stdout
  agent list [--json]                agents and the Butler: id, name, role, status, token hint,
                                     last seen (the database's view of presence)
  agent rotate NAME                  a new token for an agent or the Butler (prints it); the
                                     old token's sessions close within one liveness tick
  agent remove NAME                  delete an agent; its history is kept, its name reserved

A database created here in development keeps raw token copies (for the dev endpoint); one a
production server has used never does.
";

const USER_HELP: &str = "\
echocenter user COMMAND [--db PATH] [--create] [--env E]

  user add NAME --role ADMIN|MEMBER  create a human; the password is read from stdin
  user list [--json]                 humans: id, name, role, disabled
  user passwd NAME                   set a password (stdin); every session of NAME ends
  user disable NAME                  no more logins; every session of NAME ends
  user enable NAME                   allow logins again
  user remove NAME                   delete a human (history kept, name reserved)

Passwords: at least 12 characters in production, 8 in development. The last active admin
cannot be disabled, demoted or removed.
";

const PRUNE_HELP: &str = "\
echocenter prune [--json] [--db PATH]

Applies the retention rules now (the server also does, in the background, every minute):
dashboard logs older than --retain-logs (30d) and chat older than --retain-chat (365d) are
deleted, and each agent keeps at most --max-log-rows-per-agent (100000) lines and
--max-log-bytes-per-agent (64 MiB) of log content, its oldest lines going first. Frames not
yet delivered by store and forward are kept for their 7 days whatever --retain-chat says.
Freed pages go back to the file system. Prints what was deleted.
";

const BACKUP_HELP: &str = "\
echocenter backup FILE [--db PATH]

Writes a consistent copy of the database to FILE (mode 0600) with SQLite's online backup,
safe while the server runs and writes. FILE must not exist. To restore: stop the server,
put FILE in place of the database (remove any old -wal and -shm files beside it), start it.
On PostgreSQL this refuses (exit 1): use pg_dump, e.g.
pg_dump --format=custom --file=echocenter.dump 'postgres://...' (restore with pg_restore).
";

#[derive(Debug)]
pub enum CliError {
    Usage(String),
    Help(&'static str),
    Config(crate::config::ConfigError),
    /// The database cannot be opened, or does not exist (and `--create` was not given).
    Unreachable(String),
    Conflict(String),
    NotFound(String),
    Failed(String),
}

impl CliError {
    /// The exit status (see the module comment).
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) | CliError::Help(_) => 2,
            CliError::Config(_) | CliError::Failed(_) => 1,
            CliError::Unreachable(_) => 3,
            CliError::Conflict(_) => 5,
            CliError::NotFound(_) => 6,
        }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Usage(m) => write!(f, "{m}\n\n{USAGE}"),
            CliError::Help(text) => write!(f, "{text}"),
            CliError::Config(e) => write!(f, "{e}"),
            CliError::Unreachable(m)
            | CliError::Conflict(m)
            | CliError::NotFound(m)
            | CliError::Failed(m) => write!(f, "{m}"),
        }
    }
}

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(why) => CliError::Conflict(why.to_string()),
            StoreError::NotFound => CliError::NotFound("not found".into()),
            e @ StoreError::NewerSchema(_) => CliError::Unreachable(e.to_string()),
            other => CliError::Failed(other.to_string()),
        }
    }
}

/// The options of the subcommands (the server's flags are read by `config`).
struct Options {
    description: Option<String>,
    role: Option<String>,
    json: bool,
    create: bool,
    help: bool,
}

pub fn run(args: Vec<OsString>) -> Result<(), CliError> {
    let mut args = pico_args::Arguments::from_vec(args);
    if args.contains(["-V", "--version"]) {
        println!("echocenter {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    let usage = |e: pico_args::Error| CliError::Usage(e.to_string());
    let opts = Options {
        help: args.contains(["-h", "--help"]),
        description: args.opt_value_from_str("--description").map_err(usage)?,
        role: args.opt_value_from_str("--role").map_err(usage)?,
        json: args.contains("--json"),
        create: args.contains("--create"),
    };
    // Options first (they may stand anywhere), then the words that are left:
    // `[serve]`, `agent add NAME`, `user add NAME`, ...
    let env = |k: &str| std::env::var(k).ok();
    let loaded = Loader::new(&mut args, &env).load();
    let mut words: Vec<String> = args
        .finish()
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    // Help needs no valid configuration (and a configuration error may have left its own
    // flags unread among the words).
    let plain: Vec<&str> = words
        .iter()
        .map(String::as_str)
        .filter(|w| !w.starts_with('-'))
        .collect();
    if opts.help || plain.first() == Some(&"help") {
        let topic = if plain.first() == Some(&"help") {
            plain.get(1)
        } else {
            plain.first()
        };
        print!("{}", help_for(topic.copied())?);
        return Ok(());
    }
    let config = loaded.map_err(CliError::Config)?;
    if let Some(flag) = words.iter().find(|w| w.starts_with('-')) {
        return Err(CliError::Usage(format!("unknown option: {flag}")));
    }
    let sub = (!words.is_empty()).then(|| words.remove(0));
    let sub2 = match sub.as_deref() {
        Some("agent") | Some("user") if !words.is_empty() => Some(words.remove(0)),
        _ => None,
    };
    let rest = words;
    match (sub.as_deref(), sub2.as_deref()) {
        (None, _) | (Some("serve"), _) => {
            no_extra(&rest)?;
            crate::server::serve(config).map_err(CliError::Failed)
        }
        (Some("agent"), None) => Err(CliError::Help(AGENT_HELP)),
        (Some("user"), None) => Err(CliError::Help(USER_HELP)),
        (Some("agent"), Some("add")) => agent_add(&config, &opts, one_name(&rest)?),
        (Some("agent"), Some("list")) => {
            no_extra(&rest)?;
            agent_list(&config, &opts)
        }
        (Some("agent"), Some("rotate")) => agent_rotate(&config, &opts, one_name(&rest)?),
        (Some("agent"), Some("remove")) => agent_remove(&config, &opts, one_name(&rest)?),
        (Some("user"), Some("add")) => user_add(&config, &opts, one_name(&rest)?),
        (Some("user"), Some("list")) => {
            no_extra(&rest)?;
            user_list(&config, &opts)
        }
        (Some("user"), Some("passwd")) => user_passwd(&config, &opts, one_name(&rest)?),
        (Some("user"), Some(verb @ ("disable" | "enable"))) => {
            user_disable(&config, &opts, one_name(&rest)?, verb == "disable")
        }
        (Some("user"), Some("remove")) => user_remove(&config, &opts, one_name(&rest)?),
        (Some("prune"), None) => {
            no_extra(&rest)?;
            prune(&config, &opts)
        }
        (Some("backup"), None) => backup(&config, &opts, one_name(&rest)?),
        (Some(other), sub2) => Err(CliError::Usage(format!(
            "unknown command: {other}{}",
            sub2.map(|s| format!(" {s}")).unwrap_or_default()
        ))),
    }
}

fn help_for(topic: Option<&str>) -> Result<&'static str, CliError> {
    Ok(match topic {
        None => USAGE,
        Some("serve") => SERVE_HELP,
        Some("agent") => AGENT_HELP,
        Some("user") => USER_HELP,
        Some("prune") => PRUNE_HELP,
        Some("backup") => BACKUP_HELP,
        Some(other) => return Err(CliError::Usage(format!("no help for {other:?}"))),
    })
}

fn no_extra(rest: &[String]) -> Result<(), CliError> {
    match rest.first() {
        Some(a) => Err(CliError::Usage(format!("unexpected argument: {a}"))),
        None => Ok(()),
    }
}

fn one_name(rest: &[String]) -> Result<&str, CliError> {
    match rest {
        [name] => Ok(name),
        [] => Err(CliError::Usage("missing NAME".into())),
        [_, extra, ..] => Err(CliError::Usage(format!("unexpected argument: {extra}"))),
    }
}

/// Opens the database a subcommand works on: it must exist, unless `--create`.
fn open(config: &Config, opts: &Options) -> Result<Store, CliError> {
    crate::logging::set_level(config.log);
    // A PostgreSQL database is never created here (its administrator does that): one that
    // does not exist fails to connect, which is as clear as this check.
    if let Database::Sqlite(path) = &config.db {
        if !opts.create && !path.exists() {
            return Err(CliError::Unreachable(format!(
                "no database at {}: point --db (or ECHOCENTER_DB) at the server's database, or add --create to make a new one",
                path.display()
            )));
        }
    }
    let store = crate::bootstrap::open_store(config).map_err(CliError::Unreachable)?;
    crate::bootstrap::bootstrap(&store, config).map_err(CliError::Failed)?;
    Ok(store)
}

/// Raw token copies are kept only in development, and never in a database a production
/// server has used.
fn keep_raw(config: &Config, store: &Store) -> bool {
    config.env == Environment::Development
        && store.setting("env").ok().flatten().as_deref() != Some("production")
}

/// A database created in development, or one whose server last ran in production.
fn production(config: &Config, store: &Store) -> bool {
    config.env == Environment::Production
        || store.setting("env").ok().flatten().as_deref() == Some("production")
}

fn check_username(name: &str) -> Result<(), CliError> {
    if auth::valid_username(name) {
        Ok(())
    } else {
        Err(CliError::Failed(
            "invalid username: use 1-64 characters from A-Z a-z 0-9 - _ .".into(),
        ))
    }
}

fn print_json(value: &serde_json::Value) {
    println!("{value}");
}

fn agent_add(config: &Config, opts: &Options, name: &str) -> Result<(), CliError> {
    check_username(name)?;
    let store = open(config, opts)?;
    let token = auth::generate_token();
    store.create_machine(
        &NewMachine {
            username: name,
            role: Role::Agent,
            token: &token,
            agent_kind: "generic",
            runtime_kind: "websocket",
            description: opts.description.as_deref().unwrap_or(""),
        },
        keep_raw(config, &store),
    )?;
    println!("{}", token.expose());
    Ok(())
}

fn agent_list(config: &Config, opts: &Options) -> Result<(), CliError> {
    let store = open(config, opts)?;
    let machines = store.machines()?;
    let status = |u: &UserRow| {
        if u.online_since.is_some() {
            "ONLINE"
        } else {
            "OFFLINE"
        }
    };
    if opts.json {
        let rows: Vec<serde_json::Value> = machines
            .iter()
            .map(|u| {
                serde_json::json!({
                    "id": u.id,
                    "username": u.username,
                    "role": u.role.as_str(),
                    "status": status(u),
                    "online": u.online_since.is_some(),
                    "token_hint": u.token_hint,
                    "last_seen_at": u.last_seen_at,
                    "description": u.description,
                })
            })
            .collect();
        print_json(&serde_json::Value::from(rows));
        return Ok(());
    }
    println!(
        "{:<6} {:<32} {:<7} {:<8} {:<16} LAST SEEN",
        "ID", "USERNAME", "ROLE", "STATUS", "TOKEN"
    );
    for u in &machines {
        println!(
            "{:<6} {:<32} {:<7} {:<8} {:<16} {}",
            u.id,
            u.username,
            u.role.as_str(),
            status(u),
            u.token_hint.as_deref().unwrap_or("-"),
            u.last_seen_at.as_deref().unwrap_or("never")
        );
    }
    Ok(())
}

fn machine_named(store: &Store, name: &str) -> Result<UserRow, CliError> {
    match store.user_by_name(name)? {
        Some(u) if !u.deleted && !u.role.is_human() => Ok(u),
        Some(u) if !u.deleted => Err(CliError::Failed(format!(
            "{name} is a {} user, not an agent",
            u.role.as_str()
        ))),
        _ => Err(CliError::NotFound(format!("agent not found: {name}"))),
    }
}

fn human_named(store: &Store, name: &str) -> Result<UserRow, CliError> {
    match store.user_by_name(name)? {
        Some(u) if !u.deleted && u.role.is_human() => Ok(u),
        Some(u) if !u.deleted => Err(CliError::Failed(format!(
            "{name} is a {} user, not a human (see echocenter agent)",
            u.role.as_str()
        ))),
        _ => Err(CliError::NotFound(format!("user not found: {name}"))),
    }
}

/// Ends a user's sessions on the running servers: at once on PostgreSQL nodes (they hear
/// it on the bus); a SQLite server's liveness re-check (every ping interval) finds it.
fn end_sessions(store: &Store, user: i64, close: Close) {
    let control = crate::store::ClusterControl::Close {
        user,
        reason: close.reason().to_string(),
    };
    if let Err(e) = store.announce(&control) {
        eprintln!("echocenter: the running servers will notice within a liveness tick ({e})");
    }
}

fn agent_rotate(config: &Config, opts: &Options, name: &str) -> Result<(), CliError> {
    let store = open(config, opts)?;
    let user = machine_named(&store, name)?;
    let token = auth::generate_token();
    store.rotate_token(user.id, &token, keep_raw(config, &store))?;
    end_sessions(&store, user.id, Close::TokenRevoked);
    println!("{}", token.expose());
    Ok(())
}

fn agent_remove(config: &Config, opts: &Options, name: &str) -> Result<(), CliError> {
    let store = open(config, opts)?;
    let user = machine_named(&store, name)?;
    if user.role != Role::Agent {
        return Err(CliError::Failed(
            "the Butler cannot be removed; rotate its token instead".into(),
        ));
    }
    store.delete_agent(user.id)?;
    end_sessions(&store, user.id, Close::AgentRemoved);
    eprintln!("removed agent {name} (id {}); its history is kept", user.id);
    Ok(())
}

/// A password from stdin (one line; a trailing newline is not part of it), checked against
/// the length rule of this database's mode.
fn password_from_stdin(production: bool) -> Result<String, CliError> {
    let mut password = String::new();
    std::io::stdin()
        .read_to_string(&mut password)
        .map_err(|e| CliError::Failed(format!("cannot read the password from stdin: {e}")))?;
    let password = password.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        return Err(CliError::Failed(
            "empty password: pipe it on stdin, e.g. echo 'a-long-password' | echocenter user add NAME --role MEMBER".into(),
        ));
    }
    if let Some(problem) = auth::password_problem(&password, production) {
        return Err(CliError::Failed(problem));
    }
    Ok(password)
}

fn user_add(config: &Config, opts: &Options, name: &str) -> Result<(), CliError> {
    let role = match opts.role.as_deref().map(str::to_ascii_uppercase).as_deref() {
        Some("ADMIN") => Role::Admin,
        Some("MEMBER") => Role::Member,
        _ => {
            return Err(CliError::Usage(
                "--role ADMIN or --role MEMBER is required".into(),
            ))
        }
    };
    check_username(name)?;
    let store = open(config, opts)?;
    let password = password_from_stdin(production(config, &store))?;
    let user = store.create_human(name, role, &auth::hash_password(&password))?;
    eprintln!("created {} {name} (id {})", role.as_str(), user.id);
    Ok(())
}

fn user_list(config: &Config, opts: &Options) -> Result<(), CliError> {
    let store = open(config, opts)?;
    let humans = store.humans()?;
    if opts.json {
        let rows: Vec<serde_json::Value> = humans
            .iter()
            .map(|u| {
                serde_json::json!({
                    "id": u.id,
                    "username": u.username,
                    "role": u.role.as_str(),
                    "disabled": u.disabled,
                    "created_at": u.created_at,
                })
            })
            .collect();
        print_json(&serde_json::Value::from(rows));
        return Ok(());
    }
    println!(
        "{:<6} {:<32} {:<7} {:<9} CREATED",
        "ID", "USERNAME", "ROLE", "DISABLED"
    );
    for u in &humans {
        println!(
            "{:<6} {:<32} {:<7} {:<9} {}",
            u.id,
            u.username,
            u.role.as_str(),
            if u.disabled { "yes" } else { "no" },
            u.created_at
        );
    }
    Ok(())
}

fn user_passwd(config: &Config, opts: &Options, name: &str) -> Result<(), CliError> {
    let store = open(config, opts)?;
    let user = human_named(&store, name)?;
    let password = password_from_stdin(production(config, &store))?;
    let change = HumanChange {
        password_hash: Some(auth::hash_password(&password)),
        ..HumanChange::default()
    };
    store.update_human(user.id, &change)?;
    end_sessions(&store, user.id, Close::SessionRevoked);
    eprintln!("password of {name} changed; its sessions end");
    Ok(())
}

fn user_disable(
    config: &Config,
    opts: &Options,
    name: &str,
    disabled: bool,
) -> Result<(), CliError> {
    let store = open(config, opts)?;
    let user = human_named(&store, name)?;
    let change = HumanChange {
        disabled: Some(disabled),
        ..HumanChange::default()
    };
    store.update_human(user.id, &change)?;
    if disabled {
        end_sessions(&store, user.id, Close::UserDisabled);
        eprintln!("disabled {name}; its sessions end");
    } else {
        eprintln!("enabled {name}");
    }
    Ok(())
}

fn user_remove(config: &Config, opts: &Options, name: &str) -> Result<(), CliError> {
    let store = open(config, opts)?;
    let user = human_named(&store, name)?;
    store.delete_human(user.id)?;
    end_sessions(&store, user.id, Close::UserRemoved);
    eprintln!("removed {name} (id {}); its history is kept", user.id);
    Ok(())
}

fn prune(config: &Config, opts: &Options) -> Result<(), CliError> {
    let store = open(config, opts)?;
    let pruned = store.prune_now(&crate::bootstrap::retention(config))?;
    if opts.json {
        print_json(&serde_json::json!({
            "logs_by_age": pruned.logs_by_age,
            "logs_by_budget": pruned.logs_by_budget,
            "chat_by_age": pruned.chat_by_age,
        }));
    } else {
        println!(
            "deleted {} log lines past --retain-logs, {} over an agent's budget, {} chat rows past --retain-chat",
            pruned.logs_by_age, pruned.logs_by_budget, pruned.chat_by_age
        );
    }
    Ok(())
}

fn backup(config: &Config, opts: &Options, file: &str) -> Result<(), CliError> {
    let target = std::path::Path::new(file);
    if target.exists() {
        return Err(CliError::Conflict(format!(
            "{file} exists: the backup does not overwrite files"
        )));
    }
    let store = open(config, opts)?;
    store
        .backup_to(target)
        .map_err(|e| CliError::Failed(format!("backup failed: {e}")))?;
    eprintln!("backed up {} to {file}", store.describe());
    Ok(())
}
