//! The default guest: memory layout, set-up and initial vCPU state.
//!
//! The VMM builds everything a 64-bit guest needs so that no guest code runs
//! at CPL0 (emulated on shadow-paging hosts): identity page tables of 2 MiB
//! pages with U/S set, one GDT and TSS per vCPU, an IDT whose gates point at
//! the image's exception stubs, and then starts each vCPU directly in ring 3.
//!
//! Layout of the first 2 MiB of guest RAM (never given to the workload and
//! never released):
//!
//! | GPA | what |
//! | --- | --- |
//! | `0x1000` | IDT (exceptions 0-31, console gate 0x80) |
//! | `0x2000` | PML4 |
//! | `0x3000` | PDPT |
//! | `0x4000 ..` | one PD per GiB (at most 64) |
//! | `0x44000` | control page: console lock, probe mailbox |
//! | `0x45000` | PD of the MMIO window at 64 GiB (report device, virtio-balloon) |
//! | `0x46000` | balloon driver: inflate queue (descriptors, avail, used) |
//! | `0x47000` | balloon driver: deflate queue |
//! | `0x48000` | balloon driver: free page reporting queue |
//! | `0x50000` | the image (code) |
//! | `0x60000 + 4K*i` | vCPU i: GDT at +0, TSS at +0x80 |
//! | `0xA0000 + 4K*i` | vCPU i: ring-0 stack (exceptions) |
//! | `0x100000 + 4K*i` | vCPU i: ring-3 stack |
//! | `0x140000` | balloon driver: PFN array (16384 × le32, 64 KiB) |
//!
//! The workload RAM, `[2 MiB, mem)`, is split into 2 MiB-aligned shares, one
//! per vCPU; each vCPU writes `gpa ^ seed` to every 8-byte word of its share,
//! reads it back and reports. Under [`Workload::BalloonStress`] they keep
//! doing so (see [`stress`]) while vCPU 0's balloon driver follows the
//! host's target.
//!
//! Free below 2 MiB: `0x49000..0x50000`, `0xE0000..0x100000`,
//! `0x150000..0x200000`.

pub mod balloon;
pub mod image;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::SIZE_2M;

/// Guest physical layout constants.
pub mod layout {
    /// IDT.
    pub const IDT: u64 = 0x1000;
    /// PML4.
    pub const PML4: u64 = 0x2000;
    /// PDPT.
    pub const PDPT: u64 = 0x3000;
    /// First PD.
    pub const PD: u64 = 0x4000;
    /// Maximum number of PDs (GiB of RAM).
    pub const MAX_PDS: u64 = 64;
    /// Control page (console lock, probe mailbox).
    pub const CONTROL: u64 = 0x44000;
    /// PD mapping the MMIO window.
    pub const MMIO_PD: u64 = 0x45000;
    /// The MMIO window (report device), just above the largest RAM.
    pub const MMIO_BASE: u64 = 64 << 30;
    /// The balloon driver's three queue pages (inflate, deflate, free page
    /// reporting), used only by [`super::Workload::Balloon`] on vCPU 0.
    pub const BALLOON_QUEUES: u64 = 0x46000;
    /// End of the balloon driver's queue pages.
    pub const BALLOON_QUEUES_END: u64 = 0x49000;
    /// The balloon driver's PFN array (16 pages: `balloon::MAX_PFNS`), above
    /// the ring-3 stacks of the most vCPUs.
    pub const BALLOON_PFNS: u64 = 0x140000;
    /// End of the balloon driver's pages.
    pub const BALLOON_END: u64 = 0x150000;
    /// The guest image.
    pub const IMAGE: u64 = 0x50000;
    /// Space for the image.
    pub const IMAGE_MAX: u64 = 0x10000;
    /// Per-vCPU GDT + TSS pages.
    pub const PERCPU_GDT: u64 = 0x60000;
    /// Offset of the TSS in a per-vCPU GDT page.
    pub const TSS_OFFSET: u64 = 0x80;
    /// Per-vCPU ring-0 stacks.
    pub const PERCPU_KSTACK: u64 = 0xA0000;
    /// Per-vCPU ring-3 stacks.
    pub const PERCPU_USTACK: u64 = 0x10_0000;
    /// Where the workload's RAM begins.
    pub const WORKLOAD_START: u64 = 0x20_0000;
    /// The most vCPUs the layout has room for.
    pub const MAX_VCPUS: u32 = 64;
}

