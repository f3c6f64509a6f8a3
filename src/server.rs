//! The process: start-up and shutdown. The accept loop and the head reader are in
//! `accept`, the HTTP bridge in `http::bridge`; see ARCHITECTURE.md.

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::accept::Door;
use crate::app::App;
use crate::auth::{self, FailureLimiter, JwtKeys};
use crate::bootstrap;
use crate::config::{Config, Environment};
use crate::http::bridge::Bridge;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::{log_error, log_info};

/// `echocenter serve`: runs until SIGINT/SIGTERM, then shuts down cleanly.
pub fn serve(config: Config) -> Result<(), String> {
    crate::logging::set_level(config.log);
    // Installed before anything is announced, so a SIGTERM right after "listening on"
    // already gets the clean shutdown.
    let signals = {
        use signal_hook::consts::{SIGINT, SIGTERM};
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .map_err(|e| log_error!("cannot install signal handlers: {e}; running until killed"))
            .ok()
    };
    let store = bootstrap::open_store(&config)?;
    // The port first: a start that cannot listen must not bootstrap (and print a production
    // admin password that then nobody can use).
    let listener =
        listen(&config.addr).map_err(|e| format!("cannot listen on {}: {e}", config.addr))?;
    bootstrap::first_run(&store, &config)?;
    // Nothing is connected yet, whatever a crashed run left in the database.
    store.clear_presence().map_err(|e| e.to_string())?;
    store.start_retention(bootstrap::retention(&config));
    // Tells the command-line tools which mode owns this database (they keep no raw token
    // copies in a production database).
    store
        .set_setting(
            "env",
            if config.env == Environment::Production {
                "production"
            } else {
                "development"
            },
        )
        .map_err(|e| e.to_string())?;
    let keys = JwtKeys::new(
        bootstrap::jwt_secret(&store, &config)?,
        config.jwt_ttl,
        bootstrap::jwt_generation(&store)?,
    );
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    // Several nodes on one PostgreSQL: join them (a SQLite file has only this one).
    store
        .join_cluster(&local.to_string(), config.node_timeout)
        .map_err(|e| format!("cannot join the other nodes: {e}"))?;
    let hub = Hub::new(
        store.clone(),
        Arc::new(Metrics::default()),
        config.max_log_bytes_per_second,
    );
    let socket_dir = private_dir()?;
    let app = Arc::new(App {
        token_failures: FailureLimiter::new(config.max_auth_failures, Duration::from_secs(60)),
        config,
        store,
        hub,
        keys,
        logins: FailureLimiter::for_logins(),
        shutting_down: AtomicBool::new(false),
    });
    {
        // A data reset on another node moved the JWT key to a new generation.
        let weak = Arc::downgrade(&app);
        app.hub.on_reset(Box::new(move || {
            if let Some(app) = weak.upgrade() {
                match bootstrap::jwt_generation(&app.store) {
                    Ok(g) => app.keys.set_generation(g),
                    Err(e) => log_error!("cannot reload the JWT generation: {e}"),
                }
            }
        }));
    }
    app.hub.start_bus().map_err(|e| e.to_string())?;
    let bridge = Arc::new(Bridge::new(socket_dir.clone()));
    bridge
        .start(&app)
        .map_err(|e| format!("cannot start the HTTP layer: {e}"))?;
    {
        let door = Door::new(app.clone(), bridge.clone());
        std::thread::Builder::new()
            .name("accept".into())
            .spawn(move || crate::accept::accept_loop(door, listener))
            .map_err(|e| e.to_string())?;
    }
    log_info!(
        "echocenter listening on {local} ({} mode, database {})",
        if app.production() {
            "production"
        } else {
            "development"
        },
        app.store.describe()
    );
    // Approvals: every request still pending at start-up expires (nobody is waiting for it
    // any more, as in the original); later ones after --approval-ttl, checked every minute.
    // Among several nodes, only once this one is alone: a Butler on another node may be
    // waiting for an answer. (A node that died without leaving counts until its silence
    // passes --node-timeout; then what was asked before this start expires.)
    let started = crate::clock::now_rfc3339();
    let mut expire_from_before_start = app.hub.peers() > 0;
    if !expire_from_before_start {
        app.hub.expire_approvals(None);
    }
    {
        let app = app.clone();
        std::thread::Builder::new()
            .name("approvals".into())
            .spawn(move || loop {
                // A short TTL (tests) is checked as often as a quarter of it.
                let every = (app.config.approval_ttl / 4)
                    .min(app.config.node_timeout / 2)
                    .clamp(Duration::from_millis(200), Duration::from_secs(60));
                std::thread::sleep(every);
                if expire_from_before_start && app.hub.peers() == 0 {
                    app.hub.expire_approvals(Some(started.clone()));
                    expire_from_before_start = false;
                }
                let ttl = app.config.approval_ttl.as_millis() as i64;
                app.hub
                    .expire_approvals(Some(crate::clock::format_ms(crate::clock::now_ms() - ttl)));
            })
            .map_err(|e| e.to_string())?;
    }
    log_info!("dashboard: {}", dashboard_url(local));
    // Tests and scripts wait for this exact line on stdout.
    println!("listening on {local}");
    let _ = io::stdout().flush();

    wait_for_signal(signals);
    shutdown(&app, &bridge, local);
    let _ = std::fs::remove_dir_all(&socket_dir);
    Ok(())
}

/// Connections a burst may leave waiting for `accept` before the kernel drops SYNs (std's
/// `TcpListener::bind` leaves 128; clients then wait a second for a SYN retransmit). The
/// kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: i32 = 4096;

fn listen(addr: &str) -> io::Result<TcpListener> {
    use std::net::ToSocketAddrs;
    let addr = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Where a person on this machine opens the dashboard.
fn dashboard_url(local: SocketAddr) -> String {
    if local.ip().is_unspecified() {
        format!(
            "http://localhost:{}/ (listening on every address: also http://<this host>:{}/)",
            local.port(),
            local.port()
        )
    } else {
        format!("http://{local}/")
    }
}

fn wait_for_signal(signals: Option<signal_hook::iterator::Signals>) {
    match signals {
        Some(mut signals) => {
            if let Some(sig) = signals.forever().next() {
                log_info!("received signal {sig}, shutting down");
            }
        }
        None => loop {
            std::thread::park();
        },
    }
}

fn shutdown(app: &Arc<App>, bridge: &Bridge, local: SocketAddr) {
    app.shutting_down.store(true, Relaxed);
    // Wake the accept loop so it sees the flag.
    let wake = if local.ip().is_unspecified() {
        SocketAddr::new(IpAddr::from([127, 0, 0, 1]), local.port())
    } else {
        local
    };
    let _ = TcpStream::connect_timeout(&wake, Duration::from_millis(200));
    app.hub.close_all(crate::wire::Close::ServerShutdown);
    let deadline = Instant::now() + Duration::from_secs(5);
    while app.hub.connection_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Every frame that was acknowledged is already committed; this commits the rest
    // (delivery marks, last-seen times).
    app.store.flush();
    app.hub.leave_cluster();
    bridge.stop();
    log_info!("shutdown complete");
}

fn private_dir() -> Result<PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!(
        "echocenter-{}-{}",
        std::process::id(),
        hex::encode(auth::random_bytes::<6>())
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}
