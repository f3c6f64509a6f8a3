//! `App`: everything a request or connection handler needs, built once at start-up.

use std::net::IpAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::auth::{self, AuthFailure, FailureLimiter, JwtKeys};
use crate::config::{Config, Environment};
use crate::hub::Hub;
use crate::identity::{AgentToken, Principal};
use crate::store::Store;

/// Stack of every per-connection thread. Only touched pages count towards memory.
pub const THREAD_STACK: usize = 256 * 1024;

pub struct App {
    pub config: Config,
    pub store: Store,
    pub hub: Arc<Hub>,
    pub keys: JwtKeys,
    /// Failed logins per client address (SPEC: 10 in 5 minutes).
    pub logins: FailureLimiter,
    /// Failed token authentications per client address (`--max-auth-failures` a minute).
    pub token_failures: FailureLimiter,
    pub shutting_down: AtomicBool,
}

impl App {
    /// A browser's `Origin` is allowed when it is this server itself or explicitly listed.
    pub fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        if let Some(host) = host {
            if origin == format!("http://{host}") || origin == format!("https://{host}") {
                return true;
            }
        }
        self.config.allowed_origins.iter().any(|o| o == origin)
    }

    pub fn production(&self) -> bool {
        self.config.env == Environment::Production
    }

    /// Resolves a JWT or an agent token to the live user behind it. The role always comes
    /// from the database, never from the JWT's claim.
    pub fn authenticate(&self, token: &str) -> Result<Principal, AuthFailure> {
        if auth::looks_like_jwt(token) {
            if let Ok(claims) = self.keys.verify(token, crate::clock::now_secs()) {
                let user = self
                    .store
                    .user_by_id(claims.user_id)
                    .map_err(|_| AuthFailure::Unavailable)?;
                // Deleted, disabled, or a session of an older generation (the password
                // changed since): the JWT no longer counts.
                return match user {
                    Some(u)
                        if !u.deleted
                            && !u.disabled
                            && u.role.is_human()
                            && u.session_gen == claims.gen =>
                    {
                        Ok(Principal {
                            id: u.id,
                            username: u.username,
                            role: u.role,
                            token_hash: None,
                            expires_at: Some(claims.exp),
                            session_gen: u.session_gen,
                        })
                    }
                    _ => Err(AuthFailure::Invalid),
                };
            }
        }
        let hash = AgentToken::new(token).sha256();
        match self
            .store
            .machine_by_token_hash(&hash)
            .map_err(|_| AuthFailure::Unavailable)?
        {
            Some(u) => Ok(Principal {
                id: u.id,
                username: u.username,
                role: u.role,
                token_hash: Some(hash),
                expires_at: None,
                session_gen: 0,
            }),
            None => Err(AuthFailure::Invalid),
        }
    }

    /// Whether `ip` is one of `--trusted-proxies` (by default: this machine).
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.config.trusted_proxies.iter().any(|n| n.contains(ip))
    }
}