/// Offsets inside the control page.
pub mod control {
    /// u32 console spin lock taken by the guest around each line.
    pub const CONSOLE_LOCK: u64 = 0;
    /// u64 sequence, bumped by the host to post a command to vCPU 0.
    pub const SEQ: u64 = 8;
    /// u64 command: [`CMD_PROBE`] or [`CMD_EXIT`].
    pub const CMD: u64 = 16;
    /// u64 argument: the GPA to probe.
    pub const ARG: u64 = 24;
    /// Read the 4 KiB page at ARG and report (OR of its words, first word).
    pub const CMD_PROBE: u64 = 1;
    /// Leave the probe loop (or the balloon driver) and report done.
    pub const CMD_EXIT: u64 = 2;
    /// Balloon driver: report ARG pages below the balloon as free (free page
    /// reporting), then touch and verify them again.
    pub const CMD_REPORT_FREE: u64 = 3;
}

/// The control-page blocks of [`Workload::BalloonStress`].
///
/// vCPUs 1..N rewrite and verify their whole share in a loop (one *pass*
/// each time) until the command word holds [`control::CMD_EXIT`]. vCPU 0
/// runs the balloon driver and, whenever it is at its target with no new
/// command, rewrites and verifies the next [`CHUNK`](stress::CHUNK) of its
/// share below the balloon (starting at [`CURSOR`](stress::CURSOR)); a sweep
/// that reaches the balloon counts as one pass. Each vCPU keeps a block at
/// [`block`](stress::block)`(index)`: passes, bad words, first bad GPA
/// (u64 each, written by the guest only). A pass or chunk with bad words is
/// also reported with `OP_RESULT` (range, bad words, first bad GPA). The
/// pattern never changes, so a host reader sees `gpa ^ seed` in every word
/// the guest owns and has written once, whether or not the guest is
/// rewriting it.
pub mod stress {
    use super::{control, layout};

    /// u64: where vCPU 0's next chunk starts (0 outside this workload).
    pub const CURSOR: u64 = 0x1f8;
    /// The first per-vCPU block.
    pub const BLOCKS: u64 = 0x200;
    /// Bytes per block.
    pub const BLOCK: u64 = 0x18;
    /// Offset of the pass count in a block.
    pub const PASSES: u64 = 0;
    /// Offset of the bad-word count in a block.
    pub const BAD_WORDS: u64 = 8;
    /// Offset of the first bad GPA in a block (0: none).
    pub const FIRST_BAD: u64 = 16;
    /// Bytes vCPU 0 rewrites and verifies between two polls of the target.
    pub const CHUNK: u64 = 64 << 10;

    const _: () = {
        assert!(CURSOR >= crate::guest::balloon::status::END && CURSOR + 8 <= BLOCKS);
        assert!(BLOCKS + BLOCK * layout::MAX_VCPUS as u64 <= 0x1000);
        assert!(control::ARG + 8 <= crate::guest::balloon::status::STATE);
        assert!(CHUNK.is_multiple_of(4096));
    };

    /// Offset of vCPU `index`'s block in the control page.
    pub fn block(index: u32) -> u64 {
        BLOCKS + BLOCK * u64::from(index)
    }

    /// What one vCPU reported in its block.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
    pub struct VcpuStress {
        /// vCPU index.
        pub vcpu: u32,
        /// Passes over the share (vCPU 0: sweeps below the balloon).
        pub passes: u64,
        /// Words that did not read back, over all passes after the first.
        pub bad_words: u64,
        /// First bad GPA.
        pub first_bad: Option<u64>,
    }

    impl VcpuStress {
        /// Parses vCPU `index`'s block from the control page's bytes.
        pub fn parse(page: &[u8], index: u32) -> Option<Self> {
            let word = |off: u64| super::le_u64_at(page, block(index) + off);
            let first = word(FIRST_BAD)?;
            Some(Self {
                vcpu: index,
                passes: word(PASSES)?,
                bad_words: word(BAD_WORDS)?,
                first_bad: (first != 0).then_some(first),
            })
        }
    }
}

/// GDT selectors.
pub mod selectors {
    /// 64-bit kernel code.
    pub const KERNEL_CS: u16 = 0x08;
    /// Kernel data.
    pub const KERNEL_DS: u16 = 0x10;
    /// User data, RPL 3.
    pub const USER_DS: u16 = 0x18 | 3;
    /// 64-bit user code, RPL 3.
    pub const USER_CS: u16 = 0x20 | 3;
    /// TSS.
    pub const TSS: u16 = 0x28;
}

