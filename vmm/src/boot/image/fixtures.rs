//! Minimal kernel images, for the image checks' unit tests and the
//! `loader` fuzz target (`tests/src/fuzz/loader.rs`): one builder of each
//! shape, so the checks and the fuzzer start from the same bytes.
//!
//! Compiled for this crate's tests and, with the `fixtures` feature, for
//! other crates' tests; never part of a monitor's own code path.
//!
//! **Invariants.** Each image is accepted by [`super::inspect`] into
//! 64 MiB of RAM as built (for `len` up to 48 MiB), and linux-loader loads
//! it: the tests patch fields from there.

use super::{
    BZ_BOOT_FLAG, BZ_CMDLINE_SIZE, BZ_CODE32_START, BZ_HEADER, BZ_INITRD_ADDR_MAX, BZ_INIT_SIZE,
    BZ_LOADFLAGS, BZ_MAGIC, BZ_SETUP_SECTS, BZ_VERSION, BZ_XLOADFLAGS, EHDR_LEN, EM_X86_64,
    PHDR_LEN, PT_LOAD, PT_NOTE, PVH_NOTE_NAME, PVH_NOTE_TYPE,
};

/// Where the ELF images load, and their entry: 16 MiB.
pub const ELF_LOAD: u64 = 16 << 20;

/// A minimal x86-64 ELF with one `PT_LOAD` of `len` bytes of memory (16
/// of them in the file) at [`ELF_LOAD`], its entry there, no note.
pub fn tiny_elf(len: u64) -> Vec<u8> {
    let mut b = vec![0u8; EHDR_LEN + PHDR_LEN + 16];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // ELFCLASS64
    b[5] = 1; // little-endian
    b[6] = 1; // EV_CURRENT
    b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
    b[20..24].copy_from_slice(&1u32.to_le_bytes()); // e_version
    b[24..32].copy_from_slice(&ELF_LOAD.to_le_bytes()); // e_entry
    b[32..40].copy_from_slice(&(EHDR_LEN as u64).to_le_bytes()); // e_phoff
    b[52..54].copy_from_slice(&(EHDR_LEN as u16).to_le_bytes()); // e_ehsize
    b[54..56].copy_from_slice(&(PHDR_LEN as u16).to_le_bytes()); // e_phentsize
    b[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let p = EHDR_LEN;
    b[p..p + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
    b[p + 4..p + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    b[p + 8..p + 16].copy_from_slice(&((EHDR_LEN + PHDR_LEN) as u64).to_le_bytes());
    b[p + 16..p + 24].copy_from_slice(&ELF_LOAD.to_le_bytes()); // p_vaddr
    b[p + 24..p + 32].copy_from_slice(&ELF_LOAD.to_le_bytes()); // p_paddr
    b[p + 32..p + 40].copy_from_slice(&16u64.to_le_bytes()); // p_filesz
    b[p + 40..p + 48].copy_from_slice(&len.to_le_bytes()); // p_memsz
    b
}

/// One ELF note: `name` (its NUL included), type `kind`, descriptor
/// `desc`, each padded to 4 bytes.
pub fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
    let mut n = Vec::new();
    n.extend_from_slice(&(name.len() as u32).to_le_bytes());
    n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    n.extend_from_slice(&kind.to_le_bytes());
    n.extend_from_slice(name);
    n.resize(n.len().next_multiple_of(4), 0);
    n.extend_from_slice(desc);
    n.resize(n.len().next_multiple_of(4), 0);
    n
}

/// The PVH entry note (`"Xen"`, type 18) with the 32-bit `entry`.
pub fn pvh_note(entry: u32) -> Vec<u8> {
    note(PVH_NOTE_NAME, PVH_NOTE_TYPE, &entry.to_le_bytes())
}

/// [`tiny_elf`] of `len` with a second program header: a `PT_NOTE` of
/// `filesz` bytes over `notes`, which end the file.
pub fn elf_with_notes(len: u64, notes: &[u8], filesz: u64) -> Vec<u8> {
    let mut b = tiny_elf(len);
    b[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
                                                    // Move the load's 16 bytes past the second header.
    let data = (EHDR_LEN + 2 * PHDR_LEN) as u64;
    b[EHDR_LEN + 8..EHDR_LEN + 16].copy_from_slice(&data.to_le_bytes());
    let mut ph = vec![0u8; PHDR_LEN];
    ph[..4].copy_from_slice(&PT_NOTE.to_le_bytes());
    ph[8..16].copy_from_slice(&(data + 16).to_le_bytes()); // p_offset
    ph[32..40].copy_from_slice(&filesz.to_le_bytes()); // p_filesz
    b.splice(EHDR_LEN + PHDR_LEN..EHDR_LEN + PHDR_LEN, ph);
    b.extend_from_slice(notes);
    b
}

/// [`tiny_elf`] of `len` with the PVH entry note at [`ELF_LOAD`], as a
/// vmlinux has it.
pub fn tiny_elf_pvh(len: u64) -> Vec<u8> {
    let n = pvh_note(ELF_LOAD as u32);
    elf_with_notes(len, &n, n.len() as u64)
}

/// A bzImage header (boot protocol 2.15, 64-bit, loaded high) with
/// `payload` bytes after 4+1 setup sectors.
pub fn tiny_bzimage(payload: usize) -> Vec<u8> {
    let mut b = vec![0u8; 5 * 512 + payload];
    b[BZ_SETUP_SECTS] = 4;
    b[BZ_BOOT_FLAG..BZ_BOOT_FLAG + 2].copy_from_slice(&0xaa55u16.to_le_bytes());
    b[BZ_HEADER..BZ_HEADER + 4].copy_from_slice(&BZ_MAGIC.to_le_bytes());
    b[BZ_VERSION..BZ_VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
    b[BZ_LOADFLAGS] = 1;
    b[BZ_CODE32_START..BZ_CODE32_START + 4].copy_from_slice(&0x10_0000u32.to_le_bytes());
    b[BZ_INITRD_ADDR_MAX..BZ_INITRD_ADDR_MAX + 4].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    b[BZ_XLOADFLAGS..BZ_XLOADFLAGS + 2].copy_from_slice(&1u16.to_le_bytes());
    b[BZ_CMDLINE_SIZE..BZ_CMDLINE_SIZE + 4].copy_from_slice(&2047u32.to_le_bytes());
    b[BZ_INIT_SIZE..BZ_INIT_SIZE + 4].copy_from_slice(&(4u32 << 20).to_le_bytes());
    b
}
