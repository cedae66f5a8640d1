//! Recognising and checking a kernel image before anything is created: an
//! x86-64 ELF `vmlinux` (booted through its PVH entry note when it has one,
//! else through its 64-bit entry) or a bzImage (64-bit boot protocol).
//!
//! **Invariants.**
//! - [`inspect`] reads only the headers it needs (the first 64 KiB, the
//!   ELF program header table and note segments wherever they are), never
//!   the whole kernel, never panics on any input, and accepts an image only
//!   if every byte linux-loader will later copy or read lies inside the
//!   file, every note linux-loader will walk is one it can read, every load
//!   address lies in `[HIMEM_START, mem)` and the entry the vCPU will start
//!   at (the PVH note's if the loader will find one, else `e_entry`) lies
//!   in what the kernel loads: loading an accepted image cannot fail
//!   (unless the file changes in between, which the load then reports).
//! - The note walk is linux-loader 0.14's `parse_elf_note`, step for step:
//!   from each `PT_NOTE` segment's start, while fewer than `p_filesz` bytes
//!   are walked, a 12-byte header; a `"Xen"` note of type 18 ends the walk
//!   (its 4-byte entry must be readable); any other note is skipped by its
//!   4-aligned name and descriptor sizes. The last `PT_NOTE` decides, as
//!   in the loader.
//! - The kernel is copied once, by linux-loader, from the file straight
//!   into guest memory: no heap copy (on a host whose page faults are slow,
//!   faulting in a 12 MiB buffer cost tens of ms of the start).
//! - The format is decided by content, never by file name.

use super::layout::HIMEM_START;
use super::BootError;

#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;

/// ELF machine number of x86-64.
const EM_X86_64: u16 = 62;
/// ELF program header type of a loadable segment.
const PT_LOAD: u32 = 1;
/// ELF program header type of a note segment.
const PT_NOTE: u32 = 4;
/// Type and owner of the note holding the PVH entry
/// (`XEN_ELFNOTE_PHYS32_ENTRY`).
const PVH_NOTE_TYPE: u32 = 18;
const PVH_NOTE_NAME: &[u8] = b"Xen\0";
/// Size of an ELF note header (name size, descriptor size, type).
const NHDR_LEN: u64 = 12;
/// Most bytes of one note segment read to check it (a vmlinux has a few
/// hundred).
const NOTES_MAX: u64 = 1 << 20;
/// Size of an ELF64 header and of one program header.
const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
/// bzImage header fields (offsets in the file; `Documentation/arch/x86/boot.rst`).
const BZ_SETUP_SECTS: usize = 0x1f1;
const BZ_BOOT_FLAG: usize = 0x1fe;
const BZ_HEADER: usize = 0x202;
const BZ_VERSION: usize = 0x206;
const BZ_LOADFLAGS: usize = 0x211;
const BZ_CODE32_START: usize = 0x214;
const BZ_INITRD_ADDR_MAX: usize = 0x22c;
const BZ_XLOADFLAGS: usize = 0x236;
const BZ_CMDLINE_SIZE: usize = 0x238;
const BZ_INIT_SIZE: usize = 0x260;
/// Offset of the 64-bit entry point in the protected-mode kernel.
const BZ_ENTRY_64: u64 = 0x200;
/// "HdrS".
const BZ_MAGIC: u32 = 0x5372_6448;

/// What kind of kernel an image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An x86-64 ELF vmlinux.
    Elf,
    /// A bzImage (64-bit boot protocol).
    BzImage {
        /// Highest address the initrd may end at (header `initrd_addr_max`).
        initrd_addr_max: u64,
        /// Longest command line, NUL excluded (header `cmdline_size`).
        cmdline_size: usize,
    },
}

/// Where a checked kernel's bytes come from.
#[derive(Debug)]
pub enum Source {
    /// The open file (read at load time).
    File(std::fs::File),
    /// Bytes in memory (tests).
    Bytes(Vec<u8>),
}

/// How much of the file [`inspect_file`] reads to recognise it.
const HEAD: u64 = 64 << 10;

