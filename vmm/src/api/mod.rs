//! The control API: HTTP/1.1 over a Unix domain socket, modelled on
//! Firecracker's API server (same verbs and paths, JSON bodies), so that
//! `curl --unix-socket PATH` works as well as `vmm ctl`.
//!
//! | request | body | effect |
//! |---|---|---|
//! | `PATCH /balloon` | `{"amount_mib": N}` | set the balloon target |
//! | `GET /balloon` | | balloon target and actual size |
//! | `GET /balloon/statistics` | | the guest's last balloon statistics |
//! | `PATCH /vm` | `{"state": "Paused"}` or `{"state": "Resumed"}` | pause / resume the vCPUs |
//! | `PUT /actions` | `{"action_type": "Shutdown"}` | stop the VM |
//! | `GET /` | | VM status |
//!
//! One request per connection or several (keep-alive); each response has
//! a `Content-Length`. Requests are bounded (64 KiB of headers and body);
//! anything malformed gets a `400` with a JSON `fault_message`, like
//! Firecracker's. The server thread never panics on input.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;

pub mod models;
pub mod request;
pub mod server;

pub use models::BalloonStats;

/// Largest request accepted (headers + body).
pub const MAX_REQUEST: usize = 64 << 10;

/// A parsed control request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Set the balloon target, bytes.
    BalloonSet(u64),
    /// Balloon configuration and size.
    BalloonGet,
    /// The guest's balloon statistics.
    BalloonStats,
    /// Pause the vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Stop the VM.
    Shutdown,
    /// VM status.
    Status,
}

/// What the VMM does with requests.
pub trait ApiHandler: Send + Sync {
    /// Carry out `req`; `Ok` bodies are returned with 200 (or 204 if null),
    /// `Err` messages with 400.
    fn handle(&self, req: Request) -> Result<Value, String>;
}

/// Errors of the API server and client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be created.
    #[error(
        "cannot listen on API socket {0}: {1}; remove a stale socket file or choose another path"
    )]
    Bind(PathBuf, std::io::Error),
    /// The client could not connect.
    #[error("cannot connect to API socket {0}: {1}; is `vmm run --api-sock {0}` running?")]
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

/// Turn method, path and body into a request.
pub fn parse(method: &str, path: &str, body: &[u8]) -> Result<Request, String> {
    let json = || -> Result<Value, String> {
        serde_json::from_slice(body).map_err(|e| format!("the body is not valid JSON: {e}"))
    };
    match (method, path.trim_end_matches('/')) {
        ("PATCH", "/balloon") | ("PUT", "/balloon") => {
            let v = json()?;
            let mib = v
                .get("amount_mib")
                .and_then(Value::as_u64)
                .ok_or("expected {\"amount_mib\": <non-negative integer>}")?;
            let bytes = mib.checked_mul(1 << 20).ok_or("amount_mib is too large")?;
            Ok(Request::BalloonSet(bytes))
        }
        ("GET", "/balloon") => Ok(Request::BalloonGet),
        ("GET", "/balloon/statistics") => Ok(Request::BalloonStats),
        ("PATCH", "/vm") => match json()?.get("state").and_then(Value::as_str) {
            Some("Paused") => Ok(Request::Pause),
            Some("Resumed") => Ok(Request::Resume),
            _ => Err("expected {\"state\": \"Paused\"} or {\"state\": \"Resumed\"}".into()),
        },
        ("PUT", "/actions") => match json()?.get("action_type").and_then(Value::as_str) {
            Some("Shutdown") | Some("SendCtrlAltDel") => Ok(Request::Shutdown),
            _ => Err("expected {\"action_type\": \"Shutdown\"}".into()),
        },
        ("GET", "") => Ok(Request::Status),
        (m, p) => Err(format!("no such API call: {m} {p}")),
    }
}

