//! The embedded dashboard, served from `/`.

use crate::http::Reply;

const INDEX_HTML: &str = include_str!("dashboard/index.html");

pub fn page() -> Reply {
    Reply::html(INDEX_HTML)
}
