//! The API server: HTTP/1.1 over a Unix domain socket, served by `hyper`
//! on one thread with a single-threaded `tokio` runtime.
//!
//! Why hyper: it is the maintained HTTP implementation of the Rust
//! ecosystem, bounds what it buffers (`max_buf_size`) and the time a client
//! may take to send its headers (`header_read_timeout`), and serves each
//! connection as its own task, so an idle or slow client holds nothing that
//! another client, the VM or shutdown waits for. (Firecracker's
//! `micro_http` is not published on crates.io; `tiny_http` reads header
//! lines without a bound and without a timeout.)
//!
//! Invariants:
//! - a request is bounded: headers [`MAX_HEADERS`] bytes within
//!   [`READ_TIMEOUT`], body [`MAX_BODY`] bytes within [`READ_TIMEOUT`];
//!   beyond that the client gets 413/408 (or the connection is closed);
//! - at most [`MAX_CONNECTIONS`] connections are served at once; more are
//!   closed at once;
//! - the [`Handler`] runs on a blocking-pool thread, so a handler that
//!   waits (for the VM thread) never stalls the other connections;
//! - every answer is a typed body serialized by serde, or a
//!   [`super::models::Fault`];
//! - the socket file is created owner-only (0600) and removed on stop; an
//!   existing path is refused, never silently replaced (the binary's
//!   `--replace-api-sock` removes a stale socket before it starts us);
//! - the thread installs the API seccomp filter ([`crate::seccomp`])
//!   before it accepts anything; the blocking pool's threads inherit it;
//! - [`ApiServer::stop`] (or drop) closes idle connections at once and lets
//!   answers in flight finish, within [`STOP_GRACE`]; then the thread ends.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Response as HttpResponse, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;

use super::models::Fault;
use super::request::{parse, Request};

/// Largest request body.
pub const MAX_BODY: usize = 64 << 10;
/// Largest header block hyper buffers.
pub const MAX_HEADERS: usize = 16 << 10;
/// Time a client has to send its headers, and then its body.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a stop waits for answers in flight.
pub const STOP_GRACE: Duration = Duration::from_millis(500);

/// What the API answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// 204.
    NoContent,
    /// 200 with a JSON body.
    Json(serde_json::Value),
}

impl Reply {
    /// 200 with `body` serialized.
    pub fn json(body: &impl Serialize) -> Result<Reply, ApiFault> {
        serde_json::to_value(body)
            .map(Reply::Json)
            .map_err(|e| ApiFault::internal(format!("serializing the answer failed: {e}")))
    }
}

/// A refused or failed call: status and `fault_message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiFault {
    /// HTTP status (400 for bad requests, as Firecracker answers).
    pub status: u16,
    /// What went wrong and what to do.
    pub message: String,
    /// The host cannot do what was asked as it stands (no usable KVM, no
    /// guest_memfd, too few huge pages, too little address space:
    /// [`crate::VmError::host_cannot`]). Not sent: `vmm --config-file`
    /// exits with [`crate::EXIT_HOST_CANNOT`] for it.
    pub host_cannot: bool,
}

impl ApiFault {
    /// 400.
    pub fn bad(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            host_cannot: false,
        }
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            message: message.into(),
            host_cannot: false,
        }
    }

    /// A 400 for a VM that could not be made or started, marked
    /// [`ApiFault::host_cannot`] if that is why.
    pub fn vm_failed(what: &str, e: &crate::VmError) -> Self {
        Self::bad(format!("{what} failed: {e}")).host_cannot_if(e.host_cannot())
    }

    /// This fault, marked [`ApiFault::host_cannot`] if `host_cannot`.
    pub fn host_cannot_if(mut self, host_cannot: bool) -> Self {
        self.host_cannot |= host_cannot;
        self
    }
}

/// What the monitor does with calls. Runs on a blocking-pool thread; may
/// block.
pub trait Handler: Send + Sync + 'static {
    /// Carry out `req`.
    fn handle(&self, req: Request) -> Result<Reply, ApiFault>;
}

