//! Credentials: password hashing, agent tokens, HS256 JWTs, and `Authorization` parsing.
//!
//! Nothing here touches the database; `App::authenticate` combines these checks with store
//! lookups (a JWT is only half of the answer: the user must still exist with that role).

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::identity::{AgentToken, Role};
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

pub const ISSUER: &str = "echocenter";

/// 1–64 characters from `A–Z a–z 0–9 - _ .`.
pub fn valid_username(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The shortest password accepted: 12 characters in production, 8 in development (where the
/// bootstrap password `admin123` must still work).
pub fn min_password_length(production: bool) -> usize {
    if production {
        12
    } else {
        8
    }
}

/// Why a new password is refused, if it is (length in characters; at most 1024 bytes, so a
/// hash is never asked to chew on a megabyte).
pub fn password_problem(password: &str, production: bool) -> Option<String> {
    let min = min_password_length(production);
    if password.chars().count() < min {
        Some(format!("password must be at least {min} characters"))
    } else if password.len() > 1024 {
        Some("password must be at most 1024 bytes".to_string())
    } else {
        None
    }
}

/// A caller-supplied token: 16–256 characters that need no escaping in a URL or header.
pub fn valid_supplied_token(token: &str) -> bool {
    (16..=256).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
}

/// `ec_` + 64 hex characters from 32 random bytes.
pub fn generate_token() -> AgentToken {
    AgentToken::new(format!("ec_{}", hex::encode(random_bytes::<32>())))
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    // The OS random source failing means the machine cannot produce secrets at all.
    getrandom::fill(&mut buf).expect("operating system random source unavailable");
    buf
}

pub fn hash_password(password: &str) -> String {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let job = PasswordJob::Hash(password.to_string(), tx);
    on_password_thread(job);
    // The password thread answers every job it takes, and it never exits.
    rx.recv().expect("password thread answers")
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    let (tx, rx) = crossbeam_channel::bounded(1);
    on_password_thread(PasswordJob::Verify(
        password.to_string(),
        hash.to_string(),
        tx,
    ));
    rx.recv().unwrap_or(false)
}

/// Verifications queued or running on the password thread.
static VERIFYING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// At most this many: a caller waits for its verification, and callers are HTTP workers, so
/// a flood of logins must not tie up more than this many of them (the rest keep serving).
const MAX_VERIFYING: usize = 4;

/// The password thread has `MAX_VERIFYING` verifications to do already: try again shortly.
#[derive(Debug, PartialEq, Eq)]
pub struct PasswordsBusy;

/// `verify_password`, or `PasswordsBusy` at once when the password thread is full.
pub fn verify_password_if_free(password: &str, hash: &str) -> Result<bool, PasswordsBusy> {
    use std::sync::atomic::Ordering::SeqCst;
    if VERIFYING.fetch_add(1, SeqCst) >= MAX_VERIFYING {
        VERIFYING.fetch_sub(1, SeqCst);
        return Err(PasswordsBusy);
    }
    let ok = verify_password(password, hash);
    VERIFYING.fetch_sub(1, SeqCst);
    Ok(ok)
}

enum PasswordJob {
    Hash(String, crossbeam_channel::Sender<String>),
    Verify(String, String, crossbeam_channel::Sender<bool>),
}

/// Every argon2 computation runs on one thread. argon2id takes 19 MiB of working memory per
/// hash, and glibc keeps a freed buffer of that size in the arena of the thread that used it:
/// hashing on whichever HTTP worker got the login left hundreds of MiB resident after a few
/// logins (measured). One thread means one such buffer. It also bounds the CPU that password
/// guessing can take to one core.
fn on_password_thread(job: PasswordJob) {
    static JOBS: std::sync::OnceLock<crossbeam_channel::Sender<PasswordJob>> =
        std::sync::OnceLock::new();
    let jobs = JOBS.get_or_init(|| {
        let (tx, rx) = crossbeam_channel::unbounded::<PasswordJob>();
        std::thread::Builder::new()
            .name("passwords".into())
            .spawn(move || {
                for job in rx {
                    match job {
                        PasswordJob::Hash(password, reply) => {
                            let _ = reply.send(hash_now(&password));
                        }
                        PasswordJob::Verify(password, hash, reply) => {
                            let _ = reply.send(verify_now(&password, &hash));
                        }
                    }
                }
            })
            .expect("cannot start the password thread");
        tx
    });
    let _ = jobs.send(job);
}

fn hash_now(password: &str) -> String {
    // 16 random bytes always encode to a valid salt.
    let salt = SaltString::encode_b64(&random_bytes::<16>()).expect("16-byte salt is valid");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        // Only fails for out-of-range parameters, and the defaults are in range.
        .expect("argon2 default parameters are valid")
        .to_string()
}

fn verify_now(password: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// The hash an unknown user's login is checked against, so that it takes as long.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("echocenter-dummy-password"))
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub user_id: i64,
    pub role: String,
    pub exp: i64,
    pub iat: i64,
    pub iss: String,
    /// The account's session generation when the JWT was issued (absent in JWTs of older
    /// builds: 0). A password change, disabling or a role change moves it on.
    #[serde(default)]
    pub gen: i64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum JwtError {
    Malformed,
    Algorithm,
    Signature,
    Expired,
    Issuer,
}

/// The JWT signing key. It is derived from the secret (configured, or generated and kept in
/// the database) and a generation number that `/api/dev/mock/reset` increments: a reset
/// restarts user ids, so a JWT issued before it would otherwise name whichever new user got
/// its id. Generation 0 signs with the secret itself, as before generations existed.
pub struct JwtKeys {
    secret: Vec<u8>,
    key: RwLock<Vec<u8>>,
    ttl_secs: i64,
}

impl JwtKeys {
    pub fn new(secret: Vec<u8>, ttl: Duration, generation: u64) -> JwtKeys {
        JwtKeys {
            key: RwLock::new(derive_key(&secret, generation)),
            secret,
            ttl_secs: ttl.as_secs() as i64,
        }
    }

    /// Signs and verifies with the key of `generation` from now on.
    pub fn set_generation(&self, generation: u64) {
        *self.key.write().unwrap_or_else(|p| p.into_inner()) = derive_key(&self.secret, generation);
    }

    fn mac(&self) -> Hmac<Sha256> {
        let key = self.key.read().unwrap_or_else(|p| p.into_inner());
        // HMAC accepts keys of any length.
        Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length")
    }

    pub fn issue(&self, user_id: i64, role: Role, gen: i64, now_secs: i64) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let claims = Claims {
            user_id,
            role: role.as_str().to_string(),
            iat: now_secs,
            exp: now_secs + self.ttl_secs,
            iss: ISSUER.to_string(),
            gen,
        };
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("claims serialize"));
        let signing_input = format!("{header}.{body}");
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signing_input}.{sig}")
    }

    /// Verifies signature (constant time), algorithm (HS256 only), expiry and issuer.
    pub fn verify(&self, token: &str, now_secs: i64) -> Result<Claims, JwtError> {
        let mut parts = token.split('.');
        let (Some(h), Some(b), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        #[derive(Deserialize)]
        struct Header {
            alg: String,
        }
        let header: Header = URL_SAFE_NO_PAD
            .decode(h)
            .ok()
            .and_then(|raw| serde_json::from_slice(&raw).ok())
            .ok_or(JwtError::Malformed)?;
        if header.alg != "HS256" {
            return Err(JwtError::Algorithm);
        }
        let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| JwtError::Malformed)?;
        let mut mac = self.mac();
        mac.update(h.as_bytes());
        mac.update(b".");
        mac.update(b.as_bytes());
        mac.verify_slice(&sig).map_err(|_| JwtError::Signature)?;
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(b)
            .ok()
            .and_then(|raw| serde_json::from_slice(&raw).ok())
            .ok_or(JwtError::Malformed)?;
        if claims.exp <= now_secs {
            return Err(JwtError::Expired);
        }
        if claims.iss != ISSUER {
            return Err(JwtError::Issuer);
        }
        Ok(claims)
    }
}

