//! Differential tests of the API: `vmm --api-sock` and the real Firecracker
//! (`GMM_FIRECRACKER_BIN`, else `../shared/firecracker/firecracker` beside
//! the repository) get the same request sequences; their answers are
//! compared call by call:
//!
//! - the status codes are equal;
//! - 2xx: the bodies are equal key by key, defaults included, except
//!   [`IGNORED`] (values that legitimately differ); a key Firecracker writes
//!   as `null` and we leave out counts as equal (the spec's optional fields
//!   are typed `string`/`object`, not nullable: leaving them out is what the
//!   spec allows, `null` is what Firecracker's serde derive writes);
//! - 4xx: both bodies are Firecracker's `Error` with a non-empty
//!   `fault_message`; where Firecracker answers a fixed phrase
//!   ([`FIXED_PHRASES`]), ours is the same phrase;
//! - every 2xx body of ours validates against the matching definition of
//!   `tests/firecracker-api.json` (Firecracker's OpenAPI definitions for the
//!   models we serve): required keys present, types right, enum values
//!   known, no key outside `properties`. Firecracker's own bodies are
//!   checked too (but `GET /vm/config`, which holds sections we do not
//!   have), which checks the copy of the spec against the real thing.
//!
//! Where the answers differ on purpose the call goes through
//! [`Pair::deliberate`] or [`Pair::spec_over_firecracker`] with the reason;
//! the list:
//!
//! | call | Firecracker | ours | why |
//! |---|---|---|---|
//! | `PUT /machine-config` odd `mem_size_mib` (255) | 204 | 400 | guest RAM is mapped in 2 MiB units (stage-2 leaves) |
//! | `smt: true` | 204 | 400 | no SMT topology is offered to the guest |
//! | `track_dirty_pages: true` | 204 | 400 | no snapshots, so no dirty log |
//! | `cpu_template: "T2"` (any but `None`) | 204 | 400 | no CPU templates |
//! | `huge_pages: "2M"` | 204 | 400 unless the host's hugetlb pool holds the guest | we back the guest with hugetlb pages at once and say how to raise `vm.nr_hugepages`; Firecracker fails later, at `InstanceStart` |
//! | `PUT /balloon` `free_page_hinting: true` | 204 | 400 | no free page hinting (free page reporting is supported) |
//! | `PUT`/`PATCH /balloon` `amount_mib` above vCPU 0's share, no boot source | 204 | 400 | the embedded guest's driver runs on vCPU 0 and gives only its share of the workload memory: the target could never be reached (a Linux guest may ask up to all its RAM) |
//! | `PATCH /balloon`, `PATCH /balloon/statistics` before the start | 400 "not supported before starting" | 204 | the spec says "before or after machine startup"; we follow the spec |
//! | `PUT /actions` with a method other than `PUT` (`POST`) | 400 with micro_http's non-JSON body | 400 with an `Error` body | the spec's 400 answers are `Error` |
//! | `GET /vm/config` `logger`, `metrics` | `null` even when configured | the configuration | the spec types them `Logger`/`Metrics`; we report what was set |
//! | `GET /vm/config` sections we do not have (`cpu-config`, `mmds-config`, `network-interfaces`, `vsock`, `entropy`, `pmem`, `memory-hotplug`) | `null` / `[]` | absent | no such devices ([`FC_ONLY_SECTIONS`]) |
//! | `GET /vm/config` `boot-source` before `PUT /boot-source` | `{"kernel_image_path": ""}` | absent | without a boot source we run our embedded guest, there is no kernel to name |
//! | `PATCH /balloon` after the start but before the guest's driver is up | 400 "Device not activated yet" | 204 | we keep the target in config space, the driver reads it when it comes up (not exercised: timing) |
//! | `InstanceStart` without `PUT /boot-source` | 400 | 204 | ours boots the embedded test guest (not exercised here) |
//!
//! Two tests: the pre-boot sequences (no guest: cheap) and one Linux boot
//! of each monitor, in lockstep, so the two guests boot in parallel (two
//! 1-vCPU guests on this 2-core host; see the report line for the time).
//! Skips loudly without the `vmm` binary or Firecracker, and (the boot)
//! without `/dev/kvm` or the Linux fixture.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::{firecracker_bin, kvm_or_skip, linux_fixture, loud, vmm_bin};

/// Keys whose values legitimately differ between the two monitors (any
/// depth): the application's name and its versions. (`id` is compared:
/// both default to `anonymous-instance`.)
const IGNORED: &[&str] = &["app_name", "vmm_version", "firecracker_version"];

/// Firecracker's fixed phrases: where Firecracker answers one of these, we
/// must answer the same words.
const FIXED_PHRASES: &[&str] = &[
    "The requested operation is not supported before starting the microVM.",
    "The requested operation is not supported after starting the microVM.",
    "Empty PUT request.",
    "Empty PATCH request.",
];

/// `GET /vm/config` sections Firecracker writes (as `null` or `[]`) for
/// devices this monitor does not have.
const FC_ONLY_SECTIONS: &[&str] = &[
    "cpu-config",
    "mmds-config",
    "network-interfaces",
    "vsock",
    "entropy",
    "pmem",
    "memory-hotplug",
];

