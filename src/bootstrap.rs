//! First run and every run: opening the database, creating the admin and the Butler on an
//! empty one (SPEC section 1, "Bootstrap"), and the JWT signing key.

use crate::auth;
use crate::config::{Config, Environment};
use crate::log_info;
use crate::store::Store;

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

pub fn jwt_secret(store: &Store, config: &Config) -> Result<Vec<u8>, String> {
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

/// The JWT key generation: 0 until the first `/api/dev/mock/reset`, one more after each.
pub fn jwt_generation(store: &Store) -> Result<u64, String> {
    match store.setting("jwt_generation").map_err(|e| e.to_string())? {
        None => Ok(0),
        Some(v) => v
            .parse()
            .map_err(|_| format!("stored jwt_generation is corrupt: {v:?}")),
    }
}