/// A checked kernel image.
#[derive(Debug)]
pub struct KernelImage {
    /// The image.
    pub source: Source,
    /// Its format.
    pub format: KernelFormat,
    /// First byte above everything the kernel occupies once loaded (for a
    /// bzImage, its decompression footprint `init_size` included).
    pub end: u64,
    /// The guest ranges `(start, len)` the load copies file bytes to: each
    /// loadable segment's file part (ELF), the protected-mode kernel
    /// (bzImage). What else lies below `end` (bss, a bzImage's room to
    /// decompress) is not written by the load.
    pub loads: Vec<(u64, u64)>,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Checks the kernel file `file` (at `path`) for a guest with `mem` bytes
/// of RAM, reading only its headers.
pub fn inspect_file(
    path: &str,
    mut file: std::fs::File,
    mem: u64,
) -> Result<KernelImage, BootError> {
    use std::io::{Read, Seek, SeekFrom};
    let io = |err| BootError::Read {
        what: "kernel",
        path: path.to_string(),
        err,
    };
    let len = file.metadata().map_err(io)?.len();
    let mut head = Vec::new();
    (&mut file).take(HEAD).read_to_end(&mut head).map_err(io)?;
    // The ELF program header table may lie past the head.
    if head.starts_with(b"\x7fELF") {
        let phoff = u64_at(&head, 32).unwrap_or(0);
        let phnum = u64::from(u16_at(&head, 56).unwrap_or(0));
        let table_end = phoff.saturating_add(phnum * PHDR_LEN as u64);
        if table_end > head.len() as u64 && table_end <= len.min(16 << 20) {
            file.seek(SeekFrom::Start(0)).map_err(io)?;
            head.clear();
            (&mut file)
                .take(table_end)
                .read_to_end(&mut head)
                .map_err(io)?;
        }
    }
    // The notes, read as the head is (the load seeks back to 0 itself).
    let mut read_at = |at: u64, n: usize| -> Result<Vec<u8>, BootError> {
        let mut buf = Vec::with_capacity(n);
        file.seek(SeekFrom::Start(at)).map_err(io)?;
        (&mut file)
            .take(n as u64)
            .read_to_end(&mut buf)
            .map_err(io)?;
        Ok(buf)
    };
    let (format, end, loads) = check(path, &head, len, mem, &mut read_at)?;
    Ok(KernelImage {
        source: Source::File(file),
        format,
        end,
        loads,
    })
}

/// Checks an image held in memory (tests).
pub fn inspect(path: &str, bytes: Vec<u8>, mem: u64) -> Result<KernelImage, BootError> {
    let mut read_at = |at: u64, n: usize| -> Result<Vec<u8>, BootError> {
        let from = usize::try_from(at).map_or(&[][..], |a| bytes.get(a..).unwrap_or(&[]));
        Ok(from[..n.min(from.len())].to_vec())
    };
    let (format, end, loads) = check(path, &bytes, bytes.len() as u64, mem, &mut read_at)?;
    Ok(KernelImage {
        source: Source::Bytes(bytes),
        format,
        end,
        loads,
    })
}

/// The format, end and load ranges ([`KernelImage`]) of a checked image.
type Checked = (KernelFormat, u64, Vec<(u64, u64)>);
/// A checked image's end and load ranges.
type Extent = (u64, Vec<(u64, u64)>);
/// Reads up to `n` bytes at a file offset (fewer only at the end of the
/// file).
type ReadAt<'a> = &'a mut dyn FnMut(u64, usize) -> Result<Vec<u8>, BootError>;

/// Checks `bytes`, the first bytes of a `len`-byte file at `path` whose
/// other bytes `read_at` reads.
fn check(
    path: &str,
    bytes: &[u8],
    len: u64,
    mem: u64,
    read_at: ReadAt<'_>,
) -> Result<Checked, BootError> {
    let (format, (end, loads)) = if bytes.starts_with(b"\x7fELF") {
        (KernelFormat::Elf, check_elf(path, bytes, len, read_at)?)
    } else if u32_at(bytes, BZ_HEADER) == Some(BZ_MAGIC)
        && u16_at(bytes, BZ_BOOT_FLAG) == Some(0xaa55)
    {
        check_bzimage(path, bytes, len)?
    } else {
        return Err(BootError::NotAKernel(path.to_string()));
    };
    if end > mem {
        return Err(BootError::KernelTooBig {
            path: path.to_string(),
            end,
            mem,
        });
    }
    Ok((format, end, loads))
}

/// Returns the end of the highest loadable segment and the ranges the
/// segments' file bytes load to. `b` holds at least the headers and the
/// program header table of a `len`-byte file; `read_at` reads its notes.
fn check_elf(path: &str, b: &[u8], len: u64, read_at: ReadAt<'_>) -> Result<Extent, BootError> {
    let truncated = |what: &str| BootError::Truncated {
        path: path.to_string(),
        what: what.to_string(),
    };
    if b.len() < EHDR_LEN {
        return Err(truncated("the ELF header"));
    }
    if b[4] != 2 || b[5] != 1 {
        return Err(BootError::WrongArch {
            path: path.to_string(),
            what: format!(
                "a {}-bit {}-endian ELF",
                if b[4] == 1 { 32 } else { 64 },
                if b[5] == 2 { "big" } else { "little" }
            ),
        });
    }
    let machine = u16_at(b, 18).unwrap_or(0);
    if machine != EM_X86_64 {
        return Err(BootError::WrongArch {
            path: path.to_string(),
            what: format!("an ELF for machine {machine} (x86-64 is {EM_X86_64})"),
        });
    }
    let phoff = u64_at(b, 32).unwrap_or(u64::MAX);
    let phentsize = u16_at(b, 54).unwrap_or(0);
    let phnum = u16_at(b, 56).unwrap_or(0);
    if usize::from(phentsize) != PHDR_LEN || phnum == 0 {
        return Err(BootError::BadElf {
            path: path.to_string(),
            what: format!("{phnum} program headers of {phentsize} bytes"),
        });
    }
    // The table cannot overlap the ELF header (linux-loader refuses it
    // too, only when it loads).
    if phoff < EHDR_LEN as u64 {
        return Err(BootError::BadElf {
            path: path.to_string(),
            what: format!(
                "a program header table at offset {phoff}, inside the {EHDR_LEN}-byte ELF header"
            ),
        });
    }
    let table_end = u64::from(phnum)
        .checked_mul(PHDR_LEN as u64)
        .and_then(|l| l.checked_add(phoff));
    if table_end.is_none_or(|e| e > b.len() as u64 || e > len) {
        return Err(truncated("the program header table"));
    }
    let mut end = 0u64;
    let mut loads = Vec::new();
    // The PVH entry the loader will find (the last note segment decides).
    let mut pvh = None;
    for i in 0..u64::from(phnum) {
        let at = usize::try_from(phoff + i * PHDR_LEN as u64).unwrap_or(usize::MAX);
        let field = |o: usize| u64_at(b, at + o).unwrap_or(u64::MAX);
        if u32_at(b, at) == Some(PT_NOTE) {
            pvh = check_notes(path, i, field(8), field(32), len, read_at)?;
            continue;
        }
        if u32_at(b, at) != Some(PT_LOAD) {
            continue;
        }
        let (offset, paddr, filesz, memsz) = (field(8), field(24), field(32), field(40));
        if offset.checked_add(filesz).is_none_or(|e| e > len) {
            return Err(truncated(&format!("segment {i}")));
        }
        let seg_end = paddr.checked_add(memsz.max(filesz));
        match seg_end {
            Some(e) if paddr >= HIMEM_START => {
                end = end.max(e);
                if filesz != 0 {
                    loads.push((paddr, filesz));
                }
            }
            _ => {
                return Err(BootError::BadElf {
                    path: path.to_string(),
                    what: format!(
                    "segment {i} loads at {paddr:#x}+{memsz:#x}, outside [{HIMEM_START:#x}, 4 GiB)"
                ),
                })
            }
        }
    }
    if end == 0 {
        return Err(BootError::BadElf {
            path: path.to_string(),
            what: "no loadable segment".into(),
        });
    }
    // The 64-bit protocol starts at e_entry (a physical address in a
    // vmlinux), PVH at the note's entry: each must lie in what the
    // segments load.
    let entry = u64_at(b, 24).unwrap_or(0);
    for (how, entry) in [("64-bit", Some(entry)), ("PVH", pvh)] {
        match entry {
            Some(entry) if !(HIMEM_START..end).contains(&entry) => {
                return Err(BootError::BadEntry {
                    how,
                    entry,
                    start: HIMEM_START,
                    end,
                })
            }
            _ => {}
        }
    }
    Ok((end, loads))
}

/// Walks note segment `i` (`filesz` bytes at `offset` of a `len`-byte
/// file) as linux-loader will; returns the PVH entry it finds, if any.
fn check_notes(
    path: &str,
    i: u64,
    offset: u64,
    filesz: u64,
    len: u64,
    read_at: ReadAt<'_>,
) -> Result<Option<u64>, BootError> {
    if filesz == 0 {
        return Ok(None);
    }
    let bad = |what: String| BootError::BadElf {
        path: path.to_string(),
        what: format!("note segment {i} (at offset {offset:#x}): {what}"),
    };
    // Every read of the walk starts before `offset + filesz` and is at
    // most a header, a 4-byte name and a 4-byte entry long.
    let window_end = offset
        .saturating_add(filesz)
        .saturating_add(NHDR_LEN + 8)
        .min(len);
    let window = window_end.saturating_sub(offset);
    if window > NOTES_MAX {
        return Err(bad(format!(
            "{filesz} bytes of notes, more than the {} MiB read to check them",
            NOTES_MAX >> 20
        )));
    }
    // `window` <= NOTES_MAX, so it fits a usize and a read of it is small.
    let w = read_at(offset, window as usize)?;
    let past_end = |what: &str, at: u64| {
        bad(format!(
            "{what} at offset {:#x} lies past the end of the file ({len} bytes)",
            offset.saturating_add(at)
        ))
    };
    let get = |at: u64, n: u64| {
        let at = usize::try_from(at).ok()?;
        w.get(at..at.checked_add(usize::try_from(n).ok()?)?)
    };
    let mut walked = 0u64;
    while walked < filesz {
        let h = get(walked, NHDR_LEN).ok_or_else(|| past_end("a note header", walked))?;
        let (namesz, descsz, kind) = (
            u32_at(h, 0).unwrap_or(0),
            u32_at(h, 4).unwrap_or(0),
            u32_at(h, 8).unwrap_or(0),
        );
        if kind == PVH_NOTE_TYPE && namesz as usize == PVH_NOTE_NAME.len() {
            let name_at = walked + NHDR_LEN;
            let name = get(name_at, 4).ok_or_else(|| past_end("a note name", name_at))?;
            if name == PVH_NOTE_NAME {
                if descsz < 4 {
                    return Err(bad(format!(
                        "the PVH entry note has a {descsz}-byte descriptor (4 needed)"
                    )));
                }
                let at = name_at + 4;
                let entry = get(at, 4).ok_or_else(|| past_end("the PVH entry", at))?;
                return Ok(u32_at(entry, 0).map(u64::from));
            }
        }
        let (name, desc) = (
            u64::from(namesz).next_multiple_of(4),
            u64::from(descsz).next_multiple_of(4),
        );
        if name > u64::from(u32::MAX) || desc > u64::from(u32::MAX) {
            return Err(bad(format!(
                "a note of {namesz}+{descsz} bytes overflows 32 bits once 4-aligned"
            )));
        }
        walked += NHDR_LEN + name + desc;
    }
    Ok(None)
}

fn check_bzimage(path: &str, b: &[u8], len: u64) -> Result<(KernelFormat, Extent), BootError> {
    let field32 = |o| u64::from(u32_at(b, o).unwrap_or(0));
    let version = u16_at(b, BZ_VERSION).unwrap_or(0);
    let xloadflags = u16_at(b, BZ_XLOADFLAGS).unwrap_or(0);
    let loadflags = b.get(BZ_LOADFLAGS).copied().unwrap_or(0);
    // 2.12 added xloadflags; bit 0 (XLF_KERNEL_64) says it has the 64-bit
    // entry at load address + 0x200; loadflags bit 0 says it loads high.
    if version < 0x020c || xloadflags & 1 == 0 || loadflags & 1 == 0 {
        return Err(BootError::WrongArch {
            path: path.to_string(),
            what: format!(
                "a bzImage with boot protocol {}.{:02} without a 64-bit entry point \
                 (2.12+ with XLF_KERNEL_64 and LOADED_HIGH needed)",
                version >> 8,
                version & 0xff
            ),
        });
    }
    let sects = match b.get(BZ_SETUP_SECTS).copied().unwrap_or(0) {
        0 => 4,
        n => u64::from(n),
    };
    let setup = (sects + 1) * 512;
    if setup >= len {
        return Err(BootError::Truncated {
            path: path.to_string(),
            what: "the protected-mode kernel".into(),
        });
    }
    let code32 = field32(BZ_CODE32_START);
    if code32 < HIMEM_START {
        return Err(BootError::BadElf {
            path: path.to_string(),
            what: format!("bzImage code32_start {code32:#x} is below 1 MiB"),
        });
    }
    let footprint = (len - setup).max(field32(BZ_INIT_SIZE));
    // The 64-bit entry is 0x200 into the protected-mode kernel.
    if footprint <= BZ_ENTRY_64 {
        return Err(BootError::BadEntry {
            how: "64-bit",
            entry: code32 + BZ_ENTRY_64,
            start: code32,
            end: code32 + footprint,
        });
    }
    let format = KernelFormat::BzImage {
        initrd_addr_max: field32(BZ_INITRD_ADDR_MAX),
        cmdline_size: usize::try_from(field32(BZ_CMDLINE_SIZE)).unwrap_or(0),
    };
    // linux-loader copies the protected-mode kernel to code32_start.
    Ok((format, (code32 + footprint, vec![(code32, len - setup)])))
}

#[cfg(test)]
mod tests {
    use super::fixtures::{elf_with_notes, note, tiny_bzimage, tiny_elf, tiny_elf_pvh, ELF_LOAD};
    use super::*;

