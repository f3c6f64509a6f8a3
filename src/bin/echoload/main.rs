//! `echoload`: a load generator for EchoCenter that speaks only the public protocol — REST
//! login and registration, then the one WebSocket — against a server on the loopback address.
//!
//! Scenarios (each bounded in time and count; each ends by printing exactly one JSON line of
//! results on stdout, progress goes to stderr):
//! - `connect`: N idle agent connections held for a while; connect rate, failures, and the
//!   server's RSS before/after (`--server-pid`) → KiB per idle connection, and what it is
//!   made of (thread stacks, heap and other anonymous memory, threads and mappings).
//! - `chat`: H humans send CHAT to A agents round-robin at an offered rate; the agents answer
//!   each request with its payload; round-trip latency, lost and duplicated replies.
//!   `--closed-loop K` keeps K requests in flight instead, as fast as the server allows.
//! - `logs`: N agents send SYSTEM_LOG at R/s each to D dashboards (admin connections);
//!   delivered/sent per dashboard and end-to-end latency.
//! - `stream`: like `chat`, but agents answer with CHAT_STREAM chunks, a final CHAT and
//!   CHAT_STREAM_END; chunk latency and whether the order was kept.
//! - `butler`: the Butler (its raw token from the development endpoint) sends one CHAT to
//!   each of A agents every I ms and the agents answer it: the fan-out of one machine
//!   connection. Round-trip latency, lost and duplicated, as `chat` (with ACKs for echoes).
//! - `flood`: agents send SYSTEM_LOG as fast as the server takes it; the database file's
//!   size at its peak and after the pruner ran (retention under a flood).
//! - `search`: an agent's authentication latency, alone and while humans search the log.
//!
//! Threads, not async: one blocking reader thread per connection that has something to read
//! (small stacks), sender threads that pace requests. A connection read and written by two
//! threads is two `WebSocket` values over clones of one `TcpStream`: the reader's own writes
//! (pongs, close replies) are discarded, so only the sender ever writes to the socket.
//! Latency is measured on one clock: the sender writes `now` (µs since start) into the
//! payload, and the receiver in the same process subtracts it.
//!
//! Code map: `options` (the command line), `rest` (login, registering the users a run needs),
//! `ws` (opening and splitting WebSocket connections), `measure` (latency percentiles, /proc
//! and /metrics readings), `clock` (the one clock), and one module per scenario: `connect`,
//! `chat/` (chat, stream and the Butler fan-out), `logs`, `flood`, `search`.

use serde_json::{json, Value};

/// Every fallible step of a run ends in a message for the JSON line's `error`.
type Res<T> = Result<T, String>;

/// A progress line on stderr (stdout holds only the result line).
macro_rules! note {
    ($($t:tt)*) => { eprintln!("echoload: {}", format!($($t)*)) };
}

mod chat;
mod clock;
mod connect;
mod flood;
mod logs;
mod measure;
mod options;
mod rest;
mod search;
mod ws;

use options::{finish_args, ChatArgs, Common, ConnectArgs, FloodArgs, LogsArgs, SearchArgs};

const USAGE: &str = "\
echoload SCENARIO [options]   (one JSON line of results on stdout)

scenarios:
  connect   --agents N (5000) --duration S hold time (10) --settle S (2) --max-connect-secs (120)
            --server-stack-kib K (256; the server's per-connection thread stack)
  chat      --humans H (16) --agents A (50) --rate RT/S (5000) --duration S (10)
            [--closed-loop K --warmup S (1)] --payload-bytes B (64) --drain S (5)
  logs      --agents N (200) --rate R/S per agent (10) --dashboards D (3) --senders W (4)
            --duration S (10) --drain S (5)
  stream    --humans H (8) --agents A (20) --rate REQ/S (200) --chunks C (10)
            --chunk-gap-us U (0) --duration S (10) --drain S (5)
  butler    --agents A (200) --interval-ms I (100) --duration S (10) --drain S (5)
            --payload-bytes B (64): the Butler sends one CHAT to each agent every I ms
            (spread evenly: A*1000/I per second), the agents answer it
  flood     --db PATH (the server's file) --agents N (1) --lines L per agent (100000)
            --line-bytes B (4000) --sample S (0.5) --settle S (65): SYSTEM_LOG as fast as
            the server takes it; the database's size at its peak and once the pruner ran
  search    --searchers K (7) --duration S per phase (10): agent auth latency (WebSocket
            handshake, REST /me) alone, then while K threads search the log back to back

common:
  --addr 127.0.0.1:18100   loopback only
  --agent-addr A           chat/stream/butler: agents connect here instead (another node)
  --admin-user admin --admin-password admin123
  --server-pid PID         sample the server's RSS, threads and CPU (per thread group)
  --metrics-token T        read GET /metrics before/after (commits, batch sizes, errors)
  --prefix P               prefix of the users created (default: unique per run)
";

fn main() {
    clock::start();
    let mut args = pico_args::Arguments::from_env();
    if args.contains(["-h", "--help"]) {
        print!("{USAGE}");
        return;
    }
    let scenario = match args.subcommand() {
        Ok(Some(s)) => s,
        _ => {
            eprint!("{USAGE}");
            std::process::exit(2);
        }
    };
    match run(&scenario, args) {
        Ok(v) => println!("{v}"),
        Err(e) => {
            note!("{scenario} failed: {e}");
            println!("{}", json!({"scenario": scenario, "error": e}));
            std::process::exit(1);
        }
    }
}

fn run(scenario: &str, mut args: pico_args::Arguments) -> Res<Value> {
    let common = Common::parse(&mut args)?;
    let result = match scenario {
        "connect" => {
            let a = ConnectArgs::parse(&mut args)?;
            finish_args(args)?;
            connect::run(&common, &a)
        }
        "chat" | "stream" => {
            let a = ChatArgs::parse(&mut args, scenario == "stream")?;
            finish_args(args)?;
            chat::run(&common, &a)
        }
        "butler" => {
            let a = ChatArgs::parse_butler(&mut args)?;
            finish_args(args)?;
            chat::run(&common, &a)
        }
        "logs" => {
            let a = LogsArgs::parse(&mut args)?;
            finish_args(args)?;
            logs::run(&common, &a)
        }
        "flood" => {
            let a = FloodArgs::parse(&mut args)?;
            finish_args(args)?;
            flood::run(&common, &a)
        }
        "search" => {
            let a = SearchArgs::parse(&mut args)?;
            finish_args(args)?;
            search::run(&common, &a)
        }
        other => Err(format!("unknown scenario {other:?}\n{USAGE}")),
    }?;
    Ok(result)
}
