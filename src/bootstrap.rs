//! First run and every run: opening the database, creating the admin and the Butler on an
//! empty one (SPEC section 1, "Bootstrap"), and the JWT signing key.

use crate::auth;
use crate::config::{Config, Environment};
use crate::log_info;
use crate::store::Store;

/// Opens (and migrates) the database, and enforces the production rule that no raw token
/// copies are kept. Shared by `serve` and the command-line subcommands.
pub fn open_store(config: &Config) -> Result<Store, String> {
    let store = Store::open(&config.db, config.sync)
        .map_err(|e| format!("cannot open database {}: {e}", config.db))?;
    if config.env == Environment::Production {
        let cleared = store.clear_raw_tokens().map_err(|e| e.to_string())?;
        if cleared > 0 {
            log_info!("production: cleared {cleared} raw token copies from the database");
        }
    }
    Ok(store)
}

/// Runs bootstrap on an empty database, then refuses a production start whose admin still
/// has the development password.
pub fn first_run(store: &Store, config: &Config) -> Result<(), String> {
    bootstrap(store, config)?;
    if config.env == Environment::Production {
        refuse_development_password(store)?;
    }
    Ok(())
}

/// The password a development database's admin is created with.
pub const DEVELOPMENT_PASSWORD: &str = "admin123";

fn refuse_development_password(store: &Store) -> Result<(), String> {
    let admins = store.admin_password_hashes().map_err(|e| e.to_string())?;
    for (username, hash) in admins {
        if auth::verify_password(DEVELOPMENT_PASSWORD, &hash) {
            return Err(format!(
                "refusing to start in production: admin {username:?} still has the development \
                 password {DEVELOPMENT_PASSWORD:?}. Set a real one (at least {} characters) first, \
                 with the server stopped or running: \
                 echo 'a-long-new-password' | echocenter user passwd {username} --db <this database>",
                auth::min_password_length(true)
            ));
        }
    }
    Ok(())
}

/// Creates the admin (id 1) and the Butler (id 2) on an empty database.
pub fn bootstrap(store: &Store, config: &Config) -> Result<(), String> {
    let empty = store.user_count().map_err(|e| e.to_string())? == 0;
    if !empty {
        return Ok(());
    }
    let admin = config.admin_user.clone().unwrap_or_else(|| "admin".into());
    let production = config.env == Environment::Production;
    let password = match (&config.admin_password, config.env) {
        (Some(p), _) => {
            if let Some(problem) = auth::password_problem(p, production) {
                return Err(format!(
                    "the configured admin password is refused: {problem}"
                ));
            }
            p.clone()
        }
        (None, Environment::Development) => {
            crate::log_warn!("bootstrap: created admin {admin:?} with the development password \"{DEVELOPMENT_PASSWORD}\"; set ECHOCENTER_ADMIN_PASSWORD for anything real");
            DEVELOPMENT_PASSWORD.into()
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
    store
        .bootstrap(
            &admin,
            &auth::hash_password(&password),
            &auth::generate_token(),
            keep_raw,
        )
        .map_err(|e| format!("bootstrap failed: {e}"))?;
    Ok(())
}

/// The retention rules of the configuration.
pub fn retention(config: &Config) -> crate::store::Retention {
    crate::store::Retention {
        logs_for: config.retain_logs,
        chat_for: config.retain_chat,
        max_log_rows_per_agent: config.max_log_rows_per_agent,
        max_log_bytes_per_agent: config.max_log_bytes_per_agent,
    }
}

pub fn jwt_secret(store: &Store, config: &Config) -> Result<Vec<u8>, String> {
    if let Some(s) = &config.jwt_secret {
        return Ok(s.clone());
    }
    match store.setting("jwt_secret").map_err(|e| e.to_string())? {
        Some(hexed) => hex::decode(hexed).map_err(|e| format!("stored jwt_secret is corrupt: {e}")),
        None => {
            // Stored only if no other process (another node starting on the same database)
            // stored one first; every process then signs with the one stored.
            let candidate = hex::encode(auth::random_bytes::<32>());
            let stored = store
                .setting_or_init("jwt_secret", &candidate)
                .map_err(|e| e.to_string())?;
            hex::decode(stored).map_err(|e| format!("stored jwt_secret is corrupt: {e}"))
        }
    }
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
