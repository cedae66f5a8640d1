//! The control API: Firecracker's HTTP API over a Unix domain socket (its
//! public OpenAPI file, `src/firecracker/swagger/firecracker.yaml`, is the
//! reference), so that Firecracker's clients, `curl --unix-socket PATH` and
//! `vmm ctl` all work.
//!
//! | module | what |
//! |---|---|
//! | [`models`] | the bodies, typed (serde; unknown fields refused) |
//! | [`request`] | method + path + body → [`request::Request`], and which calls are pre-/post-boot |
//! | [`server`] | the HTTP server (hyper, bounded, a task per connection) and the [`server::Handler`] trait |
//! | this file | [`call`], a small blocking client (`vmm ctl`, tests, benchmarks) |
//!
//! The service that answers the calls is [`crate::service`] (`vmm
//! --api-sock`); `vmm run --api-sock` answers the workload runner's subset.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

pub mod models;
pub mod request;
pub mod server;

pub use models::BalloonStats;

/// Largest answer body [`call`] reads.
pub const MAX_REQUEST: usize = 64 << 10;

/// Errors of the API client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The client could not connect.
    #[error("cannot connect to API socket {0}: {1}; is `vmm --api-sock {0}` running?")]
    Connect(PathBuf, std::io::Error),
    /// I/O on an open connection.
    #[error("API connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The server answered something that is not HTTP.
    #[error("malformed API response: {0}")]
    Response(String),
    /// The server refused the request.
    #[error("the VMM refused the request ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// `fault_message`.
        message: String,
    },
}

/// One HTTP/1.1 exchange over the Unix socket at `path`: `body`, if any,
/// is sent with its `Content-Length` (none at all without one); returns the
/// status and the body of the answer (at most [`MAX_REQUEST`] bytes).
pub fn exchange(
    path: &Path,
    method: &str,
    uri: &str,
    body: Option<&[u8]>,
) -> Result<(u16, Vec<u8>), ApiError> {
    let mut s = UnixStream::connect(path).map_err(|e| ApiError::Connect(path.into(), e))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {uri} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    let mut msg = req.into_bytes();
    msg.extend_from_slice(body.unwrap_or_default());
    s.write_all(&msg)?;
    let mut r = BufReader::new(s);
    let mut status_line = String::new();
    r.read_line(&mut status_line)?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .ok_or_else(|| ApiError::Response(status_line.trim_end().to_string()))?;
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut answer = vec![0u8; len.min(MAX_REQUEST)];
    r.read_exact(&mut answer)?;
    Ok((status, answer))
}

/// Send one JSON request to the server at `path`; the JSON answer (`Null`
/// for 204), or [`ApiError::Refused`] with the `fault_message` of a 4xx/5xx.
pub fn call(path: &Path, method: &str, uri: &str, body: Option<&Value>) -> Result<Value, ApiError> {
    let text = body.map(Value::to_string).unwrap_or_default();
    let (status, answer) = exchange(path, method, uri, Some(text.as_bytes()))?;
    let v: Value = if answer.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&answer).map_err(|e| ApiError::Response(e.to_string()))?
    };
    if status >= 400 {
        return Err(ApiError::Refused {
            status,
            message: v
                .get("fault_message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        });
    }
    Ok(v)
}