    /// The fixtures' own invariant: each is accepted as built, and
    /// linux-loader loads the ELF ones (finding the PVH note where there
    /// is one).
    #[test]
    fn fixtures_are_accepted_as_built() {
        for len in [4096, 48 << 20] {
            let k = inspect("k", tiny_elf(len), 64 << 20).unwrap();
            assert_eq!(k.end, ELF_LOAD + len);
            let k = inspect("k", tiny_elf_pvh(len), 64 << 20).unwrap();
            assert_eq!(k.end, ELF_LOAD + len);
        }
        assert_eq!(loader(&tiny_elf(4096)), Ok(None));
        assert_eq!(loader(&tiny_elf_pvh(4096)), Ok(Some(ELF_LOAD)));
        inspect("k", tiny_bzimage(4096), 64 << 20).unwrap();
    }

    #[test]
    fn accepts_small_elf_and_bzimage() {
        let k = inspect("k", tiny_elf(4096), 64 << 20).unwrap();
        assert_eq!((k.format, k.end), (KernelFormat::Elf, (16 << 20) + 4096));
        assert_eq!(k.loads, vec![(16 << 20, 16)]); // filesz 16, memsz 4096
        let k = inspect("k", tiny_bzimage(4096), 64 << 20).unwrap();
        assert_eq!(k.loads, vec![(0x10_0000, 4096)]);
        assert!(matches!(
            k.format,
            KernelFormat::BzImage {
                cmdline_size: 2047,
                ..
            }
        ));
        assert_eq!(k.end, 0x10_0000 + (4 << 20));
    }

