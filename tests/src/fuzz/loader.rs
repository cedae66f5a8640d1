//! `loader`: the kernel and initrd checks ([`vmm::boot::prepare`]) and the
//! loader ([`vmm::boot::Prepared::load`]) on arbitrary files, into guest
//! memory of arbitrary (bounded) size.
//!
//! The kernel is raw bytes, or a minimal valid x86-64 ELF (with or
//! without a PVH note) or bzImage ([`tiny_elf`], [`tiny_elf_pvh`],
//! [`tiny_bzimage`]) with input-chosen bytes patched in (so
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

const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;

/// A minimal x86-64 ELF with one `PT_LOAD` of `len` bytes (16 file bytes)
/// at 16 MiB, entry there, no PVH note.
pub fn tiny_elf(len: u64) -> Vec<u8> {
    let mut b = vec![0u8; EHDR_LEN + PHDR_LEN + 16];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2;
    b[5] = 1;
    b[6] = 1;
    b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    b[20..24].copy_from_slice(&1u32.to_le_bytes());
    b[24..32].copy_from_slice(&(16 * MIB).to_le_bytes()); // e_entry
    b[32..40].copy_from_slice(&(EHDR_LEN as u64).to_le_bytes()); // e_phoff
    b[52..54].copy_from_slice(&(EHDR_LEN as u16).to_le_bytes());
    b[54..56].copy_from_slice(&(PHDR_LEN as u16).to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes());
    let p = EHDR_LEN;
    b[p..p + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    b[p + 4..p + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    b[p + 8..p + 16].copy_from_slice(&((EHDR_LEN + PHDR_LEN) as u64).to_le_bytes());
    b[p + 16..p + 24].copy_from_slice(&(16 * MIB).to_le_bytes());
    b[p + 24..p + 32].copy_from_slice(&(16 * MIB).to_le_bytes());
    b[p + 32..p + 40].copy_from_slice(&16u64.to_le_bytes());
    b[p + 40..p + 48].copy_from_slice(&len.to_le_bytes());
    b
}

/// [`tiny_elf`] with a second program header: a `PT_NOTE` holding the
/// PVH entry note (`"Xen"`, type 18) whose entry is the load address, as
/// a vmlinux has.
pub fn tiny_elf_pvh(len: u64) -> Vec<u8> {
    let mut b = tiny_elf(len);
    b[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
    let data = (EHDR_LEN + 2 * PHDR_LEN) as u64;
    b[EHDR_LEN + 8..EHDR_LEN + 16].copy_from_slice(&data.to_le_bytes());
    let mut ph = [0u8; PHDR_LEN];
    ph[..4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
    ph[8..16].copy_from_slice(&(data + 16).to_le_bytes());
    ph[32..40].copy_from_slice(&20u64.to_le_bytes());
    b.splice(EHDR_LEN + PHDR_LEN..EHDR_LEN + PHDR_LEN, ph);
    for v in [4, 4, 18] {
        b.extend_from_slice(&u32::to_le_bytes(v));
    }
    b.extend_from_slice(b"Xen\0");
    b.extend_from_slice(&(16 * MIB as u32).to_le_bytes());
    b
}

/// A bzImage header (boot protocol 2.15, 64-bit, loaded high) with
/// `payload` bytes after 4+1 setup sectors.
pub fn tiny_bzimage(payload: usize) -> Vec<u8> {
    let mut b = vec![0u8; 5 * 512 + payload];
    b[0x1f1] = 4;
    b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    b[0x211] = 1;
    b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    b[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
    b[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    b[0x260..0x264].copy_from_slice(&(4u32 << 20).to_le_bytes());
    b
}

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
