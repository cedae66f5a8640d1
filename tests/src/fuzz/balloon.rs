//! `balloon_mmio`: the virtio-mmio register file and the balloon's queues
//! (inflate, deflate, stats, free page reporting), driven by arbitrary
//! register accesses and arbitrary guest memory contents, on the monitor's
//! own guest memory and stage-2 table made without KVM.
//!
//! The input is a feature offer and then a list of operations: raw register
//! reads and writes of any offset and width, writes of arbitrary bytes to
//! guest memory, and a few driver-shaped shortcuts so the fuzzer reaches
//! the queues quickly (the whole initialization sequence with chosen
//! features, a descriptor, an available ring update, a PFN array, a
//! notify), plus the host's side (a new target, a stats request).
//!
//! **Properties** (besides no panic, no hang and no host access outside
//! guest RAM, which the guard pages and AddressSanitizer turn into
//! crashes):
//! - nothing below the reserved floor ([`FLOOR`]) is ever ballooned or
//!   discarded, and nothing past the end of RAM ever becomes mapped
//!   (rules `balloon_reserved_low`, `balloon_bounds`);
//! - the device releases no more than it was given: bytes released ≤
//!   pages inflated × 4 KiB + bytes reported;
//! - the device status only holds defined bits, the interrupt status
//!   only bits 0 and 1;
//! - a reset (status 0) always brings the device back to status 0 with
//!   no queue ready;
//! - teardown (release of all memory, unmap) succeeds afterwards.

use std::sync::Arc;

use guest_mm::{Gpa, PageState};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_STATUS,
};
use vmm::devices::virtio::balloon::{Balloon, BalloonConfig, BalloonTransport};
use vmm::devices::virtio::mmio::{VirtioMmio, F_VERSION_1};
use vmm::devices::virtio::BusDevice;
use vmm::{Backing, MemoryConfig, NoHook, PageSize, VmMemory};

use super::Input;

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
/// Guest RAM of every case.
pub const RAM: u64 = 4 * MIB;
/// The device never releases below this (Linux's floor).
pub const FLOOR: u64 = MIB;
/// The driver's area: queue `i`'s rings at `AREA + i * 16 KiB`, buffers
/// from `BUFS`.
pub const AREA: u64 = 2 * MIB;
const BUFS: u64 = AREA + 0x1_0000;
const AREA_LEN: u64 = MIB;
/// Size of the MMIO window the register accesses fall in.
const WINDOW: u64 = 0x1000;
/// Most operations one input runs.
const MAX_OPS: usize = 96;
/// Status bits a device may hold: ACKNOWLEDGE, DRIVER, DRIVER_OK,
/// FEATURES_OK, NEEDS_RESET, FAILED.
const STATUS_BITS: u32 = 1 | 2 | 4 | 8 | 64 | 128;

fn ring(q: u64) -> (u64, u64, u64) {
    let base = AREA + (q % 4) * 0x4000;
    (base, base + 0x1000, base + 0x2000)
}

struct Case {
    dev: Arc<VirtioMmio<Balloon>>,
    mem: vmm::GuestAccess,
    /// Next available index per queue (what the shortcuts publish).
    avail: [u16; 4],
}

impl Case {
    fn w32(&self, off: u32, v: u32) {
        self.dev.write(u64::from(off), &v.to_le_bytes());
    }

    fn r32(&self, off: u32) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    /// Guest memory writes may fail (ballooned page): the guest's problem.
    fn put(&mut self, gpa: u64, b: &[u8]) {
        let _ = self.mem.write(gpa, b);
    }

