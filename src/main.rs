//! EchoCenter: a self-hosted hub for machine agents. See README.md and ARCHITECTURE.md.

mod accept;
mod app;
mod auth;
mod bootstrap;
mod cli;
mod clock;
mod config;
mod head;
mod http;
mod hub;
mod identity;
mod logging;
mod metrics;
mod server;
mod store;
mod wire;
mod ws;

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Err(e) = cli::run(args) {
        eprintln!("echocenter: {e}");
        std::process::exit(e.exit_code());
    }
}