    /// A program header table that overlaps the ELF header is refused
    /// here, as linux-loader refuses it when it loads (found by the
    /// `loader` fuzz target: prepare accepted what load then refused).
    #[test]
    fn rejects_a_program_header_table_inside_the_elf_header() {
        let mut b = tiny_elf(4096);
        // The table at 56: its entry's type is e_phnum (1, PT_LOAD) and
        // its fields are written where that entry puts them.
        b[32..40].copy_from_slice(&56u64.to_le_bytes());
        b[64..72].copy_from_slice(&((EHDR_LEN + PHDR_LEN) as u64).to_le_bytes()); // p_offset
        b[80..88].copy_from_slice(&(16u64 << 20).to_le_bytes()); // p_paddr
        b[88..96].copy_from_slice(&16u64.to_le_bytes()); // p_filesz
        b[96..104].copy_from_slice(&4096u64.to_le_bytes()); // p_memsz
        let e = inspect("k", b, 64 << 20).unwrap_err();
        assert!(
            matches!(e, BootError::BadElf { .. })
                && e.to_string()
                    .contains("at offset 56, inside the 64-byte ELF header"),
            "{e}"
        );
    }

    #[test]
    fn rejects_garbage_truncation_and_foreign_machines() {
        let e = inspect("k", b"#!/bin/sh\necho hi\n".to_vec(), 64 << 20).unwrap_err();
        assert!(matches!(e, BootError::NotAKernel(_)), "{e}");
        let e = inspect("k", Vec::new(), 64 << 20).unwrap_err();
        assert!(matches!(e, BootError::NotAKernel(_)), "{e}");
        let mut elf = tiny_elf(4096);
        elf.truncate(EHDR_LEN + 10);
        assert!(matches!(
            inspect("k", elf, 64 << 20),
            Err(BootError::Truncated { .. })
        ));
        let mut elf = tiny_elf(4096);
        elf[18] = 183; // aarch64
        let e = inspect("k", elf, 64 << 20).unwrap_err();
        assert!(matches!(e, BootError::WrongArch { .. }), "{e}");
        assert!(e.to_string().contains("machine 183"), "{e}");
        let mut elf = tiny_elf(4096);
        elf[4] = 1;
        assert!(matches!(
            inspect("k", elf, 64 << 20),
            Err(BootError::WrongArch { .. })
        ));
        let mut bz = tiny_bzimage(16);
        bz[BZ_XLOADFLAGS] = 0;
        assert!(matches!(
            inspect("k", bz, 64 << 20),
            Err(BootError::WrongArch { .. })
        ));
        let mut bz = tiny_bzimage(0);
        bz.truncate(5 * 512);
        assert!(matches!(
            inspect("k", bz, 64 << 20),
            Err(BootError::Truncated { .. })
        ));
    }

