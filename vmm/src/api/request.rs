//! Routing: an HTTP method, path and body become one typed [`Request`], or
//! a [`RequestError`] that says what was wrong.
//!
//! Invariants: the body is parsed into the route's model only (unknown
//! fields refused); a route that takes no body ignores one; nothing here
//! panics on any input. [`Request::phase`] is the one place that says which
//! calls are pre-boot or post-boot only, as Firecracker's API does.

use super::models::{
    ActionType, Balloon, BalloonStatsUpdate, BalloonUpdate, BootSource, InstanceAction, Logger,
    MachineConfig, MachineConfigUpdate, Metrics, VmState, VmStateUpdate,
};

/// One API call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `GET /`.
    GetInstance,
    /// `GET /version`.
    GetVersion,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `GET /balloon`.
    GetBalloon,
    /// `PUT /balloon`.
    PutBalloon(Balloon),
    /// `PATCH /balloon`.
    PatchBalloon(BalloonUpdate),
    /// `GET /balloon/statistics`.
    GetBalloonStats,
    /// `PATCH /balloon/statistics`.
    PatchBalloonStats(BalloonStatsUpdate),
    /// `PUT /actions`.
    Action(ActionType),
    /// `PATCH /vm`.
    PatchVm(VmState),
    /// `GET /vm/config`.
    GetVmConfig,
    /// `PUT /metrics`.
    PutMetrics(Metrics),
    /// `PUT /logger`.
    PutLogger(Logger),
    /// `GET /memory` (ours).
    GetMemory,
}

/// When a call is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before `InstanceStart` only.
    PreBoot,
    /// After `InstanceStart` only.
    PostBoot,
    /// Always.
    Any,
}

/// A request that cannot be routed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No such method and path.
    #[error("Invalid request method and/or path: {method} {path}.")]
    NoRoute {
        /// Method.
        method: String,
        /// Path.
        path: String,
    },
    /// A `PUT`/`PATCH` without a body, or a `PATCH` that names no field
    /// (Firecracker's words).
    #[error("Empty {0} request.")]
    Empty(&'static str),
    /// The body does not parse as the route's model.
    #[error(
        "An error occurred when deserializing the json body of a request: {0}. \
         See Firecracker's API reference for the fields this call takes."
    )]
    Body(serde_json::Error),
}

impl Request {
    /// Which life-cycle phase the call needs.
    pub fn phase(&self) -> Phase {
        match self {
            Request::PutMachineConfig(_)
            | Request::PatchMachineConfig(_)
            | Request::PutBootSource(_)
            | Request::PutBalloon(_)
            | Request::PutMetrics(_)
            | Request::PutLogger(_)
            | Request::Action(ActionType::InstanceStart) => Phase::PreBoot,
            // Firecracker answers these before the start with "not supported
            // before starting the microVM" (statistics and metrics exist only
            // once the VM runs).
            Request::Action(ActionType::SendCtrlAltDel | ActionType::FlushMetrics)
            | Request::PatchVm(_)
            | Request::GetBalloonStats => Phase::PostBoot,
            // `PATCH /balloon` and `PATCH /balloon/statistics` work "before or
            // after machine startup" in Firecracker's published spec
            // (firecracker.yaml), although Firecracker's code refuses them
            // before the start: we follow the spec.
            _ => Phase::Any,
        }
    }
}

fn body<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, RequestError> {
    serde_json::from_slice(b).map_err(RequestError::Body)
}

