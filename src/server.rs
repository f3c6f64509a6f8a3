//! The process: start-up and shutdown. The accept loop and the head reader are in
//! `accept`, the HTTP bridge in `http::bridge`; see ARCHITECTURE.md.

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::app::App;
use crate::auth::{self, FailureLimiter, JwtKeys};
use crate::config::{Config, Environment};
use crate::http::bridge::Bridge;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::{log_error, log_info};

/// Opens the database, runs bootstrap on an empty one, and enforces production rules.
/// Shared by `serve` and the command-line subcommands.
pub fn open_store(config: &Config) -> Result<Store, String> {
    let store = Store::open(&config.db, config.sync)
        .map_err(|e| format!("cannot open database {}: {e}", config.db.display()))?;
    bootstrap(&store, config).map_err(|e| format!("bootstrap failed: {e}"))?;
    if config.env == Environment::Production {
        let cleared = store.clear_raw_tokens().map_err(|e| e.to_string())?;
        if cleared > 0 {
            log_info!("production: cleared {cleared} raw token copies from the database");
        }
    }
    Ok(store)
}

/// Creates the admin (id 1) and the Butler (id 2) on an empty database.
pub fn bootstrap(store: &Store, config: &Config) -> Result<(), crate::store::StoreError> {
    if store.user_count()? > 0 {
        return Ok(());
    }
    let admin = config.admin_user.clone().unwrap_or_else(|| "admin".into());
    let password = match (&config.admin_password, config.env) {
        (Some(p), _) => p.clone(),
        (None, Environment::Development) => {
            crate::log_warn!("bootstrap: created admin {admin:?} with the development password \"admin123\"; set ECHOCENTER_ADMIN_PASSWORD for anything real");
            "admin123".into()
        }
        (None, Environment::Production) => {
            let p = hex::encode(auth::random_bytes::<12>());
            // The one place a secret is printed: the operator has no other way to learn it.
            eprintln!(
                "bootstrap: created admin {admin:?} with password {p} (shown once; store it now)"
            );
            p
        }
    };
    let keep_raw = config.env == Environment::Development;
    store.bootstrap(
        &admin,
        &auth::hash_password(&password),
        &auth::generate_token(),
        keep_raw,
    )?;
    Ok(())
}

fn jwt_secret(store: &Store, config: &Config) -> Result<Vec<u8>, String> {
    if let Some(s) = &config.jwt_secret {
        return Ok(s.clone());
    }
    match store.setting("jwt_secret").map_err(|e| e.to_string())? {
        Some(hexed) => hex::decode(hexed).map_err(|e| format!("stored jwt_secret is corrupt: {e}")),
        None => {
            let secret = auth::random_bytes::<32>().to_vec();
            store
                .set_setting("jwt_secret", &hex::encode(&secret))
                .map_err(|e| e.to_string())?;
            Ok(secret)
        }
    }
}

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
    let store = open_store(&config)?;
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
        jwt_secret(&store, &config)?,
        config.jwt_ttl,
        jwt_generation(&store)?,
    );
    let listener = TcpListener::bind(&config.addr)
        .map_err(|e| format!("cannot listen on {}: {e}", config.addr))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let hub = Hub::new(store.clone(), Arc::new(Metrics::default()));
    let socket_dir = private_dir()?;
    let app = Arc::new(App {
        token_failures: FailureLimiter::new(config.max_auth_failures, Duration::from_secs(60)),
        config,
        store,
        hub,
        keys,
        logins: FailureLimiter::for_logins(),
        shutting_down: AtomicBool::new(false),
        slots: Default::default(),
        bridge: Bridge::new(socket_dir.clone()),
    });
    app.bridge
        .start(&app)
        .map_err(|e| format!("cannot start the HTTP layer: {e}"))?;
    {
        let app = app.clone();
        std::thread::Builder::new()
            .name("accept".into())
            .spawn(move || crate::accept::accept_loop(app, listener))
            .map_err(|e| e.to_string())?;
    }
    log_info!(
        "echocenter listening on {local} ({} mode, database {})",
        if app.production() {
            "production"
        } else {
            "development"
        },
        app.store.path().display()
    );
    // Tests and scripts wait for this exact line on stdout.
    println!("listening on {local}");
    let _ = io::stdout().flush();

    wait_for_signal(signals);
    shutdown(&app, local);
    let _ = std::fs::remove_dir_all(&socket_dir);
    Ok(())
}

/// The JWT key generation: 0 until the first `/api/dev/mock/reset`, one more after each.
pub fn jwt_generation(store: &Store) -> Result<u64, String> {
    match store.setting("jwt_generation").map_err(|e| e.to_string())? {
        None => Ok(0),
        Some(v) => v
            .parse()
            .map_err(|_| format!("stored jwt_generation is corrupt: {v:?}")),
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

fn shutdown(app: &Arc<App>, local: SocketAddr) {
    app.shutting_down.store(true, Relaxed);
    // Wake the accept loop so it sees the flag.
    let wake = if local.ip().is_unspecified() {
        SocketAddr::new(IpAddr::from([127, 0, 0, 1]), local.port())
    } else {
        local
    };
    let _ = TcpStream::connect_timeout(&wake, Duration::from_millis(200));
    app.hub.close_all(1001, "server shutdown");
    let deadline = Instant::now() + Duration::from_secs(5);
    while app.hub.connection_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Every frame that was acknowledged is already committed; this commits the rest
    // (delivery marks, last-seen times).
    app.store.flush();
    app.bridge.stop();
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