/// Errors of starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The path exists.
    #[error(
        "API socket path {0} already exists: remove it if no monitor uses it (or give \
         --replace-api-sock), or choose another path"
    )]
    Exists(PathBuf),
    /// bind/chmod failed.
    #[error("cannot listen on API socket {0}: {1}")]
    Bind(PathBuf, std::io::Error),
    /// Runtime or thread set-up failed.
    #[error("starting the API server thread failed: {0}")]
    Thread(std::io::Error),
}

/// A running API server.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

fn fault_response(status: StatusCode, message: String) -> HttpResponse<Full<Bytes>> {
    let body = serde_json::to_vec(&Fault {
        fault_message: message,
    })
    .unwrap_or_default();
    HttpResponse::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| HttpResponse::new(Full::new(Bytes::new())))
}

async fn serve_one(
    req: hyper::Request<Incoming>,
    handler: Arc<dyn Handler>,
) -> Result<HttpResponse<Full<Bytes>>, Infallible> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let body = Limited::new(req.into_body(), MAX_BODY).collect();
    let body = match tokio::time::timeout(READ_TIMEOUT, body).await {
        Err(_) => {
            return Ok(fault_response(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request body did not arrive within {READ_TIMEOUT:?}"),
            ))
        }
        Ok(Err(e)) => {
            return Ok(fault_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("reading the body failed ({e}); bodies are limited to {MAX_BODY} bytes"),
            ))
        }
        Ok(Ok(b)) => b.to_bytes(),
    };
    let request = match parse(&method, &path, &body) {
        Ok(r) => r,
        Err(e) => return Ok(fault_response(StatusCode::BAD_REQUEST, e.to_string())),
    };
    let answer = tokio::task::spawn_blocking(move || handler.handle(request)).await;
    Ok(match answer {
        Ok(Ok(Reply::NoContent)) => HttpResponse::builder()
            .status(StatusCode::NO_CONTENT)
            .body(Full::new(Bytes::new()))
            .unwrap_or_else(|_| HttpResponse::new(Full::new(Bytes::new()))),
        Ok(Ok(Reply::Json(v))) => HttpResponse::builder()
            .status(StatusCode::OK)
            .header("Content-Type", "application/json")
            .body(Full::new(Bytes::from(v.to_string())))
            .unwrap_or_else(|_| HttpResponse::new(Full::new(Bytes::new()))),
        Ok(Err(f)) => fault_response(
            StatusCode::from_u16(f.status).unwrap_or(StatusCode::BAD_REQUEST),
            f.message,
        ),
        Err(e) => fault_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the request handler failed: {e}"),
        ),
    })
}

