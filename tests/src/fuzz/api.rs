//! `api`: the control API on arbitrary input, with no VM.
//!
//! Two modes, chosen by the first byte:
//! - **raw**: the rest is the byte stream a client sends on one connection
//!   (any number of pipelined HTTP/1.1 requests, any garbage), served by
//!   [`vmm::api::server::serve_stream`] exactly as an accepted connection
//!   is: hyper's parser, the body limits, the router
//!   ([`vmm::api::request::parse`]) and the service's handlers;
//! - **calls**: a list of (method, path, body) triples given straight to
//!   the router and, when it accepts, to the handler (no panic catching in
//!   between).
//!
//! The handler is a fresh [`Service`] (no VM) behind a sandbox: paths in
//! the bodies (`kernel_image_path`, `initrd_path`, `metrics_path`,
//! `log_path`) are mapped into a private temporary directory, so the
//! fuzzer never opens or creates host files elsewhere, and
//! `InstanceStart`, which would need KVM, is answered without running.
//!
//! **Properties:** the router and the handlers never panic (a panic in a
//! handler reaches the client as a 500 "the request handler failed": that
//! answer fails the case); every answer is an HTTP/1.1 status line with a
//! JSON body or none; no answer is a 500 (the service's only 500s are a
//! failed serialization and a pause timeout, neither possible here); a
//! `fault_message` answer is a non-empty message; afterwards the service's
//! configuration still passes the checks it was stored under
//! (`check_machine`, but for the free hugetlb pages: host state), and `GET /vm/config` round-trips through the config
//! file format.

use std::cell::RefCell;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use vmm::api::models::{ActionType, HugePages, VmConfigFile};
use vmm::api::request::{parse, Request};
use vmm::api::server::{serve_stream, ApiFault, Handler, Reply};
use vmm::service::{check_machine, Service, ServiceOptions};
use vmm::Console;

use super::Input;

/// Most bytes one raw connection sends (fits a socket buffer: the whole
/// input is written before the server runs).
const MAX_RAW: usize = 48 << 10;
/// Most calls in calls mode.
const MAX_CALLS: usize = 24;

const METHODS: &[&str] = &["GET", "PUT", "PATCH", "DELETE", "POST", "HEAD", "put", ""];
const PATHS: &[&str] = &[
    "/",
    "/version",
    "/machine-config",
    "/boot-source",
    "/balloon",
    "/balloon/statistics",
    "/actions",
    "/vm",
    "/vm/config",
    "/metrics",
    "/logger",
    "/memory",
];

/// Where sandboxed paths go (one per process, see [`super::scratch`]).
fn sandbox() -> PathBuf {
    super::scratch::dir("api", None)
}

/// `p` mapped into the sandbox: the empty path stays empty (an open
/// error), anything else becomes one of a few hundred file names there.
fn jail(p: &str) -> String {
    if p.is_empty() {
        return String::new();
    }
    let name: String = p
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(2)
        .collect();
    sandbox().join(format!("f{name}")).display().to_string()
}

/// A [`Service`] that never touches host files outside the sandbox and
/// never starts a VM.
struct Sandboxed(Arc<Service>);

impl Handler for Sandboxed {
    fn handle(&self, req: Request) -> Result<Reply, ApiFault> {
        let req = match req {
            Request::Action(ActionType::InstanceStart) => {
                return Err(ApiFault::bad("fuzz sandbox: InstanceStart needs KVM"))
            }
            Request::PutBootSource(mut b) => {
                b.kernel_image_path = jail(&b.kernel_image_path);
                b.initrd_path = b.initrd_path.as_deref().map(jail);
                Request::PutBootSource(b)
            }
            Request::PutMetrics(mut m) => {
                m.metrics_path = jail(&m.metrics_path);
                Request::PutMetrics(m)
            }
            Request::PutLogger(mut l) => {
                l.log_path = l.log_path.as_deref().map(jail);
                Request::PutLogger(l)
            }
            r => r,
        };
        self.0.handle(req)
    }
}

