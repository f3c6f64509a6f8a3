//! Configuration: command-line flags, then `ECHOCENTER_*` variables, then the upstream names.
//!
//! Only the value that wins is parsed, and a bad one is an error naming its source: an
//! operator who typed `ECHOCENTER_JWT_TTL=1d` learns it at start-up, not from a silent default.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

mod database;
#[cfg(test)]
pub use database::parse_dsn;
pub use database::{Database, PostgresDsn};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Environment {
    Development,
    Production,
}

/// How hard SQLite syncs a commit. `Full` survives power loss; `Normal` (WAL) survives a
/// process crash (`kill -9`) but may lose the last commits on power loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sync {
    Full,
    Normal,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub addr: String,
    pub db: Database,
    pub env: Environment,
    pub jwt_secret: Option<Vec<u8>>,
    pub jwt_ttl: Duration,
    pub admin_user: Option<String>,
    pub admin_password: Option<String>,
    pub max_message_bytes: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Peers whose `X-Forwarded-For` names the real client (a local reverse proxy). Their
    /// own connections are not counted against the per-address cap; the client they name is.
    pub trusted_proxies: Vec<Cidr>,
    /// Failed token authentications (REST bearer and `/api/ws`) per client address per
    /// minute before that address gets 429 for the rest of the minute.
    pub max_auth_failures: usize,
    pub allowed_origins: Vec<String>,
    pub max_frames_per_second: u32,
    pub metrics_token: Option<String>,
    pub log: crate::logging::Level,
    pub sync: Sync,
    /// How often the server pings each WebSocket (SPEC: 25 s).
    pub ws_ping_interval: Duration,
    /// Silence after which a WebSocket is closed (SPEC: 60 s).
    pub ws_idle_timeout: Duration,
    /// Test only: serve an unauthenticated echo WebSocket at `/api/ws-echo` so a protocol
    /// conformance suite (Autobahn cases) can exercise our WebSocket stack.
    pub conformance_echo: bool,
    /// Test only: `POST /api/test/panic` makes the HTTP worker that handles it panic, so a
    /// test can show that REST survives its workers dying.
    pub fault_injection: bool,
    /// Bytes of log content one sender may store per second (SYSTEM_LOG and POST
    /// /api/messages together; bursts of 4 seconds' worth).
    pub max_log_bytes_per_second: usize,
    /// Butler approvals still PENDING this long become EXPIRED.
    pub approval_ttl: Duration,
    /// Several nodes on one PostgreSQL: a node silent this long is taken for dead (its
    /// connections stop counting; its users go offline).
    pub node_timeout: Duration,
    /// How long dashboard logs and chat history are kept (None: for ever).
    pub retain_logs: Option<Duration>,
    pub retain_chat: Option<Duration>,
    /// The newest log lines, and bytes of log content, kept per agent (None: no limit).
    pub max_log_rows_per_agent: Option<u64>,
    pub max_log_bytes_per_agent: Option<u64>,
}