fn derive_key(secret: &[u8], generation: u64) -> Vec<u8> {
    if generation == 0 {
        return secret.to_vec();
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(format!("echocenter jwt generation {generation}").as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// A token is a JWT when it has the three dot-separated parts; agent tokens never contain
/// two dots followed by base64 (generated ones have none), and supplied ones that look like a
/// JWT but fail verification are then tried as agent tokens too.
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && token.starts_with("eyJ")
}

/// Why a presented credential was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthFailure {
    /// Not a valid JWT of a live human, nor the token of a live machine.
    Invalid,
    /// The database could not be asked.
    Unavailable,
}

#[derive(Debug, PartialEq, Eq)]
pub enum BearerError {
    Missing,
    Malformed,
}

/// `Authorization: Bearer <token>`: scheme case-insensitive, exactly one space, one token.
pub fn parse_bearer(header: Option<&str>) -> Result<&str, BearerError> {
    let value = header.ok_or(BearerError::Missing)?;
    let mut parts = value.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(scheme), Some(token), None)
            if scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() =>
        {
            Ok(token)
        }
        _ => Err(BearerError::Malformed),
    }
}

/// The key per-address limits count under: an IPv4 address, or an IPv6 address's /64 (one
/// host usually has a whole /64, so counting single IPv6 addresses would limit nothing).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::V6(std::net::Ipv6Addr::from(o))
        }
        v4 => v4,
    }
}