/// Firecracker's OpenAPI definitions for the models we serve.
const SPEC: &str = include_str!("../firecracker-api.json");

/// How long a step of a booted Linux guest (balloon driver, init, restart)
/// may take. A deadline, not a performance limit: the guest kernel is
/// emulated here (~1 M instructions/s), and with the host's cores busy
/// (seen: other builds during CI) its steps take several times their usual
/// 10-40 s.
const SLOW_GUEST: Duration = Duration::from_secs(240);

// ---------------------------------------------------------------------------
// The validator: a JSON-schema subset (type, properties, required, enum,
// minimum/maximum, items, $ref to a definition), with no key allowed
// outside `properties`.

fn spec() -> Value {
    serde_json::from_str(SPEC).expect("tests/firecracker-api.json is JSON")
}

/// Errors of `v` against definition `def` (empty: valid).
fn validate(spec: &Value, def: &str, v: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    check_def(spec, def, v, def, &mut errs);
    errs
}

fn check_def(spec: &Value, def: &str, v: &Value, at: &str, errs: &mut Vec<String>) {
    match spec["definitions"].get(def) {
        Some(s) => check(spec, s, v, at, errs),
        None => errs.push(format!("{at}: no definition {def} in the spec")),
    }
}

fn check(spec: &Value, s: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        return check_def(spec, r, v, at, errs);
    }
    let ty = s.get("type").and_then(Value::as_str).unwrap_or("");
    let ok = match ty {
        "object" => v.is_object(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "boolean" => v.is_boolean(),
        "array" => v.is_array(),
        other => {
            errs.push(format!("{at}: the spec has an unknown type {other:?}"));
            return;
        }
    };
    if !ok {
        errs.push(format!("{at}: {v} is not of type {ty}"));
        return;
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            errs.push(format!(
                "{at}: {v} is not one of {}",
                Value::from(e.clone())
            ));
        }
    }
    if let Some(n) = v.as_i64() {
        if s.get("minimum")
            .and_then(Value::as_i64)
            .is_some_and(|m| n < m)
        {
            errs.push(format!("{at}: {n} is below the minimum"));
        }
        if s.get("maximum")
            .and_then(Value::as_i64)
            .is_some_and(|m| n > m)
        {
            errs.push(format!("{at}: {n} is above the maximum"));
        }
    }
    if let (Some(items), Some(a)) = (s.get("items"), v.as_array()) {
        for (i, x) in a.iter().enumerate() {
            check(spec, items, x, &format!("{at}[{i}]"), errs);
        }
    }
    if let Some(o) = v.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        for r in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !o.contains_key(r) {
                errs.push(format!("{at}: required key {r:?} missing"));
            }
        }
        for (k, x) in o {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => check(spec, ps, x, &format!("{at}.{k}"), errs),
                None => errs.push(format!("{at}: key {k:?} is not in the definition")),
            }
        }
    }
}

/// The definition a 200 answer of `method path` follows.
fn model_of(method: &str, path: &str) -> Option<&'static str> {
    Some(match (method, path) {
        ("GET", "/") => "InstanceInfo",
        ("GET", "/version") => "FirecrackerVersion",
        ("GET", "/machine-config") => "MachineConfiguration",
        ("GET", "/balloon") => "Balloon",
        ("GET", "/balloon/statistics") => "BalloonStats",
        ("GET", "/vm/config") => "FullVmConfiguration",
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// Comparing answers.

/// Differences of our 2xx body from Firecracker's (see the module comment).
fn diff(ours: &Value, fc: &Value, at: &str, out: &mut Vec<String>) {
    match (ours, fc) {
        (Value::Object(o), Value::Object(f)) => {
            let keys: BTreeSet<&String> = o.keys().chain(f.keys()).collect();
            for k in keys {
                if IGNORED.contains(&k.as_str()) {
                    continue;
                }
                let here = format!("{at}.{k}");
                match (o.get(k), f.get(k)) {
                    (None, Some(Value::Null)) => {}
                    (Some(a), Some(b)) => diff(a, b, &here, out),
                    (a, b) => out.push(format!("{here}: ours {a:?}, Firecracker {b:?}")),
                }
            }
        }
        _ if ours == fc => {}
        _ => out.push(format!("{at}: ours {ours}, Firecracker {fc}")),
    }
}

/// `GET /vm/config` of both, with the deliberate differences taken out
/// (checked on the way): the sections we do not have, Firecracker's `null`
/// logger and metrics, an empty boot source.
fn vm_config_comparable(ours: &Value, fc: &Value) -> (Value, Value) {
    let (mut o, mut f) = (ours.clone(), fc.clone());
    let (Some(om), Some(fm)) = (o.as_object_mut(), f.as_object_mut()) else {
        panic!("GET /vm/config is not an object: ours {ours}, Firecracker {fc}");
    };
    for k in FC_ONLY_SECTIONS {
        let v = fm.remove(*k);
        assert!(
            v.as_ref()
                .is_none_or(|v| v.is_null() || v.as_array().is_some_and(Vec::is_empty)),
            "Firecracker's {k} is configured: {v:?}"
        );
        assert!(om.get(*k).is_none(), "ours has {k}: {ours}");
    }
    for k in ["logger", "metrics"] {
        // Firecracker reports null even after PUT /logger, /metrics.
        if fm.get(k).is_some_and(Value::is_null) {
            fm.remove(k);
            om.remove(k);
        }
    }
    if fm["boot-source"]["kernel_image_path"] == "" {
        assert!(om.get("boot-source").is_none(), "{ours}");
        fm.remove("boot-source");
    }
    (o, f)
}

/// An API client answer: status and body (JSON, `Null` if empty, the raw
/// text as a string if not JSON).
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    body: Value,
}

impl Answer {
    fn fault(&self) -> Option<&str> {
        self.body.get("fault_message").and_then(Value::as_str)
    }
}

/// One HTTP/1.1 request over the Unix socket; reads exactly the answer.
fn http(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Answer {
    let (status, b) = vmm::api::exchange(sock, method, path, body.map(str::as_bytes))
        .unwrap_or_else(|e| panic!("{method} {path} on {}: {e}", sock.display()));
    let body = if b.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&b)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&b).into_owned()))
    };
    Answer { status, body }
}