/// Route `method path` with `body`.
pub fn parse(method: &str, path: &str, b: &[u8]) -> Result<Request, RequestError> {
    let p = path.split('?').next().unwrap_or("");
    let p = if p.len() > 1 {
        p.trim_end_matches('/')
    } else {
        p
    };
    let body_method = match method {
        "PUT" => Some("PUT"),
        "PATCH" => Some("PATCH"),
        _ => None,
    };
    if let Some(m) = body_method {
        if b.iter().all(u8::is_ascii_whitespace) && is_route(method, p) {
            return Err(RequestError::Empty(m));
        }
    }
    Ok(match (method, p) {
        ("GET", "/") => Request::GetInstance,
        ("GET", "/version") => Request::GetVersion,
        ("GET", "/machine-config") => Request::GetMachineConfig,
        ("PUT", "/machine-config") => Request::PutMachineConfig(body(b)?),
        ("PATCH", "/machine-config") => {
            let u: MachineConfigUpdate = body(b)?;
            if u.is_empty() {
                return Err(RequestError::Empty("PATCH"));
            }
            Request::PatchMachineConfig(u)
        }
        ("PUT", "/boot-source") => Request::PutBootSource(body(b)?),
        ("GET", "/balloon") => Request::GetBalloon,
        ("PUT", "/balloon") => Request::PutBalloon(body(b)?),
        ("PATCH", "/balloon") => Request::PatchBalloon(body(b)?),
        ("GET", "/balloon/statistics") => Request::GetBalloonStats,
        ("PATCH", "/balloon/statistics") => Request::PatchBalloonStats(body(b)?),
        ("PUT", "/actions") => Request::Action(body::<InstanceAction>(b)?.action_type),
        ("PATCH", "/vm") => Request::PatchVm(body::<VmStateUpdate>(b)?.state),
        ("GET", "/vm/config") => Request::GetVmConfig,
        ("PUT", "/metrics") => Request::PutMetrics(body(b)?),
        ("PUT", "/logger") => Request::PutLogger(body(b)?),
        ("GET", "/memory") => Request::GetMemory,
        _ => {
            return Err(RequestError::NoRoute {
                method: method.into(),
                // Firecracker names the path without its leading slash.
                path: path.strip_prefix('/').unwrap_or(path).into(),
            });
        }
    })
}

/// Whether `method p` (normalized) is one of the routes that take a body.
fn is_route(method: &str, p: &str) -> bool {
    matches!(
        (method, p),
        (
            "PUT",
            "/machine-config" | "/boot-source" | "/balloon" | "/actions" | "/metrics" | "/logger"
        ) | (
            "PATCH",
            "/machine-config" | "/balloon" | "/balloon/statistics" | "/vm"
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(parse("GET", "/", b"").unwrap(), Request::GetInstance);
        assert_eq!(
            parse("PATCH", "/balloon/", br#"{"amount_mib": 64}"#).unwrap(),
            Request::PatchBalloon(BalloonUpdate { amount_mib: 64 })
        );
        assert_eq!(
            parse("PUT", "/actions", br#"{"action_type": "InstanceStart"}"#).unwrap(),
            Request::Action(ActionType::InstanceStart)
        );
        assert_eq!(
            parse("PATCH", "/vm", br#"{"state": "Paused"}"#).unwrap(),
            Request::PatchVm(VmState::Paused)
        );
        assert_eq!(
            parse("GET", "/balloon/statistics?x=1", b"").unwrap(),
            Request::GetBalloonStats
        );
    }

    #[test]
    fn phases_follow_firecracker() {
        let boot = BootSource {
            kernel_image_path: "k".into(),
            initrd_path: None,
            boot_args: None,
        };
        assert_eq!(Request::PutBootSource(boot).phase(), Phase::PreBoot);
        assert_eq!(
            Request::Action(ActionType::SendCtrlAltDel).phase(),
            Phase::PostBoot
        );
        assert_eq!(
            Request::PatchBalloon(BalloonUpdate { amount_mib: 1 }).phase(),
            Phase::Any
        );
        for r in [
            Request::GetBalloonStats,
            Request::Action(ActionType::FlushMetrics),
        ] {
            assert_eq!(r.phase(), Phase::PostBoot, "{r:?}");
        }
    }

    #[test]
    fn bad_requests_say_why() {
        for (m, p, b) in [
            ("GET", "/nope", &b""[..]),
            ("DELETE", "/balloon", b""),
            ("PUT", "/actions", b"{"),
            ("PUT", "/actions", br#"{"action_type": "Reboot"}"#),
            ("PATCH", "/balloon", br#"{"amount_mib": "x"}"#),
            ("PUT", "/machine-config", br#"{"vcpu_count": 1}"#),
            ("PUT", "/machine-config", &[0xff; 3]),
        ] {
            let e = parse(m, p, b).unwrap_err().to_string();
            assert!(!e.is_empty(), "{m} {p}");
        }
        let e = parse("GET", "/nope", b"").unwrap_err().to_string();
        assert_eq!(e, "Invalid request method and/or path: GET nope.");
        for (m, b) in [("PUT", &b""[..]), ("PATCH", b" \r\n")] {
            let e = parse(m, "/machine-config", b).unwrap_err().to_string();
            assert_eq!(e, format!("Empty {m} request."));
        }
        let e = parse("PATCH", "/machine-config", b"{}").unwrap_err();
        assert_eq!(e.to_string(), "Empty PATCH request.");
    }
}