impl ApiServer {
    /// Listens on `path` (which must not exist) and serves `handler`.
    pub fn start(path: &Path, handler: Arc<dyn Handler>) -> Result<ApiServer, ServerError> {
        if path.symlink_metadata().is_ok() {
            return Err(ServerError::Exists(path.into()));
        }
        // The socket is created owner-only: with a umask that clears group
        // and other bits around the bind, so no other user can connect in
        // the window before the chmod below (which keeps it 0600 whatever
        // the umask was). umask is process-wide, so a file another thread
        // creates in this window only gets stricter permissions.
        // SAFETY: umask only swaps the process's file-mode mask.
        let old_mask = unsafe { libc::umask(0o177) };
        let bound = std::os::unix::net::UnixListener::bind(path);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old_mask) };
        let std_listener = bound.map_err(|e| ServerError::Bind(path.into(), e))?;
        let owner_only = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std_listener.set_nonblocking(true));
        if let Err(e) = owner_only {
            let _ = std::fs::remove_file(path);
            return Err(ServerError::Bind(path.into(), e));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(MAX_CONNECTIONS)
            .thread_name("api-handler")
            .build()
            .map_err(ServerError::Thread)?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                crate::seccomp::install(crate::seccomp::ThreadKind::Api);
                rt.block_on(accept_loop(std_listener, handler, stop_rx));
            })
            .map_err(ServerError::Thread)?;
        Ok(ApiServer {
            path: path.into(),
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops serving, joins the thread, removes the socket file.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The HTTP/1.1 connection settings of every connection (the bounds of
/// the module invariants).
fn http1() -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .max_buf_size(MAX_HEADERS.max(8192));
    b
}

/// Serves one connection on `stream` with `handler`, exactly as the
/// listener serves each accepted one (same HTTP settings, parser, routing
/// and answers), until the client closes it or breaks the protocol. For
/// driving the server without a socket file (the API fuzz target,
/// `tests/fuzz/`); must run inside a tokio runtime with time and I/O.
pub async fn serve_stream(stream: tokio::net::UnixStream, handler: Arc<dyn Handler>) {
    let svc = hyper::service::service_fn(move |req| serve_one(req, Arc::clone(&handler)));
    let _ = http1().serve_connection(TokioIo::new(stream), svc).await;
}

async fn accept_loop(
    std_listener: std::os::unix::net::UnixListener,
    handler: Arc<dyn Handler>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let Ok(listener) = tokio::net::UnixListener::from_std(std_listener) else {
        return;
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            _ = &mut stop => break,
            s = listener.accept() => match s {
                Ok((s, _)) => s,
                // EMFILE and friends: back off instead of spinning.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        // Over the limit: the stream is dropped (closed) at once.
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            continue;
        };
        let handler = Arc::clone(&handler);
        let svc = hyper::service::service_fn(move |req| serve_one(req, Arc::clone(&handler)));
        let conn = http1().serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    // Stop: idle connections close at once, a request in flight gets its
    // answer (the one that asked to stop, say), bounded by STOP_GRACE.
    let _ = tokio::time::timeout(STOP_GRACE, graceful.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    use super::*;
    use crate::api::models::VmState;

    struct Echo;

    impl Handler for Echo {
        fn handle(&self, req: Request) -> Result<Reply, ApiFault> {
            match req {
                Request::GetInstance => Reply::json(&serde_json::json!({"ok": true})),
                Request::PatchVm(VmState::Paused) => {
                    std::thread::sleep(Duration::from_millis(300));
                    Ok(Reply::NoContent)
                }
                _ => Err(ApiFault::bad("not here")),
            }
        }
    }

    fn sock(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vmm-api-{name}-{}.sock", std::process::id()))
    }

    fn raw(path: &Path, req: &str) -> String {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    #[test]
    fn answers_refuses_and_cleans_up() {
        let p = sock("basic");
        let _ = std::fs::remove_file(&p);
        let mut srv = ApiServer::start(&p, Arc::new(Echo)).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            ApiServer::start(&p, Arc::new(Echo)),
            Err(ServerError::Exists(_))
        ));
        let ok = raw(&p, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains(r#"{"ok":true}"#), "{ok}");
        let bad = raw(
            &p,
            "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
        assert!(bad.contains("fault_message"), "{bad}");
        let big = format!(
            "PUT /actions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            MAX_BODY + 1,
            "x".repeat(MAX_BODY + 1)
        );
        assert!(raw(&p, &big).starts_with("HTTP/1.1 413"));
        srv.stop();
        assert!(!p.exists());
    }

    #[test]
    fn a_silent_client_delays_no_one() {
        let p = sock("slow");
        let _ = std::fs::remove_file(&p);
        let srv = ApiServer::start(&p, Arc::new(Echo)).unwrap();
        // Connected, half a request line, then silence.
        let mut idle = UnixStream::connect(&p).unwrap();
        idle.write_all(b"GET / HT").unwrap();
        // A handler that blocks for 300 ms does not hold the others up.
        let p2 = p.clone();
        let slow = std::thread::spawn(move || {
            raw(
                &p2,
                "PATCH /vm HTTP/1.1\r\nHost: x\r\nContent-Length: 18\r\nConnection: close\r\n\r\n{\"state\":\"Paused\"}",
            )
        });
        let t = Instant::now();
        let ok = raw(&p, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(
            t.elapsed() < Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );
        assert!(slow.join().unwrap().starts_with("HTTP/1.1 204"));
        // Stopping does not wait for the idle client.
        let t = Instant::now();
        drop(srv);
        assert!(t.elapsed() < Duration::from_secs(1));
        drop(idle);
    }
}