/// An address block such as `127.0.0.1/32` or `fd00::/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: std::net::IpAddr = addr.trim().parse().ok()?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Cidr { net, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        // A v4 client seen through a v6 socket (`::ffff:a.b.c.d`) is the v4 address.
        match (self.net, ip.to_canonical()) {
            (std::net::IpAddr::V4(net), std::net::IpAddr::V4(ip)) => {
                prefix_match(&net.octets(), &ip.octets(), self.prefix)
            }
            (std::net::IpAddr::V6(net), std::net::IpAddr::V6(ip)) => {
                prefix_match(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

fn prefix_match(net: &[u8], ip: &[u8], prefix: u8) -> bool {
    let full = (prefix / 8) as usize;
    let rest = prefix % 8;
    if net[..full] != ip[..full] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        net[full] & mask == ip[full] & mask
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// The default `--trusted-proxies`: this machine itself (a reverse proxy on loopback).
pub const DEFAULT_TRUSTED_PROXIES: &str = "127.0.0.1/32,::1/128";

/// Most connections one client address may hold unless `--max-connections-per-ip` says
/// otherwise (never more than `--max-connections`).
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 256;

#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The flag or variable that held the bad value, e.g. `--jwt-ttl` or `ECHOCENTER_JWT_TTL`.
    pub source: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.source, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Where a raw value came from; kept so errors can name it.
struct Raw {
    source: String,
    value: String,
}

/// Reads flags from `args` (consuming them) and variables through `env`.
pub struct Loader<'a> {
    args: &'a mut pico_args::Arguments,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> Loader<'a> {
    pub fn new(
        args: &'a mut pico_args::Arguments,
        env: &'a dyn Fn(&str) -> Option<String>,
    ) -> Self {
        Loader { args, env }
    }

    /// The winning raw value for one setting: flag, then each variable name in order.
    fn pick(&mut self, flag: &'static str, vars: &[&str]) -> Result<Option<Raw>, ConfigError> {
        let from_flag: Option<String> =
            self.args
                .opt_value_from_str(flag)
                .map_err(|e| ConfigError {
                    source: flag.to_string(),
                    message: e.to_string(),
                })?;
        if let Some(value) = from_flag {
            return Ok(Some(Raw {
                source: flag.to_string(),
                value,
            }));
        }
        for var in vars {
            // Upstream semantics: an empty variable counts as unset.
            if let Some(value) = (self.env)(var).filter(|v| !v.is_empty()) {
                return Ok(Some(Raw {
                    source: (*var).to_string(),
                    value,
                }));
            }
        }
        Ok(None)
    }

    pub fn load(mut self) -> Result<Config, ConfigError> {
        let addr = match self.pick("--addr", &["ECHOCENTER_ADDR"])? {
            Some(raw) => validate_addr(raw)?,
            None => self.upstream_addr()?,
        };
        let db = self.database()?;
        let env = match self.pick("--env", &["ECHOCENTER_ENV"])? {
            Some(raw) => parse_env_strict(&raw)?,
            None => match (self.env)("APP_ENV") {
                // Upstream: anything but production/prod means development.
                Some(v) if is_production(&v) => Environment::Production,
                _ => Environment::Development,
            },
        };
        let jwt_secret =
            match self.pick("--jwt-secret", &["ECHOCENTER_JWT_SECRET", "JWT_SECRET"])? {
                Some(raw) if raw.value.len() < 32 => {
                    return Err(ConfigError {
                        source: raw.source,
                        message: format!("must be at least 32 bytes, got {}", raw.value.len()),
                    })
                }
                Some(raw) => Some(raw.value.into_bytes()),
                None => None,
            };
        let jwt_ttl =
            match self.pick("--jwt-ttl", &["ECHOCENTER_JWT_TTL", "JWT_TOKEN_EXPIRATION"])? {
                Some(raw) => match parse_duration(&raw.value) {
                    Some(d) if d >= Duration::from_secs(1) => d,
                    _ => {
                        return Err(bad(
                            raw,
                            "expected a duration of at least 1s such as 90s, 24h or 1h30m",
                        ))
                    }
                },
                None => Duration::from_secs(24 * 3600),
            };
        let admin_user = match self.pick(
            "--admin-user",
            &["ECHOCENTER_ADMIN_USER", "INITIAL_ADMIN_USER"],
        )? {
            Some(raw) if !crate::auth::valid_username(&raw.value) => {
                return Err(bad(raw, "1-64 characters from A-Z a-z 0-9 - _ ."))
            }
            other => other.map(|r| r.value),
        };
        let admin_password = self
            .pick(
                "--admin-password",
                &["ECHOCENTER_ADMIN_PASSWORD", "INITIAL_ADMIN_PASS"],
            )?
            .map(|r| r.value);
        let max_message_bytes = self.number(
            "--max-message-bytes",
            "ECHOCENTER_MAX_MESSAGE_BYTES",
            65_536,
            128,
            // Below the 4 MiB per-connection queue cap, so one frame can always be queued.
            1 << 20,
        )?;
        let max_connections = self.number(
            "--max-connections",
            "ECHOCENTER_MAX_CONNECTIONS",
            10_000,
            1,
            1_000_000,
        )?;
        let max_connections_per_ip = self.number(
            "--max-connections-per-ip",
            "ECHOCENTER_MAX_CONNECTIONS_PER_IP",
            DEFAULT_MAX_CONNECTIONS_PER_IP.min(max_connections),
            1,
            1_000_000,
        )?;
        let trusted_proxies =
            match self.pick("--trusted-proxies", &["ECHOCENTER_TRUSTED_PROXIES"])? {
                Some(raw) => parse_cidrs(&raw)?,
                None => parse_cidrs(&Raw {
                    source: "--trusted-proxies".into(),
                    value: DEFAULT_TRUSTED_PROXIES.into(),
                })?,
            };
        let max_auth_failures = self.number(
            "--max-auth-failures",
            "ECHOCENTER_MAX_AUTH_FAILURES",
            120,
            1,
            1_000_000,
        )?;
        let allowed_origins = self
            .pick("--allowed-origins", &["ECHOCENTER_ALLOWED_ORIGINS"])?
            .map(|r| parse_origins(&r))
            .transpose()?
            .unwrap_or_default();
        let max_frames_per_second = self.number(
            "--max-frames-per-second",
            "ECHOCENTER_MAX_FRAMES_PER_SECOND",
            1000,
            1,
            1_000_000,
        )? as u32;
        let metrics_token = self
            .pick("--metrics-token", &["ECHOCENTER_METRICS_TOKEN"])?
            .map(|r| r.value);
        let log = match self.pick("--log", &["ECHOCENTER_LOG"])? {
            Some(raw) => crate::logging::Level::parse(&raw.value)
                .ok_or_else(|| bad(raw, "expected error, warn, info or debug"))?,
            None => crate::logging::Level::Info,
        };
        let sync = match self.pick("--sync", &["ECHOCENTER_SYNC"])? {
            Some(raw) => match raw.value.to_ascii_lowercase().as_str() {
                "full" => Sync::Full,
                "normal" => Sync::Normal,
                _ => return Err(bad(raw, "expected full or normal")),
            },
            None => Sync::Full,
        };
        let ws_ping_interval = self.duration(
            "--ws-ping-interval",
            "ECHOCENTER_WS_PING_INTERVAL",
            Duration::from_secs(25),
        )?;
        let ws_idle_timeout = self.duration(
            "--ws-idle-timeout",
            "ECHOCENTER_WS_IDLE_TIMEOUT",
            Duration::from_secs(60),
        )?;
        if ws_ping_interval >= ws_idle_timeout {
            return Err(ConfigError {
                source: "--ws-ping-interval".into(),
                message: format!(
                    "must be shorter than --ws-idle-timeout ({ws_idle_timeout:?}), or quiet but healthy clients are closed"
                ),
            });
        }
        let max_log_bytes_per_second = self.number(
            "--max-log-bytes-per-second",
            "ECHOCENTER_MAX_LOG_BYTES_PER_SECOND",
            256 * 1024,
            1024,
            1 << 30,
        )?;
        let approval_ttl = self.duration(
            "--approval-ttl",
            "ECHOCENTER_APPROVAL_TTL",
            Duration::from_secs(24 * 3600),
        )?;
        let node_timeout = self.duration(
            "--node-timeout",
            "ECHOCENTER_NODE_TIMEOUT",
            Duration::from_secs(30),
        )?;
        if node_timeout < Duration::from_secs(1) {
            return Err(ConfigError {
                source: "--node-timeout".into(),
                message: "expected at least 1s (nodes beat six times per timeout)".into(),
            });
        }
        let retain_logs = self.retention("--retain-logs", "ECHOCENTER_RETAIN_LOGS", 30)?;
        let retain_chat = self.retention("--retain-chat", "ECHOCENTER_RETAIN_CHAT", 365)?;
        let max_log_rows_per_agent = self.number(
            "--max-log-rows-per-agent",
            "ECHOCENTER_MAX_LOG_ROWS_PER_AGENT",
            100_000,
            0,
            usize::MAX,
        )?;
        let max_log_bytes_per_agent = self.number(
            "--max-log-bytes-per-agent",
            "ECHOCENTER_MAX_LOG_BYTES_PER_AGENT",
            64 << 20,
            0,
            usize::MAX,
        )?;
        let conformance_echo = self.args.contains("--conformance-echo");
        let fault_injection = self.args.contains("--fault-injection");
        Ok(Config {
            addr,
            db,
            env,
            jwt_secret,
            jwt_ttl,
            admin_user,
            admin_password,
            max_message_bytes,
            max_connections,
            max_connections_per_ip,
            trusted_proxies,
            max_auth_failures,
            allowed_origins,
            max_frames_per_second,
            metrics_token,
            log,
            sync,
            ws_ping_interval,
            ws_idle_timeout,
            conformance_echo,
            fault_injection,
            max_log_bytes_per_second,
            approval_ttl,
            node_timeout,
            retain_logs,
            retain_chat,
            max_log_rows_per_agent: (max_log_rows_per_agent > 0)
                .then_some(max_log_rows_per_agent as u64),
            max_log_bytes_per_agent: (max_log_bytes_per_agent > 0)
                .then_some(max_log_bytes_per_agent as u64),
        })
    }

    fn duration(
        &mut self,
        flag: &'static str,
        var: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match self.pick(flag, &[var])? {
            Some(raw) => match parse_duration(&raw.value) {
                Some(d) if d >= Duration::from_millis(100) => Ok(d),
                _ => Err(bad(
                    raw,
                    "expected a duration of at least 100ms such as 25s",
                )),
            },
            None => Ok(default),
        }
    }

    /// A retention period: days (`30d`), a Go duration (`12h`), or `0` for ever.
    fn retention(
        &mut self,
        flag: &'static str,
        var: &str,
        default_days: u64,
    ) -> Result<Option<Duration>, ConfigError> {
        match self.pick(flag, &[var])? {
            None => Ok(Some(Duration::from_secs(default_days * 86_400))),
            Some(raw) => match parse_retention(&raw.value) {
                Some(d) => Ok((!d.is_zero()).then_some(d)),
                None => Err(bad(
                    raw,
                    "expected days such as 30d, a duration such as 12h, or 0 to keep for ever",
                )),
            },
        }
    }

    /// `--db` or `ECHOCENTER_DB` (a path or a URL); else the original's variables:
    /// `DB_DRIVER` (`sqlite`, the default, or `postgres`/`postgresql`), then `DB_PATH` for
    /// SQLite, `DB_DSN` or the `PG_*` variables for PostgreSQL.
    fn database(&mut self) -> Result<Database, ConfigError> {
        if let Some(raw) = self.pick("--db", &["ECHOCENTER_DB"])? {
            return database::from_db_value(&raw.source, &raw.value);
        }
        let env = self.env;
        let set = |k: &str| env(k).filter(|v| !v.is_empty());
        let driver = set("DB_DRIVER").map(|d| d.trim().to_ascii_lowercase());
        match driver.as_deref() {
            None | Some("sqlite") | Some("sqlite3") => match set("DB_PATH") {
                Some(path) => database::from_db_value("DB_PATH", &path),
                None => Ok(Database::Sqlite(PathBuf::from("./echocenter.db"))),
            },
            Some("postgres") | Some("postgresql") => match set("DB_DSN") {
                Some(dsn) => database::parse_dsn("DB_DSN", &dsn).map(Database::Postgres),
                None => database::from_pg_variables(&set).map(Database::Postgres),
            },
            Some(other) => Err(ConfigError {
                source: "DB_DRIVER".into(),
                message: format!(
                    "unsupported DB_DRIVER: expected sqlite or postgres, got {other:?}"
                ),
            }),
        }
    }

    fn upstream_addr(&mut self) -> Result<String, ConfigError> {
        let host = (self.env)("SERVER_HOST").filter(|v| !v.is_empty());
        let port = (self.env)("SERVER_PORT").filter(|v| !v.is_empty());
        if let Some(p) = &port {
            if p.parse::<u16>().is_err() {
                return Err(ConfigError {
                    source: "SERVER_PORT".into(),
                    message: format!("expected a port number, got {p:?}"),
                });
            }
        }
        let host = host.unwrap_or_else(|| "0.0.0.0".into());
        let port = port.unwrap_or_else(|| "8080".into());
        let joined = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        validate_addr(Raw {
            source: "SERVER_HOST".into(),
            value: joined,
        })
    }

    fn number(
        &mut self,
        flag: &'static str,
        var: &str,
        default: usize,
        min: usize,
        max: usize,
    ) -> Result<usize, ConfigError> {
        match self.pick(flag, &[var])? {
            Some(raw) => match raw.value.trim().parse::<usize>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(bad(
                    raw,
                    &format!("expected a whole number from {min} to {max}"),
                )),
            },
            None => Ok(default),
        }
    }
}

fn bad(raw: Raw, expected: &str) -> ConfigError {
    ConfigError {
        source: raw.source,
        message: format!("{expected}, got {:?}", raw.value),
    }
}

fn validate_addr(raw: Raw) -> Result<String, ConfigError> {
    use std::net::ToSocketAddrs;
    let resolves = raw
        .value
        .to_socket_addrs()
        .map(|mut it| it.next().is_some())
        .unwrap_or(false);
    if resolves {
        Ok(raw.value)
    } else {
        Err(bad(raw, "expected host:port such as 0.0.0.0:8080"))
    }
}

fn is_production(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "production" | "prod"
    )
}

fn parse_env_strict(raw: &Raw) -> Result<Environment, ConfigError> {
    match raw.value.trim().to_ascii_lowercase().as_str() {
        "production" | "prod" => Ok(Environment::Production),
        "development" | "dev" => Ok(Environment::Development),
        _ => Err(ConfigError {
            source: raw.source.clone(),
            message: format!("expected development or production, got {:?}", raw.value),
        }),
    }
}

/// A comma-separated list of addresses or CIDR blocks; `none` for an empty list.
fn parse_cidrs(raw: &Raw) -> Result<Vec<Cidr>, ConfigError> {
    if raw.value.trim().eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    raw.value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|part| {
            Cidr::parse(part).ok_or_else(|| ConfigError {
                source: raw.source.clone(),
                message: format!(
                    "expected addresses or CIDR blocks like 127.0.0.1/32,10.0.0.0/8 (or none), got {part:?}"
                ),
            })
        })
        .collect()
}

fn parse_origins(raw: &Raw) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::new();
    for part in raw
        .value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let ok =
            (part.starts_with("http://") || part.starts_with("https://")) && !part.ends_with('/');
        if !ok {
            return Err(ConfigError {
                source: raw.source.clone(),
                message: format!(
                    "expected exact origins like https://ops.example.com, got {part:?}"
                ),
            });
        }
        out.push(part.to_string());
    }
    Ok(out)
}

