//! The command line: options every scenario shares (`Common`) and one struct per scenario,
//! each with its defaults and bounds, so a typo cannot start an unbounded run.

use std::net::SocketAddr;
use std::time::Duration;

use crate::Res;

/// Upper bounds so a typo cannot start an unbounded run.
const MAX_CONNECTIONS: usize = 20_000;
const MAX_DURATION_SECS: f64 = 600.0;

pub fn finish_args(args: pico_args::Arguments) -> Res<()> {
    let rest = args.finish();
    if rest.is_empty() {
        Ok(())
    } else {
        Err(format!("unexpected arguments: {rest:?}"))
    }
}

fn opt<T: std::str::FromStr>(
    args: &mut pico_args::Arguments,
    name: &'static str,
    default: T,
) -> Res<T>
where
    T::Err: std::fmt::Display,
{
    args.opt_value_from_str(name)
        .map(|v| v.unwrap_or(default))
        .map_err(|e| format!("{name}: {e}"))
}

fn bounded(name: &str, v: usize, lo: usize, hi: usize) -> Res<usize> {
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{name} must be between {lo} and {hi}"))
    }
}

fn secs(name: &str, v: f64) -> Res<Duration> {
    if v.is_finite() && (0.0..=MAX_DURATION_SECS).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!(
            "{name} must be between 0 and {MAX_DURATION_SECS} seconds"
        ))
    }
}

pub struct Common {
    pub addr: SocketAddr,
    /// Where agents connect, when not `addr`: another node of the same hub (PostgreSQL),
    /// so that every round trip crosses between nodes.
    pub agent_addr: Option<SocketAddr>,
    pub admin_user: String,
    pub admin_password: String,
    pub server_pid: Option<u32>,
    pub metrics_token: Option<String>,
    pub prefix: String,
}

impl Common {
    pub fn parse(args: &mut pico_args::Arguments) -> Res<Common> {
        let addr: SocketAddr = opt(args, "--addr", "127.0.0.1:18100".parse().unwrap())?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "--addr {addr}: echoload only targets the loopback address"
            ));
        }
        let default_prefix = format!(
            "el{:x}",
            (std::process::id() as u64) << 20
                ^ std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64 & 0xf_ffff)
                    .unwrap_or(0)
        );
        let agent_addr: Option<SocketAddr> = args
            .opt_value_from_str("--agent-addr")
            .map_err(|e| format!("--agent-addr: {e}"))?;
        if let Some(a) = agent_addr.filter(|a| !a.ip().is_loopback()) {
            return Err(format!(
                "--agent-addr {a}: echoload only targets the loopback address"
            ));
        }
        Ok(Common {
            addr,
            agent_addr,
            admin_user: opt(args, "--admin-user", "admin".to_string())?,
            admin_password: opt(args, "--admin-password", "admin123".to_string())?,
            server_pid: args
                .opt_value_from_str("--server-pid")
                .map_err(|e| format!("--server-pid: {e}"))?,
            metrics_token: args
                .opt_value_from_str("--metrics-token")
                .map_err(|e| format!("--metrics-token: {e}"))?,
            prefix: opt(args, "--prefix", default_prefix)?,
        })
    }
}

pub struct ConnectArgs {
    pub agents: usize,
    pub hold: Duration,
    pub settle: Duration,
    pub max_connect: Duration,
    /// The server's per-connection thread stack size (`THREAD_STACK` in src/app.rs): how the
    /// memory breakdown recognizes those stacks among the server's mappings.
    pub server_stack_kib: u64,
}

impl ConnectArgs {
    pub fn parse(args: &mut pico_args::Arguments) -> Res<ConnectArgs> {
        Ok(ConnectArgs {
            agents: bounded("--agents", opt(args, "--agents", 5000)?, 1, MAX_CONNECTIONS)?,
            hold: secs("--duration", opt(args, "--duration", 10.0)?)?,
            settle: secs("--settle", opt(args, "--settle", 2.0)?)?,
            max_connect: secs(
                "--max-connect-secs",
                opt(args, "--max-connect-secs", 120.0)?,
            )?,
            server_stack_kib: bounded(
                "--server-stack-kib",
                opt(args, "--server-stack-kib", 256)?,
                4,
                64 * 1024,
            )? as u64,
        })
    }
}

pub struct ChatArgs {
    pub stream: bool,
    /// `butler`: the Butler's one connection is the only sender, sending one CHAT to each
    /// agent per this interval (an open loop at agents / interval, spread evenly).
    pub butler_interval: Option<Duration>,
    pub humans: usize,
    pub agents: usize,
    pub rate: f64,
    pub closed_loop: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub drain: Duration,
    pub payload_bytes: usize,
    pub chunks: usize,
    pub chunk_gap: Duration,
}