/// Failures per client address (`address_key`) within a sliding window: after `max` of them,
/// every attempt from that address is refused until the oldest failure leaves the window.
/// Used for logins (10 in 5 minutes) and for token authentications (`--max-auth-failures` a
/// minute).
///
/// Memory is bounded without ever scanning: addresses live in two generations; a new
/// generation starts every window (or when the current one is full), the one before it is
/// dropped, and an address seen again is carried into the current one.
pub struct FailureLimiter {
    max: usize,
    window: Duration,
    failures: Mutex<Generations>,
}

struct Generations {
    current: HashMap<IpAddr, VecDeque<Instant>>,
    previous: HashMap<IpAddr, VecDeque<Instant>>,
    started: Instant,
}

/// An attempt taken from a `FailureLimiter` before the check it guards. It counts as a
/// failure from the moment it is taken, so parallel attempts cannot all slip under the limit
/// while their (slow) verifications run; `release` gives it back.
pub struct Attempt<'a> {
    limiter: &'a FailureLimiter,
    key: IpAddr,
    at: Instant,
}

impl FailureLimiter {
    /// Most addresses one generation holds.
    const GENERATION_SIZE: usize = 50_000;

    pub fn new(max: usize, window: Duration) -> FailureLimiter {
        FailureLimiter {
            max,
            window,
            failures: Mutex::new(Generations {
                current: HashMap::new(),
                previous: HashMap::new(),
                started: Instant::now(),
            }),
        }
    }

    /// The login rule of SPEC section 3: 10 failures in 5 minutes.
    pub fn for_logins() -> FailureLimiter {
        FailureLimiter::new(10, Duration::from_secs(300))
    }

    /// `Some(seconds to wait)` when the address is locked out.
    pub fn retry_after(&self, ip: IpAddr) -> Option<u64> {
        let mut g = self.lock();
        self.locked(self.entry(&mut g, address_key(ip)))
    }

    pub fn record_failure(&self, ip: IpAddr) {
        let mut g = self.lock();
        let list = self.entry(&mut g, address_key(ip));
        self.push(list, Instant::now());
    }

    /// Takes an attempt, or says how long to wait when the address is locked out.
    pub fn reserve(&self, ip: IpAddr) -> Result<Attempt<'_>, u64> {
        let key = address_key(ip);
        let mut g = self.lock();
        let list = self.entry(&mut g, key);
        if let Some(wait) = self.locked(list) {
            return Err(wait);
        }
        let at = Instant::now();
        self.push(list, at);
        Ok(Attempt {
            limiter: self,
            key,
            at,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The failures of `key`, in the current generation (starting a new one if due), with
    /// those older than the window dropped.
    fn entry<'g>(&self, g: &'g mut Generations, key: IpAddr) -> &'g mut VecDeque<Instant> {
        if g.started.elapsed() >= self.window || g.current.len() >= Self::GENERATION_SIZE {
            g.previous = std::mem::take(&mut g.current);
            g.started = Instant::now();
        }
        if !g.current.contains_key(&key) {
            let carried = g.previous.remove(&key).unwrap_or_default();
            g.current.insert(key, carried);
        }
        let list = g.current.get_mut(&key).expect("inserted above");
        while list.front().is_some_and(|t| t.elapsed() >= self.window) {
            list.pop_front();
        }
        list
    }

    fn locked(&self, list: &VecDeque<Instant>) -> Option<u64> {
        if list.len() < self.max {
            return None;
        }
        let oldest = *list.front()?;
        Some(
            self.window
                .saturating_sub(oldest.elapsed())
                .as_secs()
                .max(1),
        )
    }

    fn push(&self, list: &mut VecDeque<Instant>, at: Instant) {
        list.push_back(at);
        while list.len() > self.max {
            list.pop_front();
        }
    }
}