/// What the workload does after verifying its share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workload {
    /// Write, verify, report, stop.
    #[default]
    Verify,
    /// As `Verify`, then vCPU 0 serves probe commands from the control page
    /// until [`control::CMD_EXIT`], waiting for them with
    /// [`crate::devices::report::OP_IDLE`] after a short poll
    /// ([`IDLE_SPIN_CYCLES`]).
    Probe,
    /// Read the unmapped address [`FAULT_ADDR`] at once: a page fault that
    /// the exception stubs report (tests the IDT/TSS path).
    Fault,
    /// As `Verify`, then vCPU 0 runs the virtio-balloon driver (see
    /// [`balloon`]) until [`control::CMD_EXIT`]; the others stop.
    Balloon,
    /// As `Balloon`, but every vCPU keeps rewriting and verifying its
    /// pattern until [`control::CMD_EXIT`] (see [`stress`]): vCPU 0 below
    /// its balloon between polls, the others over their whole share.
    BalloonStress,
}

/// How long (TSC cycles, about 6 µs at 2.6 GHz) the guest polls for work
/// before it waits in the VMM with [`crate::devices::report::OP_IDLE`]: the
/// probe loop for a command, the balloon driver for a target change or a
/// command. A busy exchange is served by the poll; an idle guest blocks its
/// vCPU thread and costs no host CPU.
pub const IDLE_SPIN_CYCLES: u64 = 1 << 14;

/// The address the [`Workload::Fault`] guest reads (not mapped).
pub const FAULT_ADDR: u64 = 128 << 30;

/// Errors of guest set-up.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Too many vCPUs for the layout.
    #[error("{0} vCPUs requested but the default guest supports 1 to {max}: lower --vcpus", max = layout::MAX_VCPUS)]
    TooManyVcpus(u32),
    /// Not enough RAM to give each vCPU 2 MiB.
    #[error(
        "--mem {mem_mib} MiB is too small for {vcpus} vCPUs: the guest needs 2 MiB for itself \
         plus 2 MiB per vCPU, i.e. at least {need_mib} MiB"
    )]
    TooSmall {
        /// RAM MiB.
        mem_mib: u64,
        /// vCPUs.
        vcpus: u32,
        /// Minimum MiB.
        need_mib: u64,
    },
    /// The image does not fit.
    #[error("the guest image ({0} bytes) does not fit its slot")]
    ImageTooBig(usize),
    /// Writing guest memory failed.
    #[error("writing the guest set-up to guest memory failed: {0}")]
    Write(String),
}

/// The arguments a vCPU starts with (in registers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryArgs {
    /// vCPU index (rdx).
    pub index: u32,
    /// First GPA of its share (rdi).
    pub share_start: u64,
    /// End of its share (rsi).
    pub share_end: u64,
    /// Pattern seed (rcx).
    pub seed: u64,
    /// Workload mode (r9).
    pub workload: Workload,
}

/// Checks that `mem` bytes and `vcpus` fit the layout.
pub fn check_config(mem: u64, vcpus: u32) -> Result<(), GuestError> {
    if vcpus == 0 || vcpus > layout::MAX_VCPUS {
        return Err(GuestError::TooManyVcpus(vcpus));
    }
    let need = SIZE_2M * (1 + u64::from(vcpus));
    if mem < need {
        return Err(GuestError::TooSmall {
            mem_mib: mem >> 20,
            vcpus,
            need_mib: need >> 20,
        });
    }
    Ok(())
}

/// The share of vCPU `index` among `vcpus`: 2 MiB-aligned, covering
/// `[WORKLOAD_START, mem)`.
pub fn share(mem: u64, vcpus: u32, index: u32) -> (u64, u64) {
    let chunks = (mem - layout::WORKLOAD_START) / SIZE_2M;
    let n = u64::from(vcpus);
    let i = u64::from(index);
    let start = layout::WORKLOAD_START + chunks * i / n * SIZE_2M;
    let end = layout::WORKLOAD_START + chunks * (i + 1) / n * SIZE_2M;
    (start, end)
}