/// `30d` (whole days), `0`, or a Go duration of at least a minute.
pub fn parse_retention(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Some(days) = s.strip_suffix('d') {
        return days
            .parse::<u64>()
            .ok()
            .filter(|d| *d <= 100_000)
            .map(|d| Duration::from_secs(d * 86_400));
    }
    parse_duration(s).filter(|d| d.is_zero() || *d >= Duration::from_secs(60))
}

/// Go-style durations: a sequence of decimal numbers with units ns, us, µs, ms, s, m, h.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let number: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * scale;
    }
    if !total.is_finite() || total > 1e12 {
        return None;
    }
    Some(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(flags: &[&str], vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut args = pico_args::Arguments::from_vec(flags.iter().map(Into::into).collect());
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let env = move |k: &str| map.get(k).cloned();
        Loader::new(&mut args, &env).load()
    }

    #[test]
    fn defaults_serve_without_configuration() {
        let c = load(&[], &[]).unwrap();
        assert_eq!(c.addr, "0.0.0.0:8080");
        assert_eq!(c.db, Database::Sqlite(PathBuf::from("./echocenter.db")));
        assert_eq!(c.env, Environment::Development);
        assert_eq!(c.jwt_ttl, Duration::from_secs(86_400));
        assert_eq!(c.max_message_bytes, 65_536);
        assert_eq!(c.max_connections, 10_000);
    }

    #[test]
    fn flags_beat_our_variables_which_beat_upstream_names() {
        let vars = [
            ("ECHOCENTER_DB", "/a.db"),
            ("DB_PATH", "/b.db"),
            ("APP_ENV", "prod"),
        ];
        let file = |p: &str| Database::Sqlite(PathBuf::from(p));
        assert_eq!(load(&["--db", "/c.db"], &vars).unwrap().db, file("/c.db"));
        assert_eq!(load(&[], &vars).unwrap().db, file("/a.db"));
        assert_eq!(load(&[], &vars[1..]).unwrap().db, file("/b.db"));
        assert_eq!(load(&[], &vars).unwrap().env, Environment::Production);
        assert_eq!(
            load(&[], &[("APP_ENV", "staging")]).unwrap().env,
            Environment::Development
        );
        let c = load(
            &[],
            &[("SERVER_HOST", "127.0.0.1"), ("SERVER_PORT", "9090")],
        )
        .unwrap();
        assert_eq!(c.addr, "127.0.0.1:9090");
    }

    #[test]
    fn bad_values_name_their_source() {
        let e = load(&[], &[("ECHOCENTER_JWT_TTL", "1d")]).unwrap_err();
        assert_eq!(e.source, "ECHOCENTER_JWT_TTL");
        let e = load(&["--max-connections", "lots"], &[]).unwrap_err();
        assert_eq!(e.source, "--max-connections");
        let e = load(&[], &[("JWT_SECRET", "short")]).unwrap_err();
        assert_eq!(e.source, "JWT_SECRET");
        let e = load(&[], &[("ECHOCENTER_ENV", "staging")]).unwrap_err();
        assert_eq!(e.source, "ECHOCENTER_ENV");
        let e = load(&[], &[("SERVER_PORT", "http")]).unwrap_err();
        assert_eq!(e.source, "SERVER_PORT");
    }

    #[test]
    fn an_overridden_value_is_not_parsed() {
        let c = load(&["--jwt-ttl", "1h"], &[("ECHOCENTER_JWT_TTL", "garbage")]).unwrap();
        assert_eq!(c.jwt_ttl, Duration::from_secs(3600));
    }

    #[test]
    fn trusted_proxies_default_to_loopback_and_parse_cidrs() {
        let c = load(&[], &[]).unwrap();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let trusted = |c: &Config, s: &str| c.trusted_proxies.iter().any(|n| n.contains(ip(s)));
        assert!(trusted(&c, "127.0.0.1"));
        assert!(trusted(&c, "::1"));
        assert!(trusted(&c, "::ffff:127.0.0.1"));
        assert!(!trusted(&c, "127.0.0.2"));
        assert!(!trusted(&c, "10.0.0.1"));
        assert_eq!(c.max_connections_per_ip, 256);
        let c = load(&["--trusted-proxies", "10.1.0.0/16, fd00::/8"], &[]).unwrap();
        assert!(trusted(&c, "10.1.200.3"));
        assert!(!trusted(&c, "10.2.0.1"));
        assert!(trusted(&c, "fd12::1"));
        assert!(!trusted(&c, "127.0.0.1"));
        let c = load(&["--trusted-proxies", "none"], &[]).unwrap();
        assert!(c.trusted_proxies.is_empty());
        let e = load(&[], &[("ECHOCENTER_TRUSTED_PROXIES", "10.0.0.0/33")]).unwrap_err();
        assert_eq!(e.source, "ECHOCENTER_TRUSTED_PROXIES");
        let c = load(&["--max-connections", "100"], &[]).unwrap();
        assert_eq!(c.max_connections_per_ip, 100);
    }

    #[test]
    fn retention_takes_days_durations_or_zero() {
        let c = load(&[], &[]).unwrap();
        assert_eq!(c.retain_logs, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(c.retain_chat, Some(Duration::from_secs(365 * 86_400)));
        assert_eq!(c.max_log_rows_per_agent, Some(100_000));
        assert_eq!(c.max_log_bytes_per_agent, Some(64 << 20));
        let c = load(
            &[
                "--retain-logs",
                "7d",
                "--retain-chat",
                "0",
                "--max-log-rows-per-agent",
                "0",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.retain_logs, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(c.retain_chat, None);
        assert_eq!(c.max_log_rows_per_agent, None);
        assert_eq!(
            load(&["--retain-logs", "90m"], &[]).unwrap().retain_logs,
            Some(Duration::from_secs(5400))
        );
        for bad in ["-1d", "xd", "10s", "week"] {
            let e = load(&["--retain-logs", bad], &[]).unwrap_err();
            assert_eq!(e.source, "--retain-logs", "{bad}");
        }
    }

    fn postgres_of(c: &Config) -> &PostgresDsn {
        match &c.db {
            Database::Postgres(d) => d,
            other => panic!("not PostgreSQL: {other:?}"),
        }
    }

    #[test]
    fn the_database_is_a_file_or_a_postgres_url() {
        let url = "postgres://app:pw@db:5432/echo";
        let c = load(&["--db", url], &[]).unwrap();
        assert_eq!(postgres_of(&c).expose(), url);
        let c = load(&[], &[("ECHOCENTER_DB", "postgresql://db/echo")]).unwrap();
        assert_eq!(postgres_of(&c).redacted(), "postgresql://db/echo");
        // A URL of a kind we do not serve is refused, not taken for a file name.
        for (flags, vars, source) in [
            (vec!["--db", "mysql://u:p@h/db"], vec![], "--db"),
            (
                vec![],
                vec![("ECHOCENTER_DB", "sqlite://x.db")],
                "ECHOCENTER_DB",
            ),
            (vec![], vec![("DB_PATH", "mysql://h/db")], "DB_PATH"),
        ] {
            let e = load(&flags, &vars).unwrap_err();
            assert_eq!(e.source, source);
            assert!(e.message.contains("unsupported"), "{}", e.message);
        }
    }

    #[test]
    fn the_originals_db_driver_and_pg_variables_select_postgres() {
        let c = load(
            &[],
            &[
                ("DB_DRIVER", "postgres"),
                ("DB_DSN", "postgres://u:pw@h/d"),
                ("DB_PATH", "/x.db"),
            ],
        )
        .unwrap();
        assert_eq!(postgres_of(&c).expose(), "postgres://u:pw@h/d");
        let c = load(
            &[],
            &[
                ("DB_DRIVER", "PostgreSQL"),
                ("PG_HOST", "10.1.2.3"),
                ("PG_PORT", "5433"),
                ("PG_USER", "demo"),
                ("PG_PASSWORD", "hunter2"),
                ("PG_DATABASE", "echocenter_dev"),
                ("PG_SSLMODE", "disable"),
            ],
        )
        .unwrap();
        assert_eq!(
            postgres_of(&c).expose(),
            "postgres://demo:hunter2@10.1.2.3:5433/echocenter_dev"
        );
        assert!(
            !format!("{c:?}").contains("hunter2"),
            "Debug shows the password"
        );
        // Our own names win, and DB_DRIVER=sqlite (the original's default) keeps DB_PATH.
        let c = load(
            &["--db", "/mine.db"],
            &[("DB_DRIVER", "mysql"), ("DB_DSN", "garbage")],
        )
        .unwrap();
        assert_eq!(c.db, Database::Sqlite(PathBuf::from("/mine.db")));
        let c = load(&[], &[("DB_DRIVER", "sqlite"), ("DB_PATH", "/b.db")]).unwrap();
        assert_eq!(c.db, Database::Sqlite(PathBuf::from("/b.db")));
        let e = load(&[], &[("DB_DRIVER", "mysql")]).unwrap_err();
        assert_eq!(e.source, "DB_DRIVER");
        let e = load(&[], &[("DB_DRIVER", "postgres"), ("PG_PORT", "x")]).unwrap_err();
        assert_eq!(e.source, "PG_PORT");
        let e = load(
            &[],
            &[("DB_DRIVER", "postgres"), ("PG_SSLMODE", "verify-full")],
        )
        .unwrap_err();
        assert_eq!(e.source, "PG_SSLMODE");
        assert!(e.message.contains("TLS"), "{}", e.message);
        let e = load(
            &[],
            &[
                ("DB_DRIVER", "postgres"),
                ("DB_DSN", "host=h sslmode=require"),
            ],
        )
        .unwrap_err();
        assert_eq!(e.source, "DB_DSN");
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1d"), None);
        assert_eq!(parse_duration("h"), None);
        assert_eq!(parse_duration(""), None);
    }
}
