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
    // Test only: a clock moved forward by this much (`30d`, `36h`), so that retention can be
    // tested without waiting a month. Not a setting; never set it in production.
    if let Some(offset) = std::env::var("ECHOCENTER_CLOCK_OFFSET")
        .ok()
        .and_then(|v| config::parse_retention(&v))
    {
        clock::set_offset_ms(offset.as_millis() as i64);
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Err(e) = cli::run(args) {
        eprintln!("echocenter: {e}");
        std::process::exit(e.exit_code());
    }
}
