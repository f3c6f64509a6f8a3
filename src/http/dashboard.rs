//! The embedded dashboard, served from `/`.
//!
//! The page is one file with one inline script and one inline style. Its Content-Security-
//! Policy admits exactly those (by their SHA-256, computed once from the page itself) and
//! nothing else: no other script can run even if agent text were ever rendered as HTML, and
//! no other site may frame the page (clickjacking the Approve button).

use std::sync::OnceLock;

use base64::Engine;
use sha2::{Digest, Sha256};

use super::Reply;

const INDEX_HTML: &str = include_str!("../dashboard/index.html");

pub fn page() -> Reply {
    Reply::html(INDEX_HTML)
        .with_header("Content-Security-Policy", csp().to_string())
        .with_header("X-Frame-Options", "DENY".into())
        .with_header("Referrer-Policy", "no-referrer".into())
        .with_header("Cache-Control", "no-store".into())
}

fn csp() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        let script = inline_hashes(INDEX_HTML, "script");
        let style = inline_hashes(INDEX_HTML, "style");
        format!(
            "default-src 'none'; script-src {script}; style-src {style}; connect-src 'self'; \
             img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
    })
}

/// `'sha256-…'` sources for every inline `<tag>…</tag>` element of the page.
fn inline_hashes(html: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut sources = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find(&open) {
        let body = &rest[start + open.len()..];
        let Some(end) = body.find(&close) else { break };
        let digest = Sha256::digest(&body.as_bytes()[..end]);
        sources.push(format!(
            "'sha256-{}'",
            base64::engine::general_purpose::STANDARD.encode(digest)
        ));
        rest = &body[end + close.len()..];
    }
    if sources.is_empty() {
        "'none'".to_string()
    } else {
        sources.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_names_the_page_s_one_script_and_one_style() {
        let policy = csp();
        assert_eq!(policy.matches("'sha256-").count(), 2, "{policy}");
        assert!(policy.contains("frame-ancestors 'none'"));
        assert!(!policy.contains("unsafe-inline"));
    }
}