// ---------------------------------------------------------------------------
// The two monitors.

/// A monitor process with its API socket.
type Mon = tests::ApiProcess;

/// Ours and Firecracker, driven with the same calls.
struct Pair {
    ours: Mon,
    fc: Mon,
    spec: Value,
    calls: usize,
}

impl Pair {
    fn new(tag: &str, vmm: &Path, fc: &Path) -> Pair {
        Pair {
            ours: Mon::spawn("vmm", vmm, &format!("apidiff-{tag}"), &[]),
            fc: Mon::spawn("firecracker", fc, &format!("apidiff-{tag}"), &[]),
            spec: spec(),
            calls: 0,
        }
    }

    fn both(&mut self, m: &str, p: &str, ours: Option<&str>, fc: Option<&str>) -> (Answer, Answer) {
        self.calls += 1;
        (
            http(&self.ours.sock, m, p, ours),
            http(&self.fc.sock, m, p, fc),
        )
    }

    /// Polls `GET path` on both until `pred` holds on each; returns each
    /// one's answer and when (since `since`) it first held.
    fn wait_both(
        &self,
        path: &str,
        timeout: Duration,
        since: Instant,
        pred: impl Fn(&Value) -> bool,
    ) -> [(Value, Duration); 2] {
        let mons = [&self.ours, &self.fc];
        let mut got: [Option<(Value, Duration)>; 2] = [None, None];
        let t = Instant::now();
        while got.iter().any(Option::is_none) {
            for (m, g) in mons.iter().zip(got.iter_mut()).filter(|(_, g)| g.is_none()) {
                let a = http(&m.sock, "GET", path, None);
                assert_eq!(a.status, 200, "{}: GET {path}: {a:?}", m.name);
                if pred(&a.body) {
                    *g = Some((a.body, since.elapsed()));
                } else {
                    assert!(
                        t.elapsed() < timeout,
                        "{}: GET {path} never satisfied within {timeout:?}: {}\n{}",
                        m.name,
                        a.body,
                        m.tail(40)
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        got.map(|g| g.expect("both answered"))
    }

    /// Checks our 2xx body against the spec (and Firecracker's, but for
    /// `GET /vm/config`, which holds sections we do not model).
    fn check_spec(&self, m: &str, p: &str, o: &Answer, f: &Answer) {
        if o.status == 204 {
            assert!(o.body.is_null(), "{m} {p}: 204 with a body {}", o.body);
            return;
        }
        if o.status != 200 {
            return;
        }
        let model = model_of(m, p).unwrap_or_else(|| panic!("{m} {p}: 200 but no model"));
        let errs = validate(&self.spec, model, &o.body);
        assert!(
            errs.is_empty(),
            "{m} {p}: our body {} does not follow {model}: {errs:#?}",
            o.body
        );
        if f.status == 200 && model != "FullVmConfiguration" {
            let errs = validate(&self.spec, model, &f.body);
            assert!(
                errs.is_empty(),
                "{m} {p}: Firecracker's body {} does not follow our copy of {model}: {errs:#?}",
                f.body
            );
        }
    }

    /// Both faults are `Error`s with a message; Firecracker's fixed phrases
    /// are ours too (and so is its "Invalid request method and/or path").
    fn check_faults(&self, m: &str, p: &str, o: &Answer, f: &Answer) {
        for (who, a) in [("ours", o), ("Firecracker", f)] {
            assert!(
                a.fault().is_some_and(|s| !s.is_empty()),
                "{m} {p}: {who} answered {} without a fault_message: {}",
                a.status,
                a.body
            );
            let errs = validate(&self.spec, "Error", &a.body);
            assert!(errs.is_empty(), "{m} {p}: {who}: {errs:?}");
        }
        let (om, fm) = (o.fault().unwrap_or(""), f.fault().unwrap_or(""));
        if FIXED_PHRASES.contains(&fm) || fm.starts_with("Invalid request method and/or path") {
            assert_eq!(om, fm, "{m} {p}: Firecracker's fixed phrase");
        }
    }

    /// The same call to both with per-monitor bodies; asserts the same
    /// answer (see the module comment); returns (ours, Firecracker's).
    fn same_each(
        &mut self,
        m: &str,
        p: &str,
        ours: Option<&str>,
        fc: Option<&str>,
    ) -> (Value, Value) {
        let (o, f) = self.both(m, p, ours, fc);
        assert_eq!(
            o.status, f.status,
            "{m} {p} {ours:?}: ours {} {}, Firecracker {} {}",
            o.status, o.body, f.status, f.body
        );
        self.check_spec(m, p, &o, &f);
        if o.status >= 400 {
            self.check_faults(m, p, &o, &f);
        } else if p == "/vm/config" {
            let (oc, fc) = vm_config_comparable(&o.body, &f.body);
            let mut d = Vec::new();
            diff(&oc, &fc, "", &mut d);
            assert!(d.is_empty(), "{m} {p}: {d:#?}");
        } else {
            let mut d = Vec::new();
            diff(&o.body, &f.body, "", &mut d);
            assert!(d.is_empty(), "{m} {p} {ours:?}: {d:#?}");
        }
        (o.body, f.body)
    }

    /// [`Pair::same_each`] with one body for both.
    fn same(&mut self, m: &str, p: &str, body: Option<Value>) -> (Value, Value) {
        let b = body.map(|b| b.to_string());
        self.same_each(m, p, b.as_deref(), b.as_deref())
    }

    /// [`Pair::same`] with a raw (possibly malformed) body.
    fn same_raw(&mut self, m: &str, p: &str, body: &str) {
        self.same_each(m, p, Some(body), Some(body));
    }

    /// A deliberate difference: Firecracker accepts (204), we refuse with
    /// 400 and a message that names what to change (`names`).
    fn deliberate(&mut self, m: &str, p: &str, body: Value, names: &str, why: &str) {
        let b = body.to_string();
        let (o, f) = self.both(m, p, Some(&b), Some(&b));
        assert_eq!(f.status, 204, "{m} {p} {b}: Firecracker {f:?}");
        assert_eq!(o.status, 400, "{m} {p} {b}: ours {o:?} ({why})");
        let msg = o.fault().unwrap_or("");
        assert!(msg.contains(names), "{m} {p} {b}: {msg:?} lacks {names:?}");
        loud!("deliberate: {m} {p} {b}: Firecracker 204, ours 400 {msg:?} ({why})");
    }

    /// Both refuse with 400 and an `Error`, for different reasons (no
    /// fixed-phrase check); ours names `ours_has`.
    fn both_refuse(&mut self, m: &str, p: &str, body: Value, ours_has: &str) {
        let b = body.to_string();
        let (o, f) = self.both(m, p, Some(&b), Some(&b));
        assert_eq!((o.status, f.status), (400, 400), "{m} {p} {b}: {o:?} {f:?}");
        for (who, a) in [("ours", &o), ("Firecracker", &f)] {
            let errs = validate(&self.spec, "Error", &a.body);
            assert!(
                errs.is_empty() && a.fault().is_some_and(|m| !m.is_empty()),
                "{who}: {a:?}"
            );
        }
        assert!(o.fault().is_some_and(|m| m.contains(ours_has)), "{o:?}");
    }

    /// Firecracker's code disagrees with its published spec: Firecracker
    /// answers `fc_status` with `fc_msg`, we answer 204 as the spec says.
    fn spec_over_firecracker(&mut self, m: &str, p: &str, body: Value, fc_msg: &str, spec: &str) {
        let b = body.to_string();
        let (o, f) = self.both(m, p, Some(&b), Some(&b));
        assert_eq!(f.status, 400, "{m} {p} {b}: Firecracker {f:?}");
        assert_eq!(f.fault(), Some(fc_msg), "{m} {p} {b}");
        assert_eq!(o.status, 204, "{m} {p} {b}: ours {o:?} (spec: {spec})");
        loud!("spec over Firecracker: {m} {p} {b}: Firecracker 400, ours 204 (spec: {spec:?})");
    }
}

fn binaries(test: &str) -> Option<(PathBuf, PathBuf)> {
    Some((vmm_bin(test)?, firecracker_bin(test)?))
}

const BEFORE_START: &str = "The requested operation is not supported before starting the microVM.";

#[test]
fn the_validator_refuses_what_the_spec_does_not_allow() {
    let s = spec();
    let good = json!({"vcpu_count": 2, "mem_size_mib": 256, "smt": false,
                      "track_dirty_pages": false, "huge_pages": "None"});
    assert_eq!(
        validate(&s, "MachineConfiguration", &good),
        Vec::<String>::new()
    );
    for bad in [
        json!({"vcpu_count": 2}),
        json!({"vcpu_count": 2, "mem_size_mib": 256, "memory": 1}),
        json!({"vcpu_count": "2", "mem_size_mib": 256}),
        json!({"vcpu_count": 33, "mem_size_mib": 256}),
        json!({"vcpu_count": 2, "mem_size_mib": 256, "huge_pages": "1G"}),
        json!({"vcpu_count": 2, "mem_size_mib": 256, "cpu_template": "X"}),
        json!([]),
    ] {
        assert!(
            !validate(&s, "MachineConfiguration", &bad).is_empty(),
            "{bad} passed"
        );
    }
    let cfg = json!({"machine-config": good, "drives": [], "balloon": {"amount_mib": 1}});
    let errs = validate(&s, "FullVmConfiguration", &cfg);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("deflate_on_oom"), "{errs:?}");
    for d in [
        "InstanceInfo",
        "MachineConfiguration",
        "Balloon",
        "BalloonUpdate",
        "BalloonStats",
        "BalloonStatsUpdate",
        "BootSource",
        "InstanceActionInfo",
        "Vm",
        "Metrics",
        "Logger",
        "Error",
        "FullVmConfiguration",
    ] {
        assert!(
            s["definitions"].get(d).is_some(),
            "{d} missing in the spec copy"
        );
    }
}

#[test]
fn pre_boot_answers_match_firecracker() {
    let name = "pre_boot_answers_match_firecracker";
    let Some((vmm, fcb)) = binaries(name) else {
        return;
    };
    let t0 = Instant::now();
    let mut p = Pair::new("pre", &vmm, &fcb);
    let tmp = std::env::temp_dir();
    let pid = std::process::id();

    // The instance and the defaults.
    p.same("GET", "/", None);
    p.same("GET", "/version", None);
    let (d, _) = p.same("GET", "/machine-config", None);
    assert_eq!(d["vcpu_count"], 1, "{d}");
    assert_eq!(d["mem_size_mib"], 128, "{d}");
    p.same("GET", "/vm/config", None);

    // PUT /machine-config, good and bad; a refused call changes nothing.
    let mc = "/machine-config";
    p.same(
        "PUT",
        mc,
        Some(json!({"vcpu_count": 2, "mem_size_mib": 256})),
    );
    p.same("GET", mc, None);
    for bad in [
        json!({"vcpu_count": 0, "mem_size_mib": 256}),
        json!({"vcpu_count": 33, "mem_size_mib": 256}),
        json!({"vcpu_count": -1, "mem_size_mib": 256}),
        json!({"vcpu_count": 2}),
        json!({"mem_size_mib": 256}),
        json!({"vcpu_count": 2, "mem_size_mib": 256, "memory": 1}),
        json!({"vcpu_count": "two", "mem_size_mib": 256}),
        json!({"vcpu_count": 2, "mem_size_mib": "256"}),
        json!({"vcpu_count": 2, "mem_size_mib": 0}),
        json!({"vcpu_count": 2, "mem_size_mib": 256, "huge_pages": "1G"}),
        json!({"vcpu_count": 2, "mem_size_mib": 256, "smt": "no"}),
        json!({"vcpu_count": 3, "mem_size_mib": 256, "smt": true}),
    ] {
        p.same("PUT", mc, Some(bad));
    }
    p.same_raw("PUT", mc, "");
    p.same_raw("PUT", mc, r#"{"vcpu_count": 1,"#);
    p.same("GET", mc, None);
    p.same(
        "PUT",
        mc,
        Some(json!({"vcpu_count": 32, "mem_size_mib": 256})),
    );
    p.same(
        "PUT",
        mc,
        Some(
            json!({"vcpu_count": 2, "mem_size_mib": 256, "cpu_template": "None",
                    "huge_pages": "Transparent", "smt": false, "track_dirty_pages": false}),
        ),
    );
    p.same("GET", mc, None);
    // PATCH /machine-config.
    p.same("PATCH", mc, Some(json!({"vcpu_count": 1})));
    p.same(
        "PATCH",
        mc,
        Some(json!({"mem_size_mib": 512, "huge_pages": "None"})),
    );
    for bad in [
        json!({}),
        json!({"vcpu_count": 0}),
        json!({"mem_size_mib": 0}),
        json!({"foo": 1}),
        json!({"vcpu_count": "x"}),
    ] {
        p.same("PATCH", mc, Some(bad));
    }
    p.same_raw("PATCH", mc, "");
    p.same("GET", mc, None);
    // What we do not support: refused with a clear message.
    let base = json!({"vcpu_count": 2, "mem_size_mib": 256});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    p.deliberate(
        "PUT",
        mc,
        with("mem_size_mib", json!(255)),
        "2 MiB",
        "guest RAM is mapped in 2 MiB units",
    );
    p.deliberate(
        "PUT",
        mc,
        with("smt", json!(true)),
        "smt",
        "no SMT topology",
    );
    p.deliberate(
        "PUT",
        mc,
        with("track_dirty_pages", json!(true)),
        "track_dirty_pages",
        "no snapshots, no dirty log",
    );
    p.deliberate(
        "PUT",
        mc,
        with("cpu_template", json!("T2")),
        "CPU templates",
        "no CPU templates",
    );
    {
        // 2M: ours needs the hugetlb pool now (Firecracker fails only at
        // InstanceStart without it).
        let b = with("huge_pages", json!("2M")).to_string();
        let (o, f) = p.both("PUT", mc, Some(&b), Some(&b));
        assert_eq!(f.status, 204, "{f:?}");
        if o.status == 400 {
            let msg = o.fault().unwrap_or("");
            assert!(msg.contains("nr_hugepages"), "{msg}");
            loud!("deliberate: PUT /machine-config huge_pages 2M: Firecracker 204, ours 400 {msg:?} (hugetlb pool too small)");
        } else {
            assert_eq!(o.status, 204, "{o:?}");
        }
    }
    // Firecracker took those: back to the same configuration. A PUT
    // without `cpu_template` keeps Firecracker's T2, although its spec
    // says "All parameters that are optional and are not specified are set
    // to their default values (... cpu_template = None ...)": we follow the
    // spec (ours has none to keep anyway) and reset Firecracker's by name.
    p.same("PUT", mc, Some(base.clone()));
    {
        let (o, f) = p.both("GET", mc, None, None);
        assert_eq!(f.body["cpu_template"], "T2", "{f:?}");
        assert!(o.body.get("cpu_template").is_none(), "{o:?}");
        loud!("spec over Firecracker: PUT /machine-config without cpu_template keeps Firecracker's T2; ours has none (spec: unspecified optional fields get their defaults)");
    }
    p.same("PUT", mc, Some(with("cpu_template", json!("None"))));
    p.same("GET", mc, None);

    // The balloon before the start.
    p.same("GET", "/balloon", None);
    p.same("GET", "/balloon/statistics", None);
    // Without a balloon both refuse these: Firecracker because of the
    // phase, ours (which follows the spec: "before or after machine
    // startup") because there is no balloon.
    p.both_refuse(
        "PATCH",
        "/balloon",
        json!({"amount_mib": 4}),
        "No balloon device",
    );
    p.both_refuse(
        "PATCH",
        "/balloon/statistics",
        json!({"stats_polling_interval_s": 2}),
        "No balloon device",
    );
    p.same(
        "PUT",
        "/balloon",
        Some(json!({"amount_mib": 8, "deflate_on_oom": false})),
    );
    let (b, _) = p.same("GET", "/balloon", None);
    assert_eq!(b["stats_polling_interval_s"], 0, "defaults: {b}");
    p.same("GET", "/balloon/statistics", None);
    let balloon = json!({"amount_mib": 8, "deflate_on_oom": true, "stats_polling_interval_s": 1});
    p.same("PUT", "/balloon", Some(balloon.clone()));
    p.same("GET", "/balloon", None);
    let (_, f) = p.same("GET", "/balloon/statistics", None);
    assert_eq!(f["fault_message"], BEFORE_START);
    p.spec_over_firecracker(
        "PATCH",
        "/balloon",
        json!({"amount_mib": 16}),
        BEFORE_START,
        "PATCH /balloon: Updates an existing balloon device, before or after machine startup",
    );
    p.spec_over_firecracker(
        "PATCH",
        "/balloon/statistics",
        json!({"stats_polling_interval_s": 5}),
        BEFORE_START,
        "PATCH /balloon/statistics: Updates an existing balloon device statistics interval, \
         before or after machine startup",
    );
    // Back to the same balloon on both.
    p.same("PUT", "/balloon", Some(balloon.clone()));
    p.same("GET", "/balloon", None);
    for bad in [
        json!({"amount_mib": 1000, "deflate_on_oom": false}),
        json!({"amount_mib": 8}),
        json!({"amount_mib": -1, "deflate_on_oom": false}),
        json!({"amount_mib": 8, "deflate_on_oom": false, "stats_polling_interval_s": 70000}),
        json!({"amount_mib": 8, "deflate_on_oom": false, "amount": 1}),
    ] {
        p.same("PUT", "/balloon", Some(bad));
    }
    p.deliberate(
        "PUT",
        "/balloon",
        json!({"amount_mib": 8, "deflate_on_oom": true, "free_page_hinting": true}),
        "free_page_hinting",
        "no free page hinting (free page reporting is supported)",
    );
    p.deliberate(
        "PUT",
        "/balloon",
        json!({"amount_mib": 200, "deflate_on_oom": false}),
        "vCPU 0's share",
        "without a boot source the embedded guest's driver (vCPU 0) gives only vCPU 0's share \
         of the workload memory, 126 MiB of 256 MiB with 2 vCPUs",
    );
    p.same("PUT", "/balloon", Some(balloon));
    p.same("GET", "/balloon", None);

    // Metrics and logger.
    let mpath = |who: &str| {
        let f = tmp.join(format!("gmm-apidiff-metrics-{who}-{pid}"));
        let _ = std::fs::remove_file(&f);
        json!({"metrics_path": f}).to_string()
    };
    let (mo, mf) = (mpath("vmm"), mpath("fc"));
    p.same_each("PUT", "/metrics", Some(&mo), Some(&mf));
    p.same_each("PUT", "/metrics", Some(&mo), Some(&mf));
    p.same("PUT", "/metrics", Some(json!({})));
    p.same(
        "PUT",
        "/logger",
        Some(json!({"level": "Loud", "show_level": true})),
    );
    p.same("PUT", "/logger", Some(json!({"level": "Info", "foo": 1})));

    // Post-boot calls before the start.
    p.same("PATCH", "/vm", Some(json!({"state": "Paused"})));
    p.same("PATCH", "/vm", Some(json!({"state": "Resumed"})));
    p.same("PATCH", "/vm", Some(json!({"state": "Stopped"})));
    p.same("PATCH", "/vm", Some(json!({})));
    for a in ["SendCtrlAltDel", "FlushMetrics", "Reboot"] {
        p.same("PUT", "/actions", Some(json!({"action_type": a})));
    }
    p.same("PUT", "/actions", Some(json!({})));
    p.same(
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart", "x": 1})),
    );

    // Unknown paths and methods, malformed JSON.
    p.same("GET", "/nope", None);
    p.same("GET", "/actions", None);
    p.same("DELETE", "/balloon", None);
    p.same("PUT", "/nope", Some(json!({})));
    {
        // A method Firecracker's HTTP layer does not know: both 400; its
        // body is micro_http's own text, not the spec's Error.
        let (o, f) = p.both("POST", "/actions", Some("{}"), Some("{}"));
        assert_eq!((o.status, f.status), (400, 400), "{o:?} {f:?}");
        assert!(o.fault().is_some_and(|m| !m.is_empty()), "{o:?}");
        loud!(
            "deliberate: POST /actions: Firecracker 400 {} (not an Error body), ours 400 {}",
            f.body,
            o.body
        );
    }
    p.same_raw("PUT", "/actions", "{");
    p.same_raw("PUT", "/actions", "not json");
    p.same_raw("PATCH", "/balloon", r#"{"amount_mib": 1"#);

    // The boot source.
    let missing = "/nonexistent/gmm-apidiff/vmlinux";
    p.same(
        "PUT",
        "/boot-source",
        Some(json!({"kernel_image_path": missing})),
    );
    // Any file that opens will do before the start (neither reads it yet).
    let kernel = std::env::current_exe().expect("own path");
    p.same(
        "PUT",
        "/boot-source",
        Some(json!({"kernel_image_path": kernel, "initrd_path": missing})),
    );
    p.same("PUT", "/boot-source", Some(json!({})));
    p.same(
        "PUT",
        "/boot-source",
        Some(json!({"kernel_image_path": kernel, "foo": 1})),
    );
    p.same("GET", "/vm/config", None);
    p.same(
        "PUT",
        "/boot-source",
        Some(json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"})),
    );
    // The whole configuration, as both see it.
    let (o, _) = p.same("GET", "/vm/config", None);
    assert_eq!(o["machine-config"]["vcpu_count"], 2, "{o}");
    assert_eq!(o["balloon"]["amount_mib"], 8, "{o}");
    assert_eq!(o["drives"], json!([]), "{o}");
    p.same("GET", "/", None);
    for who in ["vmm", "fc"] {
        let _ = std::fs::remove_file(tmp.join(format!("gmm-apidiff-metrics-{who}-{pid}")));
    }
    loud!(
        "{name}: {} calls to both monitors in {:.2} s",
        p.calls,
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn one_linux_boot_each_matches_firecracker() {
    let name = "one_linux_boot_each_matches_firecracker";
    if !kvm_or_skip(name) {
        return;
    }
    let Some((vmm, fcb)) = binaries(name) else {
        return;
    };
    let Some(dir) = linux_fixture(name) else {
        return;
    };
    let t0 = Instant::now();
    let mut p = Pair::new("boot", &vmm, &fcb);
    p.same("PUT", "/boot-source", Some(tests::idle_boot_source(&dir)));
    p.same(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 1, "mem_size_mib": 256})),
    );
    p.same(
        "PUT",
        "/balloon",
        Some(json!({"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1})),
    );
    p.same("GET", "/vm/config", None);
    // Both guests boot at once (lockstep): two 1-vCPU guests, two cores.
    let start = Instant::now();
    p.same(
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
    );
    let (i, _) = p.same("GET", "/", None);
    assert_eq!(i["state"], "Running", "{i}");

    // Pre-boot calls after the start: Firecracker's phrase, nothing changed.
    p.same(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 2, "mem_size_mib": 128})),
    );
    p.same("PATCH", "/machine-config", Some(json!({"vcpu_count": 2})));
    p.same(
        "PUT",
        "/boot-source",
        Some(json!({"kernel_image_path": dir.join("vmlinux")})),
    );
    p.same(
        "PUT",
        "/balloon",
        Some(json!({"amount_mib": 0, "deflate_on_oom": true})),
    );
    p.same(
        "PUT",
        "/metrics",
        Some(json!({"metrics_path": "/nonexistent/gmm-apidiff-metrics"})),
    );
    p.same("PUT", "/logger", Some(json!({"level": "Info"})));
    p.same(
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
    );
    p.same("GET", "/machine-config", None);
    p.same("GET", "/balloon", None);
    p.same("GET", "/vm/config", None);
    // No metrics file: a flush is a no-op for both.
    p.same(
        "PUT",
        "/actions",
        Some(json!({"action_type": "FlushMetrics"})),
    );
    // Statistics cannot be switched off after the start; the interval can
    // change.
    p.same(
        "PATCH",
        "/balloon/statistics",
        Some(json!({"stats_polling_interval_s": 0})),
    );
    p.same(
        "PATCH",
        "/balloon/statistics",
        Some(json!({"stats_polling_interval_s": 1})),
    );
    p.same("GET", "/balloon", None);

    // Wait for both guests: statistics with the guest's own figures (the
    // balloon driver is up; Firecracker refuses PATCH /balloon before).
    let guest = |v: &Value| v.get("total_memory").is_some() && v.get("free_memory").is_some();
    let up = Duration::from_secs(240);
    let [(so, t_ours), (sf, t_fc)] = p.wait_both("/balloon/statistics", up, start, guest);
    loud!(
        "{name}: guests up (statistics with the guest's figures): ours {:.1} s, Firecracker {:.1} s after InstanceStart (booting in parallel)",
        t_ours.as_secs_f64(),
        t_fc.as_secs_f64()
    );
    for (who, s) in [("ours", &so), ("Firecracker", &sf)] {
        let errs = validate(&p.spec, "BalloonStats", s);
        assert!(errs.is_empty(), "{who}: {s}: {errs:?}");
        for k in [
            "target_pages",
            "actual_pages",
            "target_mib",
            "actual_mib",
            "free_memory",
            "total_memory",
            "available_memory",
        ] {
            assert!(
                s.get(k).is_some_and(Value::is_u64),
                "{who}: {k} missing: {s}"
            );
        }
    }
    let keys = |v: &Value| {
        v.as_object()
            .map(|o| o.keys().cloned().collect::<BTreeSet<_>>())
    };
    assert_eq!(
        keys(&so),
        keys(&sf),
        "statistics keys: ours {so}, Firecracker {sf}"
    );
    let total = so["total_memory"].as_u64().unwrap_or(0);
    assert_eq!(
        total,
        sf["total_memory"].as_u64().unwrap_or(1),
        "same guest, same total"
    );

    // Pause and resume.
    p.same("PATCH", "/vm", Some(json!({"state": "Paused"})));
    let (i, _) = p.same("GET", "/", None);
    assert_eq!(i["state"], "Paused", "{i}");
    p.same("PATCH", "/vm", Some(json!({"state": "Paused"})));
    p.same("PATCH", "/vm", Some(json!({"state": "Resumed"})));
    let (i, _) = p.same("GET", "/", None);
    assert_eq!(i["state"], "Running", "{i}");
    p.same("PATCH", "/vm", Some(json!({"state": "Resumed"})));

    // The balloon: too big refused, 8 MiB reached by both drivers.
    p.same("PATCH", "/balloon", Some(json!({"amount_mib": 1000})));
    p.same("PATCH", "/balloon", Some(json!({"amount_mib": 8})));
    let (b, _) = p.same("GET", "/balloon", None);
    assert_eq!(b["amount_mib"], 8, "{b}");
    let reached = |v: &Value| v["actual_mib"] == 8;
    let t = Instant::now();
    let [(_, bo), (_, bf)] = p.wait_both("/balloon/statistics", SLOW_GUEST, t, reached);
    loud!(
        "{name}: balloon at 8 MiB: ours {:.1} s, Firecracker {:.1} s after PATCH /balloon",
        bo.as_secs_f64(),
        bf.as_secs_f64()
    );
    let (o, f) = p.both("GET", "/balloon/statistics", None, None);
    assert_eq!((o.status, f.status), (200, 200), "{o:?} {f:?}");
    p.check_spec("GET", "/balloon/statistics", &o, &f);
    for k in ["target_pages", "actual_pages", "target_mib", "actual_mib"] {
        assert_eq!(
            o.body[k], f.body[k],
            "{k}: ours {}, Firecracker {}",
            o.body, f.body
        );
    }
    assert_eq!(o.body["target_pages"], 2048, "{}", o.body);
    assert_eq!(
        keys(&o.body),
        keys(&f.body),
        "ours {}, Firecracker {}",
        o.body,
        f.body
    );

    // Ctrl-Alt-Del: both guests restart (reboot=k), both monitors exit 0.
    // The guests' init must run first: statistics come from the balloon
    // driver, which probes before the keyboard driver binds, and a key press
    // before that is lost (for Firecracker as for us).
    for m in [&p.ours, &p.fc] {
        assert!(
            m.wait_output("NPROC", SLOW_GUEST),
            "{}: no NPROC within {SLOW_GUEST:?}\n{}",
            m.name,
            m.tail(40)
        );
    }
    p.same(
        "PUT",
        "/actions",
        Some(json!({"action_type": "SendCtrlAltDel"})),
    );
    let ((so, to), (sf, tf)) = std::thread::scope(|s| {
        let (ours, fc) = (&mut p.ours, &mut p.fc);
        let o = s.spawn(move || ours.wait_exit(SLOW_GUEST));
        let f = fc.wait_exit(SLOW_GUEST);
        (o.join().expect("ours waited"), f)
    });
    assert!(sf.success(), "Firecracker: {sf:?}\n{}", p.fc.tail(40));
    assert!(so.success(), "ours: {so:?}\n{}", p.ours.tail(40));
    loud!(
        "{name}: SendCtrlAltDel -> exit 0: ours {:.2} s, Firecracker {:.2} s; {} calls, whole test {:.1} s",
        to.as_secs_f64(),
        tf.as_secs_f64(),
        p.calls,
        t0.elapsed().as_secs_f64()
    );
}