/// The little-endian `u64` at byte `off` of `page` (a copy of the control
/// page, or of a block in it); `None` past its end.
pub(crate) fn le_u64_at(page: &[u8], off: u64) -> Option<u64> {
    let o = usize::try_from(off).ok()?;
    let b: [u8; 8] = page.get(o..o.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_le_bytes(b))
}

fn write_u64(gm: &GuestMemoryMmap, gpa: u64, v: u64) -> Result<(), GuestError> {
    gm.write_obj(v, GuestAddress(gpa))
        .map_err(|e| GuestError::Write(e.to_string()))
}

/// Writes page tables, IDT, per-vCPU GDT/TSS and the image for a guest of
/// `mem` bytes and `vcpus` vCPUs.
pub fn setup(gm: &GuestMemoryMmap, mem: u64, vcpus: u32) -> Result<(), GuestError> {
    check_config(mem, vcpus)?;
    // Page tables: identity map [0, mem) with 2 MiB pages, P|RW|US (|PS).
    const TABLE: u64 = 0x7;
    const LEAF: u64 = 0x87;
    write_u64(gm, layout::PML4, layout::PDPT | TABLE)?;
    let gib = mem.div_ceil(1 << 30);
    for i in 0..gib.min(layout::MAX_PDS) {
        let pd = layout::PD + i * 0x1000;
        write_u64(gm, layout::PDPT + i * 8, pd | TABLE)?;
        for j in 0..512 {
            let addr = (i << 30) + j * SIZE_2M;
            if addr >= mem {
                break;
            }
            write_u64(gm, pd + j * 8, addr | LEAF)?;
        }
    }
    // Image.
    let img = image::image();
    if img.bytes.len() as u64 > layout::IMAGE_MAX {
        return Err(GuestError::ImageTooBig(img.bytes.len()));
    }
    gm.write_slice(img.bytes, GuestAddress(layout::IMAGE))
        .map_err(|e| GuestError::Write(e.to_string()))?;
    // IDT: 32 exception gates (DPL 0), interrupt gates on the kernel CS.
    let gate = |v: u64, off: u64, attr: u64| -> Result<(), GuestError> {
        let lo = (off & 0xffff)
            | (u64::from(selectors::KERNEL_CS) << 16)
            | (attr << 40)
            | ((off >> 16) & 0xffff) << 48;
        write_u64(gm, layout::IDT + v * 16, lo)?;
        write_u64(gm, layout::IDT + v * 16 + 8, off >> 32)
    };
    for v in 0..32u64 {
        gate(
            v,
            layout::IMAGE + img.exc_stubs + v * image::EXC_STUB_STRIDE,
            0x8e,
        )?;
    }
    // Vector 3 (`int3`) is the console gate, callable from ring 3.
    gate(3, layout::IMAGE + img.console_gate, 0xee)?;
    // The report device's MMIO page: a 2 MiB mapping of a GPA with no slot.
    write_u64(
        gm,
        layout::PDPT + (layout::MMIO_BASE >> 30) * 8,
        layout::MMIO_PD | TABLE,
    )?;
    write_u64(gm, layout::MMIO_PD, layout::MMIO_BASE | LEAF)?;
    // Per-vCPU GDT and TSS.
    for i in 0..u64::from(vcpus) {
        let gdt = layout::PERCPU_GDT + i * 0x1000;
        let tss = gdt + layout::TSS_OFFSET;
        let entries = [
            0,
            0x00af_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            0x00cf_f300_0000_ffff,
            0x00af_fb00_0000_ffff,
        ];
        for (k, e) in entries.iter().enumerate() {
            write_u64(gm, gdt + k as u64 * 8, *e)?;
        }
        let limit = 0x67u64;
        let tss_lo = (limit & 0xffff)
            | ((tss & 0xff_ffff) << 16)
            | (0x89 << 40)
            | ((limit >> 16) & 0xf) << 48
            | ((tss >> 24) & 0xff) << 56;
        write_u64(gm, gdt + 0x28, tss_lo)?;
        write_u64(gm, gdt + 0x30, tss >> 32)?;
        // TSS: RSP0 at +4, I/O map base beyond the limit (no bitmap).
        let kstack_top = layout::PERCPU_KSTACK + (i + 1) * 0x1000;
        write_u64(gm, tss + 4, kstack_top)?;
        gm.write_obj(0x68u16, GuestAddress(tss + 0x66))
            .map_err(|e| GuestError::Write(e.to_string()))?;
    }
    Ok(())
}

