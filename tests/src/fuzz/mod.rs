//! The fuzz properties: one function per fuzz target, taking arbitrary
//! bytes and panicking exactly when a property fails. The cargo-fuzz
//! targets (`tests/fuzz/fuzz_targets/`, nightly, AddressSanitizer, run by
//! `tools/fuzz.sh`) call them with libFuzzer's inputs; the stable suite
//! (`tests/tests/fuzz_props.rs`) calls the same functions with proptest
//! inputs under a fixed seed, so CI checks the same properties on every
//! change.
//!
//! | target | module | what is driven |
//! |---|---|---|
//! | `balloon_mmio` | [`balloon`] | the virtio-mmio register file and the balloon's four queues over guest memory the input writes |
//! | `api` | [`api`] | raw HTTP/1.1 through the API server's connection handling, routing and the service's handlers (no VM) |
//! | `loader` | [`loader`] | the kernel/initrd checks and loader on arbitrary files, into guest memory of arbitrary (bounded) size |
//! | `layout` | [`layout`] | the e820 memory map and MP table builders on arbitrary RAM sizes and vCPU counts |
//! | `legacy_io` | [`legacy`] | the I/O port bus of a Linux guest (8250 console, i8042) as vCPU exits drive it, with host input and Ctrl-Alt-Del between |
//!
//! No target needs `/dev/kvm`. Guest memory is the monitor's own
//! ([`vmm::VmMemory`] with no VM, or [`vmm::memory::GuestRam`]), whose
//! mappings have `PROT_NONE` guards on both sides
//! ([`vmm::memory::GUARD`]): a host access that runs off guest RAM faults,
//! which the fuzzer reports as a crash.

pub mod api;
pub mod balloon;
pub mod layout;
pub mod legacy;
pub mod loader;
pub mod scratch;

/// Reads fuzz input front to back; reads past the end return zeros, so any
/// input decodes.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.data.split_at(n.min(self.data.len()));
        self.data = b;
        a
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.data.len())
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.take(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A length-prefixed (one byte) slice.
    pub fn bytes(&mut self) -> &'a [u8] {
        let n = usize::from(self.u8());
        self.take(n)
    }
}
