//! Where the data lives: a SQLite file (the default) or a PostgreSQL database.
//!
//! `--db` / `ECHOCENTER_DB` take a file path or a `postgres://` / `postgresql://` URL; the
//! original server's `DB_DRIVER=postgres` with `DB_DSN`, or with `PG_HOST`, `PG_PORT`,
//! `PG_USER`, `PG_PASSWORD`, `PG_DATABASE` and `PG_SSLMODE`, work too. Anything else that looks
//! like a URL (`mysql://…`, `sqlite://…`) is refused: it used to become a SQLite file under a
//! directory named `mysql:`, which is never what the operator meant.
//!
//! The connection string holds the password, so it is a type whose `Debug` and `Display` show
//! it without (`postgres://app@db.internal:5432/echocenter`): no log line, describe() or panic
//! message can leak it.

use std::fmt;
use std::path::PathBuf;

use super::ConfigError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Database {
    Sqlite(PathBuf),
    Postgres(PostgresDsn),
}

impl fmt::Display for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Database::Sqlite(path) => write!(f, "{}", path.display()),
            Database::Postgres(dsn) => write!(f, "{dsn}"),
        }
    }
}

/// TLS towards PostgreSQL, as libpq's `sslmode` names it. This build has no TLS client, so
/// only the modes that may connect without TLS are accepted (see `parse_sslmode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
}

/// A PostgreSQL connection string (URL or `key=value` form), without its `sslmode` (which is
/// ours to apply).
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresDsn {
    /// Holds the password: handed only to the database driver.
    dsn: String,
    /// The same without the password, for logs.
    shown: String,
    pub sslmode: SslMode,
}

impl PostgresDsn {
    /// The connection string itself, password included: for the database driver only.
    pub fn expose(&self) -> &str {
        &self.dsn
    }

    /// The connection string without its password.
    pub fn redacted(&self) -> &str {
        &self.shown
    }
}

impl fmt::Debug for PostgresDsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PostgresDsn({:?}, sslmode {:?})",
            self.shown, self.sslmode
        )
    }
}

impl fmt::Display for PostgresDsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// A `--db` / `ECHOCENTER_DB` / `DB_PATH` value: a PostgreSQL URL, or a file path.
pub fn from_db_value(source: &str, value: &str) -> Result<Database, ConfigError> {
    match url_scheme(value) {
        None => Ok(Database::Sqlite(PathBuf::from(value))),
        Some(s) if s.eq_ignore_ascii_case("postgres") || s.eq_ignore_ascii_case("postgresql") => {
            parse_dsn(source, value).map(Database::Postgres)
        }
        Some(s) => Err(ConfigError {
            source: source.to_string(),
            message: format!(
                "unsupported database URL scheme {s:?}: use a SQLite file path (such as \
                 ./echocenter.db) or a postgres:// URL"
            ),
        }),
    }
}

/// The scheme of a value shaped like `scheme://…` (RFC 3986 scheme characters).
fn url_scheme(value: &str) -> Option<&str> {
    let (scheme, _) = value.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some(scheme)
}

/// A connection string in either of libpq's forms: `postgres://user:pass@host:port/db?k=v`
/// or `host=… port=… user=… password=… dbname=… sslmode=…`.
pub fn parse_dsn(source: &str, value: &str) -> Result<PostgresDsn, ConfigError> {
    let value = value.trim();
    if url_scheme(value).is_some() {
        parse_url(source, value)
    } else {
        parse_key_values(source, value)
    }
}

fn parse_url(source: &str, value: &str) -> Result<PostgresDsn, ConfigError> {
    let (scheme, rest) = value.split_once("://").unwrap_or(("postgres", value));
    let (head, query) = match rest.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (rest, None),
    };
    // Everything before the last '@' is user information, so a password holding '/' or '@'
    // is never mistaken for the host (and never shown).
    let (user, hosts_and_db) = match head.rfind('@') {
        Some(at) => (
            Some(head[..at].split(':').next().unwrap_or_default()),
            &head[at + 1..],
        ),
        None => (None, head),
    };
    let mut sslmode = SslMode::Prefer;
    let mut kept = Vec::new();
    let mut shown = Vec::new();
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "sslmode" => sslmode = parse_sslmode(source, v)?,
            "password" => {
                kept.push(pair);
                shown.push("password=redacted");
            }
            _ => {
                kept.push(pair);
                shown.push(pair);
            }
        }
    }
    let join = |parts: &[&str]| {
        if parts.is_empty() {
            String::new()
        } else {
            format!("?{}", parts.join("&"))
        }
    };
    let user_part = |u: Option<&str>| u.map(|u| format!("{u}@")).unwrap_or_default();
    let credentials = match head.rfind('@') {
        Some(at) => format!("{}@", &head[..at]),
        None => String::new(),
    };
    Ok(PostgresDsn {
        dsn: format!("{scheme}://{credentials}{hosts_and_db}{}", join(&kept)),
        shown: format!(
            "{scheme}://{}{hosts_and_db}{}",
            user_part(user),
            join(&shown)
        ),
        sslmode,
    })
}