impl Attempt<'_> {
    /// The attempt did not fail (it passed, or never got to the check): it no longer counts.
    pub fn release(self) {
        let mut g = self.limiter.lock();
        let list = self.limiter.entry(&mut g, self.key);
        if let Some(i) = list.iter().position(|t| *t == self.at) {
            list.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> JwtKeys {
        JwtKeys::new(vec![7u8; 32], Duration::from_secs(3600), 0)
    }

    #[test]
    fn jwt_round_trip_and_rejections() {
        let k = keys();
        let t = k.issue(42, Role::Admin, 0, 1_000);
        let c = k.verify(&t, 1_001).unwrap();
        assert_eq!(
            (c.user_id, c.role.as_str(), c.iss.as_str()),
            (42, "ADMIN", "echocenter")
        );
        assert_eq!(k.verify(&t, 1_000 + 3600), Err(JwtError::Expired));
        let other = JwtKeys::new(vec![8u8; 32], Duration::from_secs(3600), 0);
        assert_eq!(other.verify(&t, 1_001), Err(JwtError::Signature));
        // A new generation (a data reset) invalidates every JWT issued before it.
        k.set_generation(1);
        assert_eq!(k.verify(&t, 1_001), Err(JwtError::Signature));
        let t1 = k.issue(42, Role::Admin, 3, 1_000);
        assert_eq!(k.verify(&t1, 1_001).unwrap().gen, 3);
        assert!(k.verify(&t1, 1_001).is_ok());
        let mut parts: Vec<&str> = t.split('.').collect();
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        parts[0] = &none_header;
        assert_eq!(k.verify(&parts.join("."), 1_001), Err(JwtError::Algorithm));
        assert_eq!(k.verify("abc", 1_001), Err(JwtError::Malformed));
    }

    #[test]
    fn token_shapes() {
        let t = generate_token();
        assert!(t.expose().starts_with("ec_") && t.expose().len() == 67);
        assert!(valid_supplied_token("mock-observer-token"));
        assert!(!valid_supplied_token("short"));
        assert!(!valid_supplied_token("has space in it ......"));
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(parse_bearer(Some("Bearer abc")), Ok("abc"));
        assert_eq!(parse_bearer(Some("bearer abc")), Ok("abc"));
        assert_eq!(parse_bearer(None), Err(BearerError::Missing));
        assert_eq!(parse_bearer(Some("Bearer")), Err(BearerError::Malformed));
        assert_eq!(parse_bearer(Some("Basic abc")), Err(BearerError::Malformed));
        assert_eq!(
            parse_bearer(Some("Bearer a b")),
            Err(BearerError::Malformed)
        );
        assert_eq!(
            parse_bearer(Some("Bearer  abc")),
            Err(BearerError::Malformed)
        );
    }

    #[test]
    fn a_reserved_attempt_counts_until_it_succeeds() {
        let l = FailureLimiter::new(3, Duration::from_secs(60));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = l.reserve(ip).unwrap();
        let b = l.reserve(ip).unwrap();
        let _c = l.reserve(ip).unwrap();
        // Three in flight: a fourth is refused before any of them finished.
        assert!(l.reserve(ip).is_err());
        a.release();
        let _d = l.reserve(ip).unwrap();
        assert!(l.retry_after(ip).is_some());
        b.release();
        assert!(l.retry_after(ip).is_none());
        // Other addresses are not affected.
        assert!(l.reserve("10.0.0.2".parse().unwrap()).is_ok());
    }

    #[test]
    fn ipv6_addresses_count_by_their_64() {
        let l = FailureLimiter::new(2, Duration::from_secs(60));
        l.record_failure("2001:db8:1:2::1".parse().unwrap());
        l.record_failure("2001:db8:1:2:ffff::9".parse().unwrap());
        assert!(l.retry_after("2001:db8:1:2::77".parse().unwrap()).is_some());
        assert!(l.retry_after("2001:db8:1:3::1".parse().unwrap()).is_none());
        assert_eq!(
            address_key("::ffff:10.1.2.3".parse().unwrap()),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn many_addresses_never_grow_the_limiter_without_bound() {
        let l = FailureLimiter::new(3, Duration::from_secs(600));
        for i in 0..200_000u32 {
            l.record_failure(IpAddr::from(i.to_be_bytes()));
        }
        let g = l.lock();
        assert!(g.current.len() + g.previous.len() <= 2 * FailureLimiter::GENERATION_SIZE);
    }

    #[test]
    fn passwords_verify() {
        let h = hash_password("s3cret");
        assert!(verify_password("s3cret", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("s3cret", "not-a-hash"));
    }

    #[test]
    fn usernames() {
        assert!(valid_username("Storage-Custodian"));
        assert!(valid_username("a.b_c"));
        assert!(!valid_username(""));
        assert!(!valid_username("white space"));
        assert!(!valid_username(&"x".repeat(65)));
    }
}
