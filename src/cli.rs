//! The command line: `serve` (the default) and the shell-script subcommands of SPEC section 5.
//! Subcommands work directly on the database file, with or without a running server.

use std::ffi::OsString;
use std::io::Read;

use crate::auth;
use crate::config::{Config, Environment, Loader};
use crate::identity::Role;
use crate::store::{NewMachine, Store, StoreError};

const USAGE: &str = "\
echocenter: a self-hosted hub for machine agents

usage:
  echocenter [serve] [flags]                 run the server (the default)
  echocenter agent add NAME [--description D] register an agent; prints only its token
  echocenter agent list                      list agents and the Butler
  echocenter agent rotate NAME               new token for an agent or the Butler; prints it
  echocenter agent remove NAME               delete an agent (history is kept)
  echocenter user add NAME --role ADMIN|MEMBER   create a human; password read from stdin

flags (each also an ECHOCENTER_* variable, see README):
  --addr HOST:PORT  --db PATH  --env development|production  --jwt-secret S  --jwt-ttl 24h
  --admin-user U  --admin-password P  --max-message-bytes N  --max-connections N
  --max-connections-per-ip N  --allowed-origins LIST  --max-frames-per-second N
  --metrics-token T  --log error|warn|info|debug  --sync full|normal
  --ws-ping-interval 25s  --ws-idle-timeout 60s
";

#[derive(Debug)]
pub enum CliError {
    Usage(String),
    Config(crate::config::ConfigError),
    Failed(String),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Usage(m) => write!(f, "{m}\n\n{USAGE}"),
            CliError::Config(e) => write!(f, "{e}"),
            CliError::Failed(m) => write!(f, "{m}"),
        }
    }
}

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(why) => CliError::Failed(why.to_string()),
            other => CliError::Failed(other.to_string()),
        }
    }
}

pub fn run(args: Vec<OsString>) -> Result<(), CliError> {
    let mut args = pico_args::Arguments::from_vec(args);
    if args.contains(["-h", "--help"]) {
        print!("{USAGE}");
        return Ok(());
    }
    if args.contains(["-V", "--version"]) {
        println!("echocenter {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    // Options first (they may stand anywhere), then the words that are left:
    // `[serve]`, `agent add NAME`, `user add NAME`, ...
    let env = |k: &str| std::env::var(k).ok();
    let description: Option<String> = args
        .opt_value_from_str("--description")
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let role: Option<String> = args
        .opt_value_from_str("--role")
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let config = Loader::new(&mut args, &env)
        .load()
        .map_err(CliError::Config)?;
    let mut words: Vec<String> = args
        .finish()
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
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
        (Some("agent"), Some("add")) => {
            agent_add(&config, one_name(&rest)?, description.as_deref())
        }
        (Some("agent"), Some("list")) => {
            no_extra(&rest)?;
            agent_list(&config)
        }
        (Some("agent"), Some("rotate")) => agent_rotate(&config, one_name(&rest)?),
        (Some("agent"), Some("remove")) => agent_remove(&config, one_name(&rest)?),
        (Some("user"), Some("add")) => user_add(&config, one_name(&rest)?, role.as_deref()),
        (Some(other), sub2) => Err(CliError::Usage(format!(
            "unknown command: {other}{}",
            sub2.map(|s| format!(" {s}")).unwrap_or_default()
        ))),
    }
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

fn open(config: &Config) -> Result<Store, CliError> {
    crate::logging::set_level(config.log);
    crate::bootstrap::open_store(config).map_err(CliError::Failed)
}

/// Raw token copies are kept only in development, and never in a database a production
/// server has used.
fn keep_raw(config: &Config, store: &Store) -> bool {
    config.env == Environment::Development
        && store.setting("env").ok().flatten().as_deref() != Some("production")
}

fn agent_add(config: &Config, name: &str, description: Option<&str>) -> Result<(), CliError> {
    if !auth::valid_username(name) {
        return Err(CliError::Failed(
            "invalid username: use 1-64 characters from A-Z a-z 0-9 - _ .".into(),
        ));
    }
    let store = open(config)?;
    let token = auth::generate_token();
    store.create_machine(
        &NewMachine {
            username: name,
            role: Role::Agent,
            token: &token,
            agent_kind: "generic",
            runtime_kind: "websocket",
            description: description.unwrap_or(""),
        },
        keep_raw(config, &store),
    )?;
    println!("{}", token.expose());
    Ok(())
}

fn agent_list(config: &Config) -> Result<(), CliError> {
    let store = open(config)?;
    println!(
        "{:<6} {:<32} {:<7} {:<16} LAST SEEN",
        "ID", "USERNAME", "ROLE", "TOKEN"
    );
    for u in store.machines()? {
        println!(
            "{:<6} {:<32} {:<7} {:<16} {}",
            u.id,
            u.username,
            u.role.as_str(),
            u.token_hint.as_deref().unwrap_or("-"),
            u.last_seen_at.as_deref().unwrap_or("never")
        );
    }
    Ok(())
}

fn machine_named(store: &Store, name: &str) -> Result<crate::store::UserRow, CliError> {
    match store.user_by_name(name)? {
        Some(u) if !u.deleted && !u.role.is_human() => Ok(u),
        Some(u) if !u.deleted => Err(CliError::Failed(format!(
            "{name} is a {} user, not an agent",
            u.role.as_str()
        ))),
        _ => Err(CliError::Failed(format!("agent not found: {name}"))),
    }
}

fn agent_rotate(config: &Config, name: &str) -> Result<(), CliError> {
    let store = open(config)?;
    let user = machine_named(&store, name)?;
    let token = auth::generate_token();
    store.rotate_token(user.id, &token, keep_raw(config, &store))?;
    println!("{}", token.expose());
    Ok(())
}

fn agent_remove(config: &Config, name: &str) -> Result<(), CliError> {
    let store = open(config)?;
    let user = machine_named(&store, name)?;
    if user.role != Role::Agent {
        return Err(CliError::Failed(
            "the Butler cannot be removed; rotate its token instead".into(),
        ));
    }
    store.delete_agent(user.id)?;
    eprintln!("removed agent {name} (id {}); its history is kept", user.id);
    Ok(())
}

fn user_add(config: &Config, name: &str, role: Option<&str>) -> Result<(), CliError> {
    let role = match role.map(str::to_ascii_uppercase).as_deref() {
        Some("ADMIN") => Role::Admin,
        Some("MEMBER") => Role::Member,
        _ => {
            return Err(CliError::Usage(
                "--role ADMIN or --role MEMBER is required".into(),
            ))
        }
    };
    if !auth::valid_username(name) {
        return Err(CliError::Failed(
            "invalid username: use 1-64 characters from A-Z a-z 0-9 - _ .".into(),
        ));
    }
    let mut password = String::new();
    std::io::stdin()
        .read_to_string(&mut password)
        .map_err(|e| CliError::Failed(format!("cannot read the password from stdin: {e}")))?;
    let password = password.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(CliError::Failed("empty password: pipe it on stdin, e.g. echo 'secret' | echocenter user add NAME --role MEMBER".into()));
    }
    let store = open(config)?;
    let user = store.create_human(name, role, &auth::hash_password(password))?;
    eprintln!("created {} {name} (id {})", role.as_str(), user.id);
    Ok(())
}