/// libpq's `key=value` form; values may be single-quoted, with `\'` and `\\` inside.
fn parse_key_values(source: &str, value: &str) -> Result<PostgresDsn, ConfigError> {
    let bad = |why: &str| ConfigError {
        source: source.to_string(),
        message: format!(
            "{why}: expected a postgres:// URL or key=value pairs such as \
             \"host=localhost dbname=echocenter user=echocenter\""
        ),
    };
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut chars = value.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') || key.is_empty() {
            return Err(bad("not a connection string"));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut val = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => val.push(chars.next().ok_or_else(|| bad("unfinished quote"))?),
                    Some('\'') => break,
                    Some(c) => val.push(c),
                    None => return Err(bad("unfinished quote")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                val.push(c);
            }
        }
        pairs.push((key, val));
    }
    if pairs.is_empty() {
        return Err(bad("empty"));
    }
    let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut sslmode = SslMode::Prefer;
    let mut kept = Vec::new();
    let mut shown = Vec::new();
    for (k, v) in &pairs {
        match k.as_str() {
            "sslmode" => sslmode = parse_sslmode(source, v)?,
            "password" => kept.push(format!("password={}", quote(v))),
            _ => {
                kept.push(format!("{k}={}", quote(v)));
                shown.push(format!("{k}={v}"));
            }
        }
    }
    Ok(PostgresDsn {
        dsn: kept.join(" "),
        shown: shown.join(" "),
        sslmode,
    })
}

/// libpq's modes. Those that need TLS are refused here, at start-up, rather than connecting
/// in the clear when the operator asked for encryption: this build has no TLS client (a
/// rustls-based one would have to build into the static binary; see README "PostgreSQL").
pub fn parse_sslmode(source: &str, value: &str) -> Result<SslMode, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "disable" => Ok(SslMode::Disable),
        "allow" => Ok(SslMode::Allow),
        "prefer" => Ok(SslMode::Prefer),
        mode @ ("require" | "verify-ca" | "verify-full") => Err(ConfigError {
            source: source.to_string(),
            message: format!(
                "sslmode={mode} needs TLS, which this build of echocenter does not have: \
                 connect over a trusted network or a local socket with sslmode=disable, or \
                 through a TLS tunnel (stunnel, ssh -L) that ends on this host"
            ),
        }),
        other => Err(ConfigError {
            source: source.to_string(),
            message: format!("expected an sslmode of disable, allow or prefer, got {other:?}"),
        }),
    }
}

