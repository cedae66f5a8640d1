//! The host kernel's free page reporting, seen from a benchmark: how much
//! memory this kernel handed back to its hypervisor while a timed section
//! ran.
//!
//! Where the benchmark host is itself a virtual machine whose kernel
//! reports free memory (virtio-balloon free page reporting), every block
//! of `2^page_reporting_order` pages a release frees is reported about
//! two seconds later, by a kworker of normal priority, and the hypervisor
//! takes it back. That work lands inside whatever the benchmark times
//! next: in paired runs on the development VM, turning it off removed the
//! slowest `destroy` calls and table-lock holds (DESIGN, "Free page
//! reporting in the benchmarks"). Benchmarks record what was reported
//! while they ran and in each timed section, so that a run and a slow
//! repetition can be read against it; the report's machine table shows
//! the order.
//!
//! Invariants: reading is best effort and never fails a benchmark. The
//! cumulative counter (`reported_kib`) is not in every kernel (mainline
//! has only the order): where it is missing, [`Reported::start`] gives
//! `None` and the fields stay empty, never zero.

use std::path::Path;

const PARAMS: &str = "/sys/module/page_reporting/parameters";

/// The order of the free blocks this kernel reports to its hypervisor,
/// `None` where nothing reports (no `page_reporting` module). The
/// hypervisor refaults reported memory at its next touch, which a first
/// touch here pays: the launch cycles ran slower with it on.
pub(crate) fn order() -> Option<u32> {
    param("page_reporting_order")
}

/// KiB this kernel has reported to its hypervisor since boot, where it
/// exposes the counter.
fn reported_kib() -> Option<u64> {
    param("reported_kib")
}

/// One of the module's parameters, `None` where it is missing or not a
/// number.
fn param<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::fs::read_to_string(Path::new(PARAMS).join(name))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A window over the host's reporting counter, opened before a timed
/// section.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Reported {
    kib0: u64,
}

impl Reported {
    /// Opens a window; `None` where the kernel has no counter.
    pub(crate) fn start() -> Option<Self> {
        reported_kib().map(|kib0| Self { kib0 })
    }

    /// MiB reported since [`Reported::start`] (0 if the counter went
    /// backwards or disappeared).
    pub(crate) fn mib(self) -> f64 {
        let kib = reported_kib().map_or(0, |k| k.saturating_sub(self.kib0));
        (kib as f64 / 1024.0 * 10.0).round() / 10.0
    }
}

/// Closes an optional window: the MiB reported in it, or nothing where
/// the counter is missing.
pub(crate) fn mib_since(w: Option<Reported>) -> Option<f64> {
    w.map(Reported::mib)
}

/// Timed repetitions split by whether the host reported memory during
/// them: what a benchmark measured (`values`), paired with the MiB
/// reported in the same windows (`mib`, same order).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Overlap {
    /// Values of the repetitions during which the host reported memory.
    pub(crate) with: Vec<f64>,
    /// Values of the others.
    pub(crate) without: Vec<f64>,
    /// MiB reported in all the windows.
    pub(crate) mib: f64,
}

impl Overlap {
    /// Pairs `values` with `mib`; `None` where the host had no counter
    /// (no `mib`) or the two do not pair up (a result from another
    /// version).
    pub(crate) fn split(values: &[f64], mib: &[f64]) -> Option<Self> {
        if mib.is_empty() || mib.len() != values.len() {
            return None;
        }
        let (with, without): (Vec<_>, Vec<_>) = values.iter().zip(mib).partition(|(_, &m)| m > 0.0);
        Some(Self {
            with: with.into_iter().map(|(&v, _)| v).collect(),
            without: without.into_iter().map(|(&v, _)| v).collect(),
            mib: mib.iter().sum(),
        })
    }

    /// Adds another row's repetitions.
    pub(crate) fn merge(mut self, other: Self) -> Self {
        self.with.extend(other.with);
        self.without.extend(other.without);
        self.mib += other.mib;
        self
    }

    /// "In N of M `what` the host kernel reported free memory to its
    /// hypervisor (X GiB in all): `measure` a median of A `unit` (max B)
    /// in those, against C (max D) in the others", or "In none of the M
    /// `what` did ...". Says what the counter did in the windows, no more:
    /// it moves once the guest kernel has reported a batch, and what the
    /// hypervisor does with the batch is not seen from here.
    pub(crate) fn text(&self, what: &str, measure: &str, unit: &str) -> String {
        let n = self.with.len() + self.without.len();
        let stat = |v: &[f64]| {
            let max = v.iter().copied().fold(f64::MIN, f64::max);
            format!(
                "a median of {:.3} {unit} (max {max:.3})",
                crate::rng::median(v)
            )
        };
        if self.with.is_empty() {
            return format!(
                "In none of the {n} {what} did the host kernel's counter of reported memory move ({measure} {})",
                stat(&self.without)
            );
        }
        let others = if self.without.is_empty() {
            String::new()
        } else {
            format!(", against {} in the others", stat(&self.without))
        };
        format!(
            "In {} of {n} {what} the host kernel reported free memory to its hypervisor ({:.2} GiB in all): {measure} {} in those{others}",
            self.with.len(),
            self.mib / 1024.0,
            stat(&self.with),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_splits_repetitions_by_reporting() {
        let o = Overlap::split(&[0.05, 0.5, 0.04, 0.7], &[0.0, 64.0, 0.0, 128.0]).unwrap();
        assert_eq!(o.with, vec![0.5, 0.7]);
        assert_eq!(o.without, vec![0.05, 0.04]);
        assert_eq!(o.mib, 192.0);
        let t = o.text("teardowns", "`destroy` took", "ms");
        assert!(
            t.starts_with("In 2 of 4 teardowns the host kernel reported free memory"),
            "{t}"
        );
        assert!(t.contains("0.19 GiB"), "{t}");
        assert!(
            t.contains("a median of 0.600 ms (max 0.700) in those"),
            "{t}"
        );
        assert!(
            t.contains("a median of 0.045 ms (max 0.050) in the others"),
            "{t}"
        );
        // No counter, or lists that do not pair: nothing to say.
        assert_eq!(Overlap::split(&[1.0], &[]), None);
        assert_eq!(Overlap::split(&[1.0, 2.0], &[3.0]), None);
        let m = Overlap::split(&[1.0], &[0.0])
            .unwrap()
            .merge(Overlap::split(&[2.0], &[2.0]).unwrap());
        assert_eq!((m.with, m.without, m.mib), (vec![2.0], vec![1.0], 2.0));
        let none = Overlap::split(&[1.0, 3.0], &[0.0, 0.0]).unwrap().text(
            "gathers",
            "the longest hold was",
            "µs",
        );
        assert_eq!(
            none,
            "In none of the 2 gathers did the host kernel's counter of reported memory move (the longest hold was a median of 2.000 µs (max 3.000))"
        );
        let all = Overlap::split(&[1.0], &[1024.0])
            .unwrap()
            .text("gathers", "x", "µs");
        assert!(
            all.ends_with("(1.00 GiB in all): x a median of 1.000 µs (max 1.000) in those"),
            "{all}"
        );
    }
}