    #[test]
    fn rejects_entry_points_outside_the_kernel() {
        // Found by the loader fuzz target: e_entry far outside RAM was
        // accepted and the vCPU would have started there.
        let mut elf = tiny_elf(4096);
        elf[24..32].copy_from_slice(&0xa0_0100_0000u64.to_le_bytes());
        let e = inspect("k", elf, 64 << 20).unwrap_err();
        assert!(
            matches!(
                e,
                BootError::BadEntry {
                    entry: 0xa0_0100_0000,
                    ..
                }
            ),
            "{e}"
        );
        let mut elf = tiny_elf(4096);
        elf[24..32].copy_from_slice(&((16u64 << 20) + 4096).to_le_bytes());
        assert!(matches!(
            inspect("k", elf, 64 << 20),
            Err(BootError::BadEntry { .. })
        ));
        // A bzImage whose protected-mode part ends before its 64-bit entry.
        let mut bz = tiny_bzimage(16);
        bz[BZ_INIT_SIZE..BZ_INIT_SIZE + 4].copy_from_slice(&0u32.to_le_bytes());
        let e = inspect("k", bz, 64 << 20).unwrap_err();
        assert!(matches!(e, BootError::BadEntry { .. }), "{e}");
    }

    /// What linux-loader makes of `image`: the PVH entry it finds, or
    /// its refusal.
    fn loader(image: &[u8]) -> Result<Option<u64>, String> {
        use linux_loader::loader::elf::{Elf, PvhBootCapability};
        use linux_loader::loader::KernelLoader;
        use vm_memory::{GuestAddress, GuestMemoryMmap};
        let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let mut f = std::io::Cursor::new(image);
        let r = Elf::load(&gm, None, &mut f, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| e.to_string())?;
        Ok(match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
            _ => None,
        })
    }