    /// The driver's initialization with `features`, `queues` rings of
    /// `size` entries and DRIVER_OK if `ok`.
    fn init(&mut self, features: u64, queues: u32, size: u32, ok: bool) {
        let f = features | F_VERSION_1;
        for s in [0, 1, 3] {
            self.w32(VIRTIO_MMIO_STATUS, s);
        }
        self.w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.w32(VIRTIO_MMIO_DRIVER_FEATURES, f as u32);
        self.w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.w32(VIRTIO_MMIO_DRIVER_FEATURES, (f >> 32) as u32);
        self.w32(VIRTIO_MMIO_STATUS, 0xb);
        for i in 0..queues {
            let (d, a, u) = ring(u64::from(i));
            self.w32(VIRTIO_MMIO_QUEUE_SEL, i);
            self.w32(VIRTIO_MMIO_QUEUE_NUM, size);
            for (lo, hi, x) in [
                (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, d),
                (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, a),
                (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH, u),
            ] {
                self.w32(lo, x as u32);
                self.w32(hi, (x >> 32) as u32);
            }
            self.w32(VIRTIO_MMIO_QUEUE_READY, 1);
        }
        self.avail = [0; 4];
        if ok {
            self.w32(VIRTIO_MMIO_STATUS, 0xf);
        }
    }

    fn check(&self) {
        let t = self.dev.lock();
        let status = t.status();
        assert_eq!(
            status & !STATUS_BITS,
            0,
            "undefined status bits {status:#x}"
        );
        let isr = t.interrupt_status();
        assert_eq!(isr & !3, 0, "undefined interrupt bits {isr:#x}");
        let c = t.device().counters();
        assert!(
            c.bytes_released <= c.pages_inflated * PAGE + c.bytes_reported,
            "released more than given: {c:?}"
        );
    }
}

/// Every page below [`FLOOR`] is present and nothing past RAM is mapped.
fn check_table(memory: &VmMemory) {
    let table = memory.stage2().table();
    for gpa in (0..FLOOR).step_by(PAGE as usize) {
        let s = table.query(Gpa(gpa));
        assert!(
            matches!(s, PageState::Present { .. }),
            "reserved page {gpa:#x} is {s:?}"
        );
    }
    for gpa in (RAM..RAM + 64 * PAGE).step_by(PAGE as usize) {
        let s = table.query(Gpa(gpa));
        assert!(
            matches!(s, PageState::Unmapped),
            "page {gpa:#x} past RAM is {s:?}"
        );
    }
}

