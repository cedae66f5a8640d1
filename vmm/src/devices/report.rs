//! The report device: how the default guest tells the VMM what it did.
//!
//! Protocol: the guest writes a 32-bit opcode to the MMIO address
//! [`REPORT_MMIO`] (a GPA without memory slot, so every write exits to the
//! VMM from any CPL);
//! arguments travel in general registers, which the VMM reads with
//! `KVM_GET_REGS` on that exit (one exit per report, no shared buffer):
//!
//! | opcode | meaning | arguments |
//! | --- | --- | --- |
//! | [`OP_HELLO`] | the vCPU reached its ring-3 entry | — |
//! | [`OP_RESULT`] | pattern verified | rdi/rsi share start/end, r8 bad words, r9 first bad GPA (or !0) |
//! | [`OP_PROBE`] | answer to a probe command | rsi sequence, rdi GPA, r8 OR of the page's words, r9 first word, r10 TSC cycles the read took |
//! | [`OP_DONE`] | the vCPU is finished and spins | — |
//! | [`crate::guest::balloon::OP_BALLOON_ERROR`] (5) | the guest's balloon driver stopped; the vCPU spins | rdi error code, rsi detail |
//! | [`OP_IDLE`] | nothing to do: return when there may be work (the guest looks again, and may come back) | — |
//!
//! The exception stubs write the vector to [`EXC_PORT`] (at CPL0) and halt.

/// MMIO address of the report device.
pub const REPORT_MMIO: u64 = crate::guest::layout::MMIO_BASE;
/// Port the exception stubs report to.
pub const EXC_PORT: u16 = 0x511;
/// Entry reached.
pub const OP_HELLO: u32 = 1;
/// Pattern verified (or not).
pub const OP_RESULT: u32 = 2;
/// Probe answer.
pub const OP_PROBE: u32 = 3;
/// Finished.
pub const OP_DONE: u32 = 4;
/// Idle: the vCPU thread blocks until the host may have given the guest
/// work (a command posted, a balloon target set), a pause or stop, or a
/// long backstop ([`crate::vstate::vcpu::IDLE_BACKSTOP`]); then the guest
/// runs again and re-checks. A wake-up between the guest's last look and
/// this report is not lost (see [`crate::vstate::vcpu`]).
pub const OP_IDLE: u32 = 6;

/// A vCPU's pattern result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PatternReport {
    /// vCPU index.
    pub vcpu: u32,
    /// Share start GPA.
    pub share_start: u64,
    /// Share end GPA.
    pub share_end: u64,
    /// Words that did not read back.
    pub bad_words: u64,
    /// First bad GPA, if any.
    pub first_bad: Option<u64>,
}

impl PatternReport {
    /// Whether the share verified.
    pub fn ok(&self) -> bool {
        self.bad_words == 0
    }

    /// 4 KiB pages verified.
    pub fn pages(&self) -> u64 {
        (self.share_end - self.share_start) / 4096
    }
}

/// A probe answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ProbeReport {
    /// The sequence number of the command answered.
    pub seq: u64,
    /// The page probed.
    pub gpa: u64,
    /// OR of all words of the page (0 iff the page reads all zeros).
    pub or_words: u64,
    /// The page's first word.
    pub first_word: u64,
    /// How long the guest took to read the page (TSC cycles converted with
    /// the vCPU's TSC frequency), ns; includes any demand fault.
    pub read_ns: u64,
}

/// A guest exception reported by a stub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct GuestException {
    /// vCPU index.
    pub vcpu: u32,
    /// Exception vector.
    pub vector: u32,
    /// Faulting RIP (from the exception frame).
    pub rip: u64,
    /// CR2 at the time (page faults).
    pub cr2: u64,
}

/// Whether exception `vector` pushes an error code.
pub fn has_error_code(vector: u32) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}
