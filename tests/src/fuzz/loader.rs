//! `loader`: the kernel and initrd checks ([`vmm::boot::prepare`]) and the
//! loader ([`vmm::boot::Prepared::load`]) on arbitrary files, into guest
//! memory of arbitrary (bounded) size.
//!
//! The kernel is raw bytes, or a minimal valid x86-64 ELF (with or
//! without a PVH note) or bzImage (the image checks' own fixtures:
//! [`tiny_elf`], [`tiny_elf_pvh`], [`tiny_bzimage`]) with input-chosen
//! bytes patched in (so
//! the fuzzer starts past the magic numbers); the initrd is absent, input
//! bytes, or a sparse file of an input-chosen size; the RAM size, vCPU
//! count, command line and virtio-mmio devices come from the input too.
//! Guest memory is the monitor's own mapping with `PROT_NONE` guards
//! ([`vmm::memory::GuestRam`]).
//!
//! **Properties:** `prepare` returns an error or a boot, never panics;
//! a prepared boot loads without error into guest memory of the size it
//! was prepared for (the module invariant of `vmm::boot`, notes
//! included), with the entry
//! point at or above 1 MiB and below the end of RAM, the initrd
//! page-aligned above the kernel and below the end of RAM, holding the
//! file's bytes, the command line at `CMDLINE_START` as prepared, and the
//! MP table at the EBDA; loading into guest memory of another size
//! returns an error or succeeds, never writes outside it.

use std::io::Write;
use std::path::PathBuf;

use vm_memory::{Bytes, GuestAddress};
use vmm::boot::image::fixtures::{tiny_bzimage, tiny_elf, tiny_elf_pvh};
use vmm::boot::layout::{CMDLINE_START, EBDA_START, HIMEM_START};
use vmm::boot::{prepare, LinuxSpec, MmioDeviceInfo, Protocol};
use vmm::memory::GuestRam;
use vmm::{Backing, MemSize, PageSize};

use super::Input;

const MIB: u64 = 1 << 20;
/// Largest guest memory a case builds.
const MAX_GM: u64 = 64 * MIB;
/// Largest sparse initrd.
const MAX_SPARSE: u64 = 8 * MIB;

/// This thread's scratch directory: one per thread, since tests of one
/// process run in parallel threads and each rewrites its `kernel` and
/// `initrd` between preparing a boot and loading it (a shared directory
/// let one test's load read the other's kernel).
fn dir() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    thread_local! {
        static ID: u64 = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    super::scratch::dir("loader", Some(ID.with(|i| *i)))
}

fn file(name: &str, bytes: &[u8], sparse: u64) -> PathBuf {
    let p = dir().join(name);
    let mut f = std::fs::File::create(&p).expect("create a file in the temporary directory");
    f.write_all(bytes).expect("write it");
    if sparse > 0 {
        f.set_len(sparse).expect("extend it");
    }
    p
}

fn guest(bytes: u64) -> Option<GuestRam> {
    let size = MemSize::from_bytes(bytes).ok()?;
    Some(GuestRam::new(size, Backing::Anon, PageSize::Size4K, None).expect("guest memory"))
}

/// Runs one input; panics if a property fails.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let sel = inp.u8();
    let mem = match sel % 8 {
        0 => inp.u64(),
        1 => u64::from(inp.u32()),
        _ => (8 + u64::from(inp.u8() % 57)) * MIB,
    };
    let vcpus = match (sel >> 3) % 4 {
        0 => inp.u32(),
        _ => 1 + u32::from(inp.u8() % 33),
    };
    let mut devices = Vec::new();
    for _ in 0..inp.u8() % 3 {
        devices.push(MmioDeviceInfo {
            base: inp.u64(),
            size: inp.u64(),
            irq: inp.u32(),
        });
    }
    let cmdline = String::from_utf8_lossy(inp.bytes()).into_owned();
    let k = inp.u8();
    let mut kernel = match k % 3 {
        0 => Vec::new(),
        1 if k & 0x80 == 0 => tiny_elf(u64::from(inp.u16()) << (inp.u8() % 12)),
        1 => tiny_elf_pvh(u64::from(inp.u16()) << (inp.u8() % 12)),
        _ => tiny_bzimage(usize::from(inp.u16() % 8192)),
    };
    let patches = inp.u8() % 8;
    // An unpatched vmlinux with a PVH note boots through it.
    let want_pvh = k % 3 == 1 && k & 0x80 != 0 && patches == 0;
    for _ in 0..patches {
        if kernel.is_empty() {
            break;
        }
        let at = usize::from(inp.u16()) % kernel.len();
        let v = inp.u64().to_le_bytes();
        let n = (1 + usize::from(inp.u8() % 8)).min(kernel.len() - at);
        kernel[at..at + n].copy_from_slice(&v[..n]);
    }
    let initrd_kind = inp.u8();
    let initrd_bytes = inp.bytes().to_vec();
    let sparse = u64::from(inp.u32()) % MAX_SPARSE;
    kernel.extend_from_slice(inp.rest());

    let mut spec = LinuxSpec::new(file("kernel", &kernel, 0));
    spec.cmdline = cmdline;
    spec.initrd = match initrd_kind % 3 {
        0 => None,
        1 => Some(file("initrd", &initrd_bytes, 0)),
        _ => Some(file("initrd", &initrd_bytes, sparse)),
    };
    let Ok(boot) = prepare(&spec, mem, vcpus, &devices) else {
        return;
    };
    // Another size: an error or a load, nothing outside guest memory.
    let other = (2 + u64::from(initrd_kind >> 2) % 31) * 2 * MIB;
    if let Some(ram) = guest(other) {
        let _ = boot.load(ram.guest_memory());
    }
    if mem > MAX_GM {
        return;
    }
    let Some(ram) = guest(mem) else {
        return;
    };
    let gm = ram.guest_memory();
    let entry = match boot.load(gm) {
        Ok(e) => e,
        Err(e) => panic!("a prepared boot failed to load: {e}"),
    };
    if want_pvh {
        assert_eq!(
            (entry.protocol, entry.entry),
            (Protocol::Pvh, 16 * MIB),
            "the PVH note's entry"
        );
    }
    assert!(
        (HIMEM_START..mem).contains(&entry.entry),
        "entry {:#x} outside [1 MiB, {mem:#x})",
        entry.entry
    );
    if let Some((addr, size)) = boot.initrd_range() {
        assert!(
            addr % 4096 == 0 && addr >= HIMEM_START && addr + size <= mem,
            "initrd at {addr:#x}+{size:#x}, RAM {mem:#x}"
        );
        let want =
            std::fs::read(spec.initrd.as_ref().expect("an initrd")).expect("read the initrd back");
        let mut got = vec![0u8; want.len()];
        gm.read_slice(&mut got, GuestAddress(addr))
            .expect("initrd in guest memory");
        assert!(got == want, "initrd bytes differ in guest memory");
    }
    let line = boot.cmdline();
    let mut got = vec![0u8; line.len() + 1];
    gm.read_slice(&mut got, GuestAddress(CMDLINE_START))
        .expect("command line in guest memory");
    assert_eq!(&got[..line.len()], line.as_bytes(), "command line");
    assert_eq!(got[line.len()], 0, "command line NUL");
    let mut mp = [0u8; 4];
    gm.read_slice(&mut mp, GuestAddress(EBDA_START))
        .expect("MP table");
    assert_eq!(&mp, b"_MP_");
}