fn seg(selector: u16, type_: u8, dpl: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets the special registers of vCPU `index` for a direct CPL3 start in
/// long mode; `sregs` should come from `KVM_GET_SREGS`.
pub fn init_sregs(sregs: &mut kvm_sregs, index: u32) {
    let gdt = layout::PERCPU_GDT + u64::from(index) * 0x1000;
    sregs.cs = seg(selectors::USER_CS, 0xb, 3, 1, 0);
    let ds = seg(selectors::USER_DS, 0x3, 3, 0, 1);
    sregs.ds = ds;
    sregs.es = ds;
    sregs.fs = ds;
    sregs.gs = ds;
    sregs.ss = ds;
    sregs.tr = kvm_segment {
        base: gdt + layout::TSS_OFFSET,
        limit: 0x67,
        selector: selectors::TSS,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.gdt.base = gdt;
    sregs.gdt.limit = 0x37;
    sregs.idt.base = layout::IDT;
    sregs.idt.limit = 32 * 16 - 1;
    sregs.cr0 = 0x8005_0033;
    sregs.cr3 = layout::PML4;
    sregs.cr4 = 0x620;
    // LME | LMA.
    sregs.efer = 0x500;
}

/// The general registers a vCPU starts with.
pub fn init_regs(args: &EntryArgs) -> kvm_regs {
    let img = image::image();
    kvm_regs {
        rip: layout::IMAGE + img.entry,
        rsp: layout::PERCPU_USTACK + (u64::from(args.index) + 1) * 0x1000,
        rflags: 0x3002,
        rdi: args.share_start,
        rsi: args.share_end,
        rdx: u64::from(args.index),
        rcx: args.seed,
        r8: layout::CONTROL,
        r9: match args.workload {
            Workload::Verify => 0,
            Workload::Probe => 1,
            Workload::Fault => 2,
            Workload::Balloon => 3,
            Workload::BalloonStress => 4,
        },
        ..Default::default()
    }
}

/// The pattern word the guest writes at `gpa`.
pub fn pattern(gpa: u64, seed: u64) -> u64 {
    gpa ^ seed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_workload_ram() {
        let mem = 256 << 20;
        for n in 1..=7 {
            let mut next = layout::WORKLOAD_START;
            for i in 0..n {
                let (s, e) = share(mem, n, i);
                assert_eq!(s, next);
                assert!(e > s && s % SIZE_2M == 0 && e % SIZE_2M == 0);
                next = e;
            }
            assert_eq!(next, mem);
        }
    }

    #[test]
    fn config_limits() {
        assert!(check_config(4 << 20, 1).is_ok());
        assert!(matches!(
            check_config(4 << 20, 2),
            Err(GuestError::TooSmall { .. })
        ));
        assert!(matches!(
            check_config(1 << 30, 0),
            Err(GuestError::TooManyVcpus(0))
        ));
        assert!(matches!(
            check_config(1 << 30, 65),
            Err(GuestError::TooManyVcpus(65))
        ));
    }

    /// Every fixed structure below [`layout::WORKLOAD_START`], at its
    /// largest (64 PDs, 64 vCPUs): inside RAM, page-aligned, no overlaps.
    #[test]
    fn low_memory_layout_does_not_overlap() {
        let v = u64::from(layout::MAX_VCPUS);
        let mut areas = [
            ("IDT", layout::IDT, 0x1000),
            ("PML4", layout::PML4, 0x1000),
            ("PDPT", layout::PDPT, 0x1000),
            ("PDs", layout::PD, layout::MAX_PDS * 0x1000),
            ("control", layout::CONTROL, 0x1000),
            ("MMIO PD", layout::MMIO_PD, 0x1000),
            (
                "balloon queues",
                layout::BALLOON_QUEUES,
                layout::BALLOON_QUEUES_END - layout::BALLOON_QUEUES,
            ),
            (
                "balloon PFNs",
                layout::BALLOON_PFNS,
                layout::BALLOON_END - layout::BALLOON_PFNS,
            ),
            ("image", layout::IMAGE, layout::IMAGE_MAX),
            ("GDT/TSS", layout::PERCPU_GDT, v * 0x1000),
            ("kernel stacks", layout::PERCPU_KSTACK, v * 0x1000),
            ("user stacks", layout::PERCPU_USTACK, v * 0x1000),
        ];
        areas.sort_by_key(|a| a.1);
        for w in areas.windows(2) {
            let (a, b) = (w[0], w[1]);
            assert!(
                a.1 + a.2 <= b.1,
                "{} [{:#x}, {:#x}) overlaps {} at {:#x}",
                a.0,
                a.1,
                a.1 + a.2,
                b.0,
                b.1
            );
        }
        for (name, start, len) in areas {
            assert!(start.is_multiple_of(0x1000), "{name} is not page-aligned");
            assert!(
                start >= 0x1000 && start + len <= layout::WORKLOAD_START,
                "{name}"
            );
        }
        assert_eq!(
            layout::BALLOON_QUEUES_END - layout::BALLOON_QUEUES,
            3 * 0x1000,
            "three queue pages"
        );
        assert_eq!(balloon::queue_page(2), layout::BALLOON_QUEUES + 0x2000);
        // The balloon's window is inside the 2 MiB MMIO page the guest maps.
        let b = crate::devices::virtio::BALLOON_MMIO_BASE;
        assert!(b > layout::MMIO_BASE && b + 0x1000 <= layout::MMIO_BASE + SIZE_2M);
    }

    /// The device accepts the driver's rings where the guest puts them, and
    /// the guest's pages (rings, PFN array) can never be ballooned.
    #[test]
    fn device_accepts_the_driver_rings() {
        use crate::devices::virtio::queue::Queue;
        let (_ram, _s2, ram_layout) = crate::devices::virtio::testutil::ram();
        for i in 0..3 {
            let mut q = Queue::new(crate::devices::virtio::balloon::QUEUE_SIZE);
            q.size = balloon::QUEUE_SIZE;
            q.desc_table = balloon::queue_page(i) + balloon::DESC_OFFSET;
            q.avail_ring = balloon::queue_page(i) + balloon::AVAIL_OFFSET;
            q.used_ring = balloon::queue_page(i) + balloon::USED_OFFSET;
            assert_eq!(q.validate(&ram_layout), Ok(()));
        }
        assert!(!ram_layout.releasable(layout::BALLOON_QUEUES, 0x1000));
        assert!(!ram_layout.releasable(layout::BALLOON_PFNS, 0x1000));
        assert!(ram_layout.releasable(layout::WORKLOAD_START, 0x1000));
    }

    #[test]
    fn balloon_workload_register() {
        let args = EntryArgs {
            index: 0,
            share_start: layout::WORKLOAD_START,
            share_end: 2 * layout::WORKLOAD_START,
            seed: 1,
            workload: Workload::Balloon,
        };
        assert_eq!(init_regs(&args).r9, 3);
        assert_eq!(init_regs(&args).r8, layout::CONTROL);
    }

    #[test]
    fn stress_workload_register_and_blocks() {
        let args = EntryArgs {
            index: 1,
            share_start: layout::WORKLOAD_START,
            share_end: 2 * layout::WORKLOAD_START,
            seed: 1,
            workload: Workload::BalloonStress,
        };
        assert_eq!(init_regs(&args).r9, 4);
        let mut page = vec![0u8; 0x1000];
        let off = usize::try_from(stress::block(3)).unwrap();
        page[off..off + 8].copy_from_slice(&7u64.to_le_bytes());
        page[off + 8..off + 16].copy_from_slice(&2u64.to_le_bytes());
        page[off + 16..off + 24].copy_from_slice(&0x30_0008u64.to_le_bytes());
        let b = stress::VcpuStress::parse(&page, 3).unwrap();
        assert_eq!(
            (b.passes, b.bad_words, b.first_bad),
            (7, 2, Some(0x30_0008))
        );
        let last = stress::VcpuStress::parse(&page, layout::MAX_VCPUS - 1).unwrap();
        assert_eq!(last.first_bad, None);
        assert!(stress::VcpuStress::parse(&page[..0x7f0], layout::MAX_VCPUS - 1).is_none());
    }

    #[test]
    fn image_is_sane() {
        let img = image::image();
        assert!(!img.bytes.is_empty() && (img.bytes.len() as u64) < layout::IMAGE_MAX);
        assert_eq!(img.entry, 0);
        assert!(img.exc_stubs < img.bytes.len() as u64);
        // First stub: push imm8 0 (6a 00).
        let s = usize::try_from(img.exc_stubs).unwrap();
        assert_eq!(&img.bytes[s..s + 2], &[0x6a, 0x00]);
    }
}