fn service() -> Arc<Sandboxed> {
    Arc::new(Sandboxed(Service::new(ServiceOptions {
        id: "fuzz".into(),
        console: Console::Null,
        populate: false,
        backing: None,
    })))
}

fn check_reply(r: &Result<Reply, ApiFault>) {
    match r {
        Ok(Reply::NoContent | Reply::Json(_)) => {}
        Err(f) => {
            assert!(f.status != 500, "internal error: {}", f.message);
            assert!(!f.message.is_empty(), "a fault without a message");
        }
    }
}

/// The configuration left behind is still one the service would accept.
fn check_state(s: &Sandboxed) {
    let r = s.handle(Request::GetVmConfig);
    let Ok(Reply::Json(v)) = r else {
        panic!("GET /vm/config failed: {r:?}");
    };
    let cfg: VmConfigFile = serde_json::from_value(v).expect("GET /vm/config round-trips");
    // Whether hugetlb pages are free is the host's state of the moment
    // (other processes change it), not the service's: left out.
    let mut m = cfg.machine_config;
    m.huge_pages = HugePages::None;
    check_machine(&m, None).expect("stored machine config passes its check");
}

thread_local! {
    static RT: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

/// Serves `bytes` as one connection; returns what the server sent back.
fn serve_raw(handler: Arc<dyn Handler>, bytes: &[u8]) -> Vec<u8> {
    let (mut client, server) = UnixStream::pair().expect("socket pair");
    client
        .write_all(bytes)
        .expect("request fits the socket buffer");
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    server.set_nonblocking(true).expect("non-blocking");
    client.set_nonblocking(true).expect("non-blocking");
    RT.with(|rt| {
        let mut rt = rt.borrow_mut();
        let rt = rt.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
        });
        rt.block_on(async move {
            let server = tokio::net::UnixStream::from_std(server).expect("tokio stream");
            let client = tokio::net::UnixStream::from_std(client).expect("tokio stream");
            let read = async {
                let mut out = Vec::new();
                let mut buf = [0u8; 8192];
                loop {
                    if client.readable().await.is_err() {
                        break;
                    }
                    match client.try_read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => out.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => break,
                    }
                }
                out
            };
            let ((), out) = tokio::join!(serve_stream(server, handler), read);
            out
        })
    })
}

/// Checks every answer in a raw session's output.
fn check_answers(out: &[u8]) {
    let text = String::from_utf8_lossy(out);
    assert!(
        !text.contains("the request handler failed"),
        "a handler panicked:\n{text}"
    );
    for line in text.split("\r\n").filter(|l| l.starts_with("HTTP/")) {
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        assert!(
            (200..600).contains(&status) && status != 500,
            "answer {line:?}:\n{text}"
        );
    }
}

/// Runs one input; panics if a property fails.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let s = service();
    if inp.u8() & 1 == 0 {
        let raw = inp.rest();
        let out = serve_raw(
            Arc::clone(&s) as Arc<dyn Handler>,
            &raw[..raw.len().min(MAX_RAW)],
        );
        check_answers(&out);
    } else {
        for _ in 0..MAX_CALLS {
            if inp.is_empty() {
                break;
            }
            let m = inp.u8();
            let method = match METHODS.get(usize::from(m % 16)) {
                Some(m) => (*m).to_string(),
                None => String::from_utf8_lossy(inp.bytes()).into_owned(),
            };
            let p = inp.u8();
            let mut path = match PATHS.get(usize::from(p % 16)) {
                Some(p) => (*p).to_string(),
                None => String::from_utf8_lossy(inp.bytes()).into_owned(),
            };
            if p & 0x80 != 0 {
                path.push_str(&String::from_utf8_lossy(inp.bytes()));
            }
            let n = usize::from(inp.u16() % 2048);
            let body = inp.take(n);
            if let Ok(req) = parse(&method, &path, body) {
                check_reply(&s.handle(req));
            }
        }
    }
    check_state(&s);
}