/// One parsed HTTP request: method, path, body. `None` at end of stream.
fn read_request(
    r: &mut BufReader<UnixStream>,
) -> Result<Option<(String, String, Vec<u8>)>, String> {
    let mut line = String::new();
    let mut total = 0usize;
    match r.by_ref().take(MAX_REQUEST as u64).read_line(&mut line) {
        Ok(0) => return Ok(None),
        Ok(n) => total += n,
        Err(e) => return Err(format!("reading the request failed: {e}")),
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path), Some(ver)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("malformed request line {:?}", line.trim_end()));
    };
    if !ver.starts_with("HTTP/1.") {
        return Err(format!("unsupported protocol {ver:?}: use HTTP/1.1"));
    }
    let (method, path) = (method.to_string(), path.to_string());
    let mut content_length = 0usize;
    loop {
        let mut h = String::new();
        let n = r
            .by_ref()
            .take((MAX_REQUEST - total.min(MAX_REQUEST)) as u64)
            .read_line(&mut h)
            .map_err(|e| format!("reading headers failed: {e}"))?;
        total += n;
        if n == 0 || total >= MAX_REQUEST {
            return Err("request headers too long or truncated".into());
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                content_length = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad Content-Length {:?}", v.trim()))?;
            }
        }
    }
    if content_length > MAX_REQUEST - total.min(MAX_REQUEST) {
        return Err(format!(
            "request body of {content_length} bytes is too large"
        ));
    }
    let mut body = vec![0u8; content_length];
    r.read_exact(&mut body)
        .map_err(|e| format!("reading the body failed: {e}"))?;
    Ok(Some((method, path, body)))
}

fn write_response(w: &mut UnixStream, status: u16, body: &Value) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        _ => "Bad Request",
    };
    let text = if status == 204 {
        String::new()
    } else {
        body.to_string()
    };
    write!(
        w,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    )?;
    w.flush()
}

fn serve_connection(stream: UnixStream, handler: &dyn ApiHandler) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut r = BufReader::new(stream);
    loop {
        let (status, body) = match read_request(&mut r) {
            Ok(None) => return,
            Ok(Some((m, p, b))) => match parse(&m, &p, &b).and_then(|req| handler.handle(req)) {
                Ok(Value::Null) => (204, Value::Null),
                Ok(v) => (200, v),
                Err(msg) => (400, json!({ "fault_message": msg })),
            },
            Err(msg) => {
                let _ = write_response(&mut out, 400, &json!({ "fault_message": msg }));
                return;
            }
        };
        if write_response(&mut out, status, &body).is_err() {
            return;
        }
    }
}

/// The API server of one VM; stops (and removes its socket) on drop.
pub struct ApiServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    /// Wakes the server thread out of its `poll` when it must stop.
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("path", &self.path)
            .finish()
    }
}