    /// Note segments are accepted exactly when linux-loader can walk them
    /// (found by the `loader` fuzz target: a note header past the end of
    /// the file was accepted, and the load failed with "Unable to read
    /// note header"), read from a file as from memory.
    #[test]
    fn note_segments_are_accepted_exactly_when_the_loader_reads_them() {
        let entry = ((16u32 << 20) + 8).to_le_bytes();
        let pvh = note(b"Xen\0", PVH_NOTE_TYPE, &entry);
        let gnu = note(b"GNU\0", 3, &[0xab; 20]);
        let both = [gnu.clone(), pvh.clone()].concat();
        let len = |n: &[u8]| n.len() as u64;
        let mut huge_name = gnu.clone();
        huge_name[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        // (what, note bytes, p_filesz, None if refused else the PVH entry)
        type Case = (&'static str, Vec<u8>, u64, Option<Option<u64>>);
        let cases: Vec<Case> = vec![
            (
                "a PVH note",
                pvh.clone(),
                len(&pvh),
                Some(Some((16 << 20) + 8)),
            ),
            (
                "another note, then PVH",
                both.clone(),
                len(&both),
                Some(Some((16 << 20) + 8)),
            ),
            ("another note only", gnu.clone(), len(&gnu), Some(None)),
            ("an empty segment", Vec::new(), 0, Some(None)),
            // The walk stops once p_filesz bytes are walked, even inside a note.
            (
                "p_filesz ends inside the header",
                pvh.clone(),
                1,
                Some(Some((16 << 20) + 8)),
            ),
            (
                "p_filesz past the end of the file",
                gnu.clone(),
                len(&gnu) + 1,
                None,
            ),
            (
                "a header cut by the end of the file",
                pvh[..8].to_vec(),
                8,
                None,
            ),
            (
                "a PVH entry cut by the end of the file",
                pvh[..18].to_vec(),
                20,
                None,
            ),
            (
                "a 2-byte PVH descriptor",
                note(b"Xen\0", PVH_NOTE_TYPE, &[1, 2]),
                16,
                None,
            ),
            ("a name size that overflows", huge_name, len(&gnu), None),
        ];
        for (what, notes, filesz, want) in cases {
            let image = elf_with_notes(4096, &notes, filesz);
            let loaded = loader(&image);
            assert_eq!(
                loaded.clone().ok(),
                want,
                "{what}: linux-loader says {loaded:?}"
            );
            let mem = inspect("k", image.clone(), 64 << 20);
            assert_eq!(mem.is_ok(), want.is_some(), "{what}: {mem:?}");
            let path = std::env::temp_dir().join(format!("vmm-notes-{}", std::process::id()));
            std::fs::write(&path, &image).unwrap();
            let file = std::fs::File::open(&path).unwrap();
            let from_file = inspect_file("k", file, 64 << 20);
            std::fs::remove_file(&path).unwrap();
            assert_eq!(from_file.is_ok(), want.is_some(), "{what}: {from_file:?}");
            if let Err(e) = mem {
                assert!(
                    matches!(e, BootError::BadElf { .. })
                        && e.to_string().contains("note segment 1"),
                    "{what}: {e}"
                );
            }
        }
    }

    /// Note segments over 1 MiB are refused, though the loader would walk
    /// them: the check reads no more (a vmlinux has a few hundred bytes).
    #[test]
    fn refuses_note_segments_over_a_mib() {
        // Empty notes (12 bytes each) that end the file.
        let notes = vec![0u8; (NOTES_MAX as usize).next_multiple_of(12)];
        let image = elf_with_notes(4096, &notes, notes.len() as u64);
        assert_eq!(loader(&image), Ok(None));
        let e = inspect("k", image, 64 << 20).unwrap_err();
        assert!(e.to_string().contains("more than the 1 MiB"), "{e}");
        let notes = vec![0u8; NOTES_MAX as usize / 12 * 12];
        let image = elf_with_notes(4096, &notes, notes.len() as u64);
        assert_eq!(loader(&image), Ok(None));
        assert!(inspect("k", image, 64 << 20).is_ok());
    }

    /// The PVH entry a note gives must lie in the kernel, as `e_entry`
    /// must: the vCPU starts there.
    #[test]
    fn rejects_a_pvh_entry_outside_the_kernel() {
        let pvh = note(b"Xen\0", PVH_NOTE_TYPE, &0x1000u32.to_le_bytes());
        let image = elf_with_notes(4096, &pvh, pvh.len() as u64);
        assert_eq!(loader(&image), Ok(Some(0x1000)));
        let e = inspect("k", image, 64 << 20).unwrap_err();
        assert!(
            matches!(
                e,
                BootError::BadEntry {
                    how: "PVH",
                    entry: 0x1000,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn rejects_kernels_larger_than_ram() {
        let e = inspect("k", tiny_elf(64 << 20), 64 << 20).unwrap_err();
        assert!(matches!(e, BootError::KernelTooBig { .. }), "{e}");
        let e = inspect("k", tiny_bzimage(16), 4 << 20).unwrap_err();
        assert!(matches!(e, BootError::KernelTooBig { .. }), "{e}");
    }
}
