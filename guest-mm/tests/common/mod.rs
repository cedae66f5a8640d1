//! Helpers shared by the integration tests.
//!
//! [`check_order`] guards `unhook_order` (a release outside its
//! invalidation) and `grace_period` (a release with no grace period
//! completed since its invalidation started) for every test that logs.
#![allow(dead_code)]

use std::sync::{Arc, Mutex, Weak};

use guest_mm::{
    BackingKind, BackingRegion, Gpa, Hva, Invalidation, InvalidationSubscriber, PageSize, Perms,
    Stage2Table, TableConfig,
};

/// A fake host address range: never dereferenced by these tests.
pub const FAKE_HVA: u64 = 0x1000_0000_0000;
/// Length of the fake range.
pub const FAKE_LEN: u64 = 64 << 30;

/// Everything a flush did, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ev {
    Start(u64, u64),
    End(u64, u64),
    Release(u64, u64),
    /// The table's count of completed grace periods, logged right before
    /// every `Start` and every `Release`.
    Gp(u64),
}

pub type Log = Arc<Mutex<Vec<Ev>>>;

pub struct Recorder(pub Log);

impl InvalidationSubscriber for Recorder {
    fn invalidate_range_start(&self, inv: &Invalidation) {
        self.0
            .lock()
            .unwrap()
            .push(Ev::Start(inv.start.0, inv.end.0));
    }
    fn invalidate_range_end(&self, inv: &Invalidation) {
        self.0.lock().unwrap().push(Ev::End(inv.start.0, inv.end.0));
    }
}

/// Logs the table's grace-period count at every `invalidate_range_start`
/// (registered before the [`Recorder`], so it lands right before `Start`).
struct GpProbe(Log, Weak<Stage2Table>);

impl InvalidationSubscriber for GpProbe {
    fn invalidate_range_start(&self, _inv: &Invalidation) {
        self.0.lock().unwrap().push(Ev::Gp(grace_periods(&self.1)));
    }
}

fn grace_periods(t: &Weak<Stage2Table>) -> u64 {
    t.upgrade().map_or(0, |t| t.grace_periods())
}

/// A table over a simulated backing at FAKE_HVA whose releases and
/// invalidations are logged, each release and invalidation start with the
/// grace-period count just before it.
pub fn simulated_table(cfg: TableConfig) -> (Arc<Stage2Table>, Log) {
    let t = Stage2Table::new(cfg).unwrap();
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let l2 = log.clone();
    let w = Arc::downgrade(&t);
    t.register_backing(BackingRegion {
        hva: Hva(FAKE_HVA),
        len: FAKE_LEN,
        kind: BackingKind::Simulated {
            hook: Some(Arc::new(move |h: Hva, len| {
                let gp = grace_periods(&w);
                let mut l = l2.lock().unwrap();
                l.push(Ev::Gp(gp));
                l.push(Ev::Release(h.0, len));
            })),
        },
    })
    .unwrap();
    t.register_subscriber(Arc::new(GpProbe(log.clone(), Arc::downgrade(&t))))
        .unwrap();
    t.register_subscriber(Arc::new(Recorder(log.clone())))
        .unwrap();
    (t, log)
}

/// Check the log: every release happens inside an open invalidation whose
/// range covers the released pages' guest addresses (hva - FAKE_HVA + gpa_off),
/// and after a grace period that ended after that invalidation started
/// (invariant 1: unhook, invalidate and wait, then release).
/// Returns the number of releases checked.
pub fn check_order(log: &[Ev], hva_to_gpa: impl Fn(u64) -> u64) -> u64 {
    check_order_with(log, |h, len, s, e| {
        let g = hva_to_gpa(h);
        g >= s && g + len <= e
    })
}

/// Like [`check_order`] with a custom coverage predicate
/// `(hva, len, inv_start, inv_end) -> covered`.
/// Returns the number of releases checked.
pub fn check_order_with(log: &[Ev], covered: impl Fn(u64, u64, u64, u64) -> bool) -> u64 {
    let mut open: Option<(u64, u64)> = None;
    // Grace periods completed when the open invalidation started.
    let mut gp_at_start = None;
    let mut last_gp = None;
    let mut releases = 0u64;
    for ev in log {
        match *ev {
            Ev::Gp(n) => last_gp = Some(n),
            Ev::Start(s, e) => {
                assert!(open.is_none(), "nested invalidation");
                open = Some((s, e));
                gp_at_start = last_gp.take();
                assert!(gp_at_start.is_some(), "no grace-period count before Start");
            }
            Ev::End(s, e) => {
                assert_eq!(open, Some((s, e)), "end without matching start");
                open = None;
            }
            Ev::Release(h, len) => {
                let (s, e) =
                    open.expect("release outside an invalidation: freed before invalidate");
                assert!(
                    covered(h, len, s, e),
                    "release {h:#x}+{len:#x} not covered by invalidation {s:#x}..{e:#x}"
                );
                let now = last_gp
                    .take()
                    .expect("no grace-period count before Release");
                let then = gp_at_start.unwrap_or(u64::MAX);
                assert!(
                    now > then,
                    "release {h:#x}+{len:#x} without a grace period since its invalidation \
                     started ({then} grace periods then, {now} at the release)"
                );
                releases += 1;
            }
        }
    }
    assert!(open.is_none(), "invalidation never ended");
    releases
}

/// An anonymous private mapping, unmapped on drop.
pub struct Anon {
    pub addr: u64,
    pub len: u64,
}

impl Anon {
    pub fn new(len: u64, huge: bool) -> Anon {
        // SAFETY: plain anonymous mapping, checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize + (2 << 20),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let addr = (p as u64 + (2 << 20) - 1) & !((2 << 20) - 1);
        let adv = if huge {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        // SAFETY: inside the mapping.
        unsafe { libc::madvise(addr as *mut _, len as usize, adv) };
        Anon { addr, len }
    }
    pub fn touch(&self) {
        for off in (0..self.len).step_by(4096) {
            // SAFETY: inside the mapping.
            unsafe { ((self.addr + off) as *mut u64).write_volatile(off | 1) };
        }
    }
    pub fn gpa(&self) -> Gpa {
        Gpa(0)
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: our mapping (the over-mapped head/tail leak harmlessly).
        unsafe { libc::munmap(self.addr as *mut _, self.len as usize) };
    }
}

/// `len` bytes of touched (resident) anonymous memory without THP, and a
/// table that maps them at GPA 0 with 4 KiB leaves as anonymous backing.
pub fn anon_table_4k(len: u64) -> (Anon, Arc<Stage2Table>) {
    anon_table_4k_as(len, BackingKind::Anonymous)
}

/// Like [`anon_table_4k`], with the memory registered as backing of `kind`.
pub fn anon_table_4k_as(len: u64, kind: BackingKind) -> (Anon, Arc<Stage2Table>) {
    let mem = Anon::new(len, false);
    mem.touch();
    let t = Stage2Table::new(TableConfig::default()).unwrap();
    t.register_backing(BackingRegion {
        hva: Hva(mem.addr),
        len,
        kind,
    })
    .unwrap();
    t.map(Gpa(0), Hva(mem.addr), len, Perms::RW, PageSize::Size4K)
        .unwrap();
    (mem, t)
}
