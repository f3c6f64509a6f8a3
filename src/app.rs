//! `App`: everything a request or connection handler needs, built once at start-up.

use std::net::IpAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::accept::Slots;
use crate::auth::{FailureLimiter, JwtKeys};
use crate::config::{Config, Environment};
use crate::http::bridge::Bridge;
use crate::hub::Hub;
use crate::store::Store;

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
    pub slots: Slots,
    pub bridge: Bridge,
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

    /// Whether `ip` is one of `--trusted-proxies` (by default: this machine).
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.config.trusted_proxies.iter().any(|n| n.contains(ip))
    }
}