impl ChatArgs {
    pub fn parse(args: &mut pico_args::Arguments, stream: bool) -> Res<ChatArgs> {
        let (humans, agents, rate) = if stream {
            (8, 20, 200.0)
        } else {
            (16, 50, 5000.0)
        };
        let a = ChatArgs {
            stream,
            butler_interval: None,
            humans: bounded("--humans", opt(args, "--humans", humans)?, 1, 2000)?,
            agents: bounded(
                "--agents",
                opt(args, "--agents", agents)?,
                1,
                MAX_CONNECTIONS,
            )?,
            rate: opt(args, "--rate", rate)?,
            closed_loop: if stream {
                0
            } else {
                bounded("--closed-loop", opt(args, "--closed-loop", 0)?, 0, 100_000)?
            },
            warmup: secs("--warmup", opt(args, "--warmup", 1.0)?)?,
            duration: secs("--duration", opt(args, "--duration", 10.0)?)?,
            drain: secs("--drain", opt(args, "--drain", 5.0)?)?,
            payload_bytes: bounded(
                "--payload-bytes",
                opt(args, "--payload-bytes", 64)?,
                0,
                32 * 1024,
            )?,
            chunks: if stream {
                bounded("--chunks", opt(args, "--chunks", 10)?, 1, 1000)?
            } else {
                0
            },
            chunk_gap: Duration::from_micros(if stream {
                opt(args, "--chunk-gap-us", 0u64)?.min(1_000_000)
            } else {
                0
            }),
        };
        if !(a.rate > 0.0 && a.rate <= 1_000_000.0) {
            return Err("--rate must be in (0, 1000000]".into());
        }
        if a.closed_loop > 0 && a.warmup >= a.duration {
            return Err("--warmup must be shorter than --duration".into());
        }
        if a.closed_loop > 0 && a.closed_loop < a.humans {
            return Err(
                "--closed-loop K needs K >= --humans (each human keeps K/H in flight)".into(),
            );
        }
        Ok(a)
    }

    /// `butler`: `--agents` (200), `--interval-ms` (100), `--duration`, `--drain`,
    /// `--payload-bytes`; the rest of a chat run is fixed (one sender, open loop, no stream).
    pub fn parse_butler(args: &mut pico_args::Arguments) -> Res<ChatArgs> {
        let agents = bounded("--agents", opt(args, "--agents", 200)?, 1, MAX_CONNECTIONS)?;
        let interval_ms: f64 = opt(args, "--interval-ms", 100.0)?;
        if !(interval_ms.is_finite() && (1.0..=60_000.0).contains(&interval_ms)) {
            return Err("--interval-ms must be between 1 and 60000".into());
        }
        let rate = agents as f64 * 1000.0 / interval_ms;
        if rate > 1_000_000.0 {
            return Err("--agents / --interval-ms: over 1,000,000 CHATs/s".into());
        }
        Ok(ChatArgs {
            stream: false,
            butler_interval: Some(Duration::from_secs_f64(interval_ms / 1000.0)),
            humans: 1,
            agents,
            rate,
            closed_loop: 0,
            warmup: Duration::ZERO,
            duration: secs("--duration", opt(args, "--duration", 10.0)?)?,
            drain: secs("--drain", opt(args, "--drain", 5.0)?)?,
            payload_bytes: bounded(
                "--payload-bytes",
                opt(args, "--payload-bytes", 64)?,
                0,
                32 * 1024,
            )?,
            chunks: 0,
            chunk_gap: Duration::ZERO,
        })
    }
}

pub struct LogsArgs {
    pub agents: usize,
    pub rate: f64,
    pub dashboards: usize,
    pub senders: usize,
    pub duration: Duration,
    pub drain: Duration,
}

impl LogsArgs {
    pub fn parse(args: &mut pico_args::Arguments) -> Res<LogsArgs> {
        let a = LogsArgs {
            agents: bounded("--agents", opt(args, "--agents", 200)?, 1, MAX_CONNECTIONS)?,
            rate: opt(args, "--rate", 10.0)?,
            dashboards: bounded("--dashboards", opt(args, "--dashboards", 3)?, 1, 1000)?,
            senders: bounded("--senders", opt(args, "--senders", 4)?, 1, 256)?,
            duration: secs("--duration", opt(args, "--duration", 10.0)?)?,
            drain: secs("--drain", opt(args, "--drain", 5.0)?)?,
        };
        if !(a.rate > 0.0 && a.rate <= 10_000.0) {
            return Err("--rate must be in (0, 10000] per agent".into());
        }
        Ok(a)
    }
}

pub struct FloodArgs {
    pub agents: usize,
    pub lines: u64,
    pub line_bytes: usize,
    /// The server's database file, whose size (and its WAL's) is the result.
    pub db: std::path::PathBuf,
    pub sample: Duration,
    pub settle: Duration,
}

impl FloodArgs {
    pub fn parse(args: &mut pico_args::Arguments) -> Res<FloodArgs> {
        let lines: u64 = opt(args, "--lines", 100_000)?;
        if !(1..=20_000_000).contains(&lines) {
            return Err("--lines must be between 1 and 20000000 per agent".into());
        }
        let db: Option<std::path::PathBuf> = args
            .opt_value_from_str("--db")
            .map_err(|e| format!("--db: {e}"))?;
        Ok(FloodArgs {
            agents: bounded("--agents", opt(args, "--agents", 1)?, 1, 256)?,
            lines,
            line_bytes: bounded("--line-bytes", opt(args, "--line-bytes", 4000)?, 16, 60_000)?,
            db: db.ok_or("--db PATH (the server's database file) is required")?,
            sample: secs("--sample", opt(args, "--sample", 0.5)?)?,
            settle: secs("--settle", opt(args, "--settle", 65.0)?)?,
        })
    }
}

pub struct SearchArgs {
    pub searchers: usize,
    pub duration: Duration,
}

impl SearchArgs {
    pub fn parse(args: &mut pico_args::Arguments) -> Res<SearchArgs> {
        Ok(SearchArgs {
            searchers: bounded("--searchers", opt(args, "--searchers", 7)?, 1, 64)?,
            duration: secs("--duration", opt(args, "--duration", 10.0)?)?,
        })
    }
}