impl ApiServer {
    /// Listen on `path` and serve requests with `handler` on a thread.
    pub fn start(path: &Path, handler: Arc<dyn ApiHandler>) -> Result<ApiServer, ApiError> {
        let listener = UnixListener::bind(path).map_err(|e| ApiError::Bind(path.into(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| ApiError::Bind(path.into(), e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let wake =
            Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| ApiError::Bind(path.into(), e))?);
        let (s2, w2) = (stop.clone(), wake.clone());
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                while !s2.load(Ordering::Relaxed) {
                    // Sleep until a client connects or we are told to stop:
                    // requests are served at once, and stopping is immediate.
                    let mut fds = [
                        libc::pollfd {
                            fd: listener.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        },
                        libc::pollfd {
                            fd: w2.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        },
                    ];
                    // SAFETY: poll reads and writes the two pollfds we own,
                    // for the length we pass; both fds are open (owned by
                    // this closure and by the server).
                    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                    if n < 0 {
                        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                        {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        continue;
                    }
                    if fds[1].revents != 0 {
                        continue;
                    }
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let _ = stream.set_nonblocking(false);
                            serve_connection(stream, handler.as_ref());
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        // Out of fds or similar: do not spin.
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
            .map_err(|e| ApiError::Bind(path.into(), e))?;
        Ok(ApiServer {
            path: path.into(),
            stop,
            wake,
            thread: Some(thread),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // A failed write leaves the thread in poll until the next client;
        // the eventfd counter cannot overflow from one write.
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Send one request to the server at `path`; the JSON answer (`Null` for 204).
pub fn call(path: &Path, method: &str, uri: &str, body: Option<&Value>) -> Result<Value, ApiError> {
    let mut s = UnixStream::connect(path).map_err(|e| ApiError::Connect(path.into(), e))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let text = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {uri} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )?;
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
    let mut body = vec![0u8; len.min(MAX_REQUEST)];
    r.read_exact(&mut body)?;
    let v: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::Response(e.to_string()))?
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    struct Rec(Mutex<Vec<Request>>);
    impl ApiHandler for Rec {
        fn handle(&self, req: Request) -> Result<Value, String> {
            self.0.lock().unwrap().push(req.clone());
            match req {
                Request::Status => Ok(json!({"state": "Running"})),
                Request::BalloonSet(b) if b > (1 << 30) => Err("larger than guest RAM".into()),
                _ => Ok(Value::Null),
            }
        }
    }

    fn sock(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vmm-api-{name}-{}.sock", std::process::id()))
    }

    #[test]
    fn parses_firecracker_style_requests() {
        assert_eq!(
            parse("PATCH", "/balloon", br#"{"amount_mib": 512}"#),
            Ok(Request::BalloonSet(512 << 20))
        );
        assert_eq!(
            parse("GET", "/balloon/statistics", b""),
            Ok(Request::BalloonStats)
        );
        assert_eq!(
            parse("PATCH", "/vm", br#"{"state":"Paused"}"#),
            Ok(Request::Pause)
        );
        assert_eq!(
            parse("PATCH", "/vm", br#"{"state":"Resumed"}"#),
            Ok(Request::Resume)
        );
        assert_eq!(
            parse("PUT", "/actions", br#"{"action_type":"Shutdown"}"#),
            Ok(Request::Shutdown)
        );
        for (m, p, b) in [
            ("PATCH", "/balloon", &b"{"[..]),
            ("PATCH", "/balloon", br#"{"amount_mib": -1}"#),
            (
                "PATCH",
                "/balloon",
                br#"{"amount_mib": 18446744073709551615}"#,
            ),
            ("PATCH", "/vm", br#"{"state":"Sleeping"}"#),
            ("DELETE", "/balloon", b""),
        ] {
            assert!(parse(m, p, b).is_err(), "{m} {p}");
        }
    }

    #[test]
    fn serves_over_a_unix_socket_and_survives_garbage() {
        let path = sock("serve");
        let _ = std::fs::remove_file(&path);
        let rec = Arc::new(Rec(Mutex::new(Vec::new())));
        let server = ApiServer::start(&path, rec.clone()).unwrap();
        assert_eq!(
            call(&path, "GET", "/", None).unwrap(),
            json!({"state": "Running"})
        );
        assert_eq!(
            call(&path, "PATCH", "/balloon", Some(&json!({"amount_mib": 64}))).unwrap(),
            Value::Null
        );
        let e = call(
            &path,
            "PATCH",
            "/balloon",
            Some(&json!({"amount_mib": 4096})),
        )
        .unwrap_err();
        assert!(matches!(e, ApiError::Refused { status: 400, .. }), "{e}");
        // garbage, oversized headers: a 400 and the server keeps serving
        for junk in [&b"hello\r\n\r\n"[..], &vec![b'a'; MAX_REQUEST + 10][..]] {
            let mut s = UnixStream::connect(&path).unwrap();
            let _ = s.write_all(junk);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            assert!(out.starts_with("HTTP/1.1 400"), "{out:?}");
        }
        assert_eq!(call(&path, "GET", "/", None).unwrap()["state"], "Running");
        assert_eq!(rec.0.lock().unwrap()[1], Request::BalloonSet(64 << 20));
        drop(server);
        assert!(!path.exists(), "the socket file is removed on stop");
        assert!(matches!(
            call(&path, "GET", "/", None),
            Err(ApiError::Connect(..))
        ));
    }
}