/// Runs one input; panics if a property fails.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let offer = inp.u8();
    let offered = BalloonConfig {
        stats: offer & 1 != 0,
        deflate_on_oom: offer & 2 != 0,
        reporting: offer & 4 != 0,
    };
    let memory = Arc::new(
        VmMemory::new(
            MemoryConfig {
                size: vmm::MemSize::from_bytes(RAM).expect("valid size"),
                backing: Backing::Anon,
                page_size: PageSize::Size4K,
            },
            Arc::new(NoHook),
            None,
        )
        .expect("guest memory without KVM"),
    );
    let dev = Arc::new(VirtioMmio::new(BalloonTransport::balloon(
        Arc::clone(&memory),
        offered,
        FLOOR,
    )));
    let mut c = Case {
        dev,
        mem: memory.access(),
        avail: [0; 4],
    };
    let mut ops = 0;
    while !inp.is_empty() && ops < MAX_OPS {
        ops += 1;
        match inp.u8() % 12 {
            0 => {
                let off = (u32::from(inp.u16()) % WINDOW as u32) & !3;
                c.w32(off, inp.u32());
            }
            1 => {
                let off = (u32::from(inp.u16()) % WINDOW as u32) & !3;
                let _ = c.r32(off);
            }
            2 => {
                // Any offset (even outside the window) and width.
                let off = u64::from(inp.u16());
                let len = [1usize, 2, 4, 8, 3, 0][usize::from(inp.u8() % 6)];
                if inp.u8() & 1 == 0 {
                    let b = inp.take(len).to_vec();
                    c.dev.write(off, &b);
                } else {
                    let mut b = vec![0u8; len];
                    c.dev.read(off, &mut b);
                }
            }
            3 => {
                // Arbitrary bytes anywhere in the driver's area.
                let gpa = AREA + u64::from(inp.u32()) % AREA_LEN;
                let b = inp.bytes();
                c.put(gpa, b);
            }
            4 => {
                let f = u64::from(inp.u8()) << 1 | u64::from(inp.u8() & 1) << 32;
                let queues = u32::from(inp.u8() % 5);
                let size = [256u32, 8, 1, 0, 255, 512, 64][usize::from(inp.u8() % 7)];
                let ok = !inp.u8().is_multiple_of(4);
                c.init(f, queues, size, ok);
            }
            5 => {
                // A descriptor: in the buffers, anywhere in RAM, or raw.
                let q = u64::from(inp.u8());
                let i = u64::from(inp.u16() % 256);
                let kind = inp.u8();
                let raw = inp.u64();
                let addr = match kind % 3 {
                    0 => BUFS + raw % (AREA_LEN - 0x1_0000),
                    1 => raw % (RAM + MIB),
                    _ => raw,
                };
                let len = match kind / 3 % 3 {
                    0 => u32::from(inp.u16() % 0x4000),
                    1 => 4 * u32::from(inp.u8()),
                    _ => inp.u32(),
                };
                let flags = u16::from(inp.u8() % 8);
                let next = inp.u16();
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&addr.to_le_bytes());
                b[8..12].copy_from_slice(&len.to_le_bytes());
                b[12..14].copy_from_slice(&flags.to_le_bytes());
                b[14..].copy_from_slice(&next.to_le_bytes());
                c.put(ring(q).0 + 16 * i, &b);
            }
            6 => {
                // Publish heads on a queue's available ring.
                let q = usize::from(inp.u8() % 4);
                let n = inp.u8() % 8;
                let (_, avail, _) = ring(q as u64);
                for _ in 0..n {
                    let h = inp.u16() % 300;
                    let slot = u64::from(c.avail[q] % 256);
                    c.put(avail + 4 + 2 * slot, &h.to_le_bytes());
                    c.avail[q] = c.avail[q].wrapping_add(1);
                }
                let idx = c.avail[q];
                c.put(avail + 2, &idx.to_le_bytes());
            }
            7 => {
                let q = u32::from(inp.u8() % 6);
                c.w32(VIRTIO_MMIO_QUEUE_NOTIFY, q);
            }
            8 => {
                // A PFN array: mostly pages of RAM (and a little past it).
                let at = BUFS + u64::from(inp.u16()) * 4 % (AREA_LEN - 0x1_0000 - 1024);
                let n = usize::from(inp.u8() % 128);
                let mut b = Vec::with_capacity(4 * n);
                for _ in 0..n {
                    let p = match inp.u8() % 4 {
                        0 => inp.u32(),
                        _ => u32::from(inp.u16()) % ((RAM + MIB) / PAGE) as u32,
                    };
                    b.extend_from_slice(&p.to_le_bytes());
                }
                c.put(at, &b);
            }
            9 => c.dev.set_target_pages(inp.u32()),
            10 => c.dev.request_stats(),
            _ => {
                // A stats buffer: tag/value pairs.
                let at = BUFS + u64::from(inp.u16()) % (AREA_LEN - 0x1_0000 - 1024);
                let n = usize::from(inp.u8() % 16);
                let mut b = Vec::new();
                for _ in 0..n {
                    b.extend_from_slice(&(inp.u16() % 16).to_le_bytes());
                    b.extend_from_slice(&inp.u64().to_le_bytes());
                }
                c.put(at, &b);
            }
        }
        c.check();
    }
    check_table(&memory);
    // A reset always works.
    c.w32(VIRTIO_MMIO_STATUS, 0);
    {
        let t = c.dev.lock();
        assert_eq!(t.status(), 0, "reset left status {:#x}", t.status());
        assert!(
            t.queues().iter().all(|q| !q.ready()),
            "reset left a queue ready"
        );
    }
    drop(c);
    let memory = Arc::into_inner(memory).expect("the device let go of guest memory");
    memory.release_all().expect("teardown release");
    memory.close();
}