/// The original server's `PG_*` variables, as one URL (its defaults: localhost, 5432,
/// postgres, no password, echocenter, disable). `env` returns a set, non-empty variable.
pub fn from_pg_variables(env: &dyn Fn(&str) -> Option<String>) -> Result<PostgresDsn, ConfigError> {
    let host = env("PG_HOST").unwrap_or_else(|| "localhost".into());
    let port = env("PG_PORT").unwrap_or_else(|| "5432".into());
    if port.trim().parse::<u16>().is_err() {
        return Err(ConfigError {
            source: "PG_PORT".into(),
            message: format!("expected a port number, got {port:?}"),
        });
    }
    let user = env("PG_USER").unwrap_or_else(|| "postgres".into());
    let database = env("PG_DATABASE").unwrap_or_else(|| "echocenter".into());
    let sslmode = env("PG_SSLMODE").unwrap_or_else(|| "disable".into());
    let sslmode = parse_sslmode("PG_SSLMODE", &sslmode)?;
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host
    };
    let credentials = match env("PG_PASSWORD") {
        Some(p) => format!("{}:{}@", percent_encode(&user), percent_encode(&p)),
        None => format!("{}@", percent_encode(&user)),
    };
    let tail = format!("{host}:{}/{}", port.trim(), percent_encode(&database));
    Ok(PostgresDsn {
        dsn: format!("postgres://{credentials}{tail}"),
        shown: format!("postgres://{}@{tail}", percent_encode(&user)),
        sslmode,
    })
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(value: &str) -> PostgresDsn {
        match from_db_value("--db", value).unwrap() {
            Database::Postgres(d) => d,
            other => panic!("{value}: {other:?}"),
        }
    }

    #[test]
    fn urls_pick_postgres_and_paths_pick_sqlite() {
        assert_eq!(
            from_db_value("--db", "./data/x.db").unwrap(),
            Database::Sqlite(PathBuf::from("./data/x.db"))
        );
        assert_eq!(
            from_db_value("--db", "/var/lib/echocenter/echocenter.db").unwrap(),
            Database::Sqlite(PathBuf::from("/var/lib/echocenter/echocenter.db"))
        );
        let d = pg("postgres://app:s3cret@db.internal:5433/echo");
        assert_eq!(d.expose(), "postgres://app:s3cret@db.internal:5433/echo");
        assert_eq!(d.redacted(), "postgres://app@db.internal:5433/echo");
        assert_eq!(d.sslmode, SslMode::Prefer);
        let d = pg("postgresql://localhost/echo");
        assert_eq!(d.expose(), "postgresql://localhost/echo");
        assert_eq!(d.redacted(), "postgresql://localhost/echo");
    }

    #[test]
    fn unsupported_urls_are_refused_naming_their_source() {
        for value in [
            "mysql://u:p@h/db",
            "sqlite://./x.db",
            "file://x.db",
            "http://h",
        ] {
            let e = from_db_value("ECHOCENTER_DB", value).unwrap_err();
            assert_eq!(e.source, "ECHOCENTER_DB", "{value}");
            assert!(e.message.contains("unsupported"), "{value}: {}", e.message);
            assert!(!e.message.contains(":p@"), "{}", e.message);
        }
    }

    #[test]
    fn the_password_never_shows() {
        for value in [
            "postgres://app:s3cret@h/db",
            "postgres://app:s3/cr@et@h:5432/db?application_name=x",
            "postgres://app@h/db?password=s3cret",
            "postgres://app:s3cret@h/db?sslmode=disable",
        ] {
            let d = pg(value);
            for shown in [d.redacted().to_string(), format!("{d}"), format!("{d:?}")] {
                assert!(!shown.contains("s3"), "{value} shows {shown}");
            }
            assert!(d.expose().contains("s3"), "{value}: {}", d.expose());
        }
        let d = parse_dsn("DB_DSN", "host=h user=app password='s3 cret' dbname=db").unwrap();
        assert_eq!(d.redacted(), "host=h user=app dbname=db");
        assert_eq!(
            d.expose(),
            "host='h' user='app' password='s3 cret' dbname='db'"
        );
    }

    #[test]
    fn sslmode_is_ours_and_tls_modes_are_refused() {
        let d = pg("postgres://h/db?sslmode=disable&connect_timeout=5");
        assert_eq!(d.sslmode, SslMode::Disable);
        assert_eq!(d.expose(), "postgres://h/db?connect_timeout=5");
        assert_eq!(pg("postgres://h/db?sslmode=allow").sslmode, SslMode::Allow);
        for mode in ["require", "verify-ca", "verify-full"] {
            let e = from_db_value("--db", &format!("postgres://h/db?sslmode={mode}")).unwrap_err();
            assert!(e.message.contains("TLS"), "{mode}: {}", e.message);
            let e = parse_dsn("DB_DSN", &format!("host=h sslmode={mode}")).unwrap_err();
            assert_eq!(e.source, "DB_DSN");
        }
        assert!(from_db_value("--db", "postgres://h/db?sslmode=sometimes").is_err());
    }

    #[test]
    fn pg_variables_build_the_originals_url() {
        let vars = [
            ("PG_HOST", "127.0.0.1"),
            ("PG_PORT", "5433"),
            ("PG_USER", "demo"),
            ("PG_PASSWORD", "secret"),
            ("PG_DATABASE", "echocenter_dev"),
        ];
        let env = |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        let d = from_pg_variables(&env).unwrap();
        // The original's TestLoadBuildsPostgresDSNFromPGEnv, less the sslmode we apply.
        assert_eq!(
            d.expose(),
            "postgres://demo:secret@127.0.0.1:5433/echocenter_dev"
        );
        assert_eq!(
            d.redacted(),
            "postgres://demo@127.0.0.1:5433/echocenter_dev"
        );
        assert_eq!(d.sslmode, SslMode::Disable);
        let none = |_: &str| None;
        let d = from_pg_variables(&none).unwrap();
        assert_eq!(d.expose(), "postgres://postgres@localhost:5432/echocenter");
        let odd = |k: &str| (k == "PG_PASSWORD").then(|| "p@ss/word".to_string());
        assert_eq!(
            from_pg_variables(&odd).unwrap().expose(),
            "postgres://postgres:p%40ss%2Fword@localhost:5432/echocenter"
        );
        let bad_port = |k: &str| (k == "PG_PORT").then(|| "pg".to_string());
        assert_eq!(from_pg_variables(&bad_port).unwrap_err().source, "PG_PORT");
        let tls = |k: &str| (k == "PG_SSLMODE").then(|| "require".to_string());
        assert_eq!(from_pg_variables(&tls).unwrap_err().source, "PG_SSLMODE");
    }
}
