//! Guest RAM: allocation, backing kinds, KVM slot description and release.
//!
//! Guest RAM is one host mapping per region, placed at guest physical address
//! 0 upward (the default guest keeps its page tables and descriptor tables in
//! the first 2 MiB, see `guest`). Three backings exist: private anonymous
//! memory (transparent huge pages requested with `MADV_HUGEPAGE` unless the
//! page size is 4 KiB), a shared memfd, and a hugetlb memfd of 2 MiB pages.
//!
//! Each region is described by a [`RegionDesc`] (host address, length, kind,
//! fd and offset) so that the stage-2 memory manager can mirror it.
//!
//! Invariants: a mapping lives as long as its [`GuestRam`]; the
//! `GuestMemoryMmap` view borrows the raw mappings and is dropped before they
//! are unmapped. Releasing backing ([`GuestRam::discard`]) follows the
//! leaf size: 2 MiB granules for THP and hugetlb, 4 KiB otherwise.

use std::fmt;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::str::FromStr;

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// 4 KiB.
pub const SIZE_4K: u64 = 4 << 10;
/// 2 MiB.
pub const SIZE_2M: u64 = 2 << 20;
/// The largest guest RAM accepted (the default guest maps it with one PDPT).
pub const MAX_MEM_BYTES: u64 = 64 << 30;

/// Errors of guest RAM set-up and release.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Bad size string.
    #[error("invalid memory size '{0}': use a number with a K, M or G suffix, e.g. 256M or 4G")]
    BadSize(String),
    /// Zero size.
    #[error("memory size must not be 0: give at least 2M, e.g. --mem 256M")]
    ZeroSize,
    /// Not a multiple of 2 MiB.
    #[error("memory size {0} bytes is not a multiple of 2 MiB: round it, e.g. --mem 256M")]
    Unaligned(u64),
    /// Too big.
    #[error("memory size {0} bytes is larger than the supported maximum of 64 GiB")]
    TooBig(u64),
    /// Bad backing name.
    #[error("unknown backing '{0}': use anon, memfd or hugetlb")]
    BadBacking(String),
    /// Bad page size.
    #[error("unknown page size '{0}': use 4K or 2M")]
    BadPageSize(String),
    /// hugetlb with 4K pages makes no sense.
    #[error("hugetlb backing always uses 2M pages: drop --page-size 4K or choose anon/memfd")]
    HugetlbNeeds2M,
    /// Not enough free huge pages.
    #[error(
        "hugetlb backing needs {needed} free 2 MiB huge pages but the host has {free}: \
         raise it, e.g. `sysctl vm.nr_hugepages={needed}` (as root), or use --backing anon"
    )]
    NoHugePages {
        /// Pages needed.
        needed: u64,
        /// Pages free.
        free: u64,
    },
    /// memfd_create failed.
    #[error("memfd_create failed: {0}")]
    Memfd(std::io::Error),
    /// ftruncate failed.
    #[error("sizing the memfd to {1} bytes failed: {0}")]
    Truncate(std::io::Error, u64),
    /// mmap failed.
    #[error("mapping {1} bytes of guest RAM failed: {0} (is there enough memory?)")]
    Mmap(std::io::Error, u64),
    /// vm-memory refused the region.
    #[error("building the guest memory map failed: {0}")]
    GuestMemory(String),
    /// A release request outside RAM or misaligned.
    #[error(
        "cannot release [{gpa:#x}, +{len:#x}): must lie inside guest RAM and be aligned to \
         the {granule:#x}-byte leaf size"
    )]
    BadRange {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// Required alignment.
        granule: u64,
    },
    /// madvise / fallocate failed.
    #[error("releasing backing of [{gpa:#x}, +{len:#x}) failed: {err}")]
    Release {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// OS error.
        err: std::io::Error,
    },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, MemoryError>;

/// A guest RAM size in bytes, parsed from `256M`, `1G`, `4G`, `2097152`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemSize(u64);

impl MemSize {
    /// Validates a byte count (non-zero, 2 MiB multiple, at most 64 GiB).
    pub fn from_bytes(bytes: u64) -> Result<Self> {
        if bytes == 0 {
            return Err(MemoryError::ZeroSize);
        }
        if !bytes.is_multiple_of(SIZE_2M) {
            return Err(MemoryError::Unaligned(bytes));
        }
        if bytes > MAX_MEM_BYTES {
            return Err(MemoryError::TooBig(bytes));
        }
        Ok(Self(bytes))
    }

    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for MemSize {
    type Err = MemoryError;

    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        let bad = || MemoryError::BadSize(s.to_string());
        let (digits, shift) = match t.as_bytes().last() {
            Some(b'K' | b'k') => (&t[..t.len() - 1], 10),
            Some(b'M' | b'm') => (&t[..t.len() - 1], 20),
            Some(b'G' | b'g') => (&t[..t.len() - 1], 30),
            Some(b'T' | b't') => (&t[..t.len() - 1], 40),
            _ => (t, 0),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let bytes = n.checked_mul(1u64 << shift).ok_or_else(bad)?;
        Self::from_bytes(bytes)
    }
}

impl fmt::Display for MemSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1 << 30) {
            write!(f, "{}G", self.0 >> 30)
        } else {
            write!(f, "{}M", self.0 >> 20)
        }
    }
}

/// Which host memory backs guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory (THP requested unless 4K pages).
    Anon,
    /// A shared memfd (shmem).
    Memfd,
    /// A hugetlb memfd of 2 MiB pages.
    Hugetlb,
}

impl FromStr for Backing {
    type Err = MemoryError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "anon" => Ok(Self::Anon),
            "memfd" => Ok(Self::Memfd),
            "hugetlb" => Ok(Self::Hugetlb),
            _ => Err(MemoryError::BadBacking(s.to_string())),
        }
    }
}

impl fmt::Display for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Anon => "anon",
            Self::Memfd => "memfd",
            Self::Hugetlb => "hugetlb",
        })
    }
}

/// The leaf size guest RAM is backed and released with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSize {
    /// 4 KiB pages.
    Size4K,
    /// 2 MiB pages (THP for anon, huge pages for hugetlb).
    Size2M,
}

impl PageSize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        match self {
            Self::Size4K => SIZE_4K,
            Self::Size2M => SIZE_2M,
        }
    }
}

impl FromStr for PageSize {
    type Err = MemoryError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "4K" | "4k" => Ok(Self::Size4K),
            "2M" | "2m" => Ok(Self::Size2M),
            _ => Err(MemoryError::BadPageSize(s.to_string())),
        }
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Size4K => "4K",
            Self::Size2M => "2M",
        })
    }
}

/// Description of one guest RAM region, for whoever mirrors it (KVM slots,
/// the stage-2 table, the fault handler).
#[derive(Debug, Clone, Copy)]
pub struct RegionDesc {
    /// KVM memory slot number.
    pub slot: u32,
    /// First guest physical address.
    pub gpa: GuestAddress,
    /// Host virtual address of the mapping.
    pub host_addr: usize,
    /// Length in bytes.
    pub len: u64,
    /// Backing kind.
    pub backing: Backing,
    /// Leaf (and release) size.
    pub page_size: PageSize,
    /// The memfd, for memfd and hugetlb backing.
    pub fd: Option<RawFd>,
    /// Offset of the region in `fd`.
    pub fd_offset: u64,
}

impl RegionDesc {
    /// Whether `[gpa, gpa+len)` lies inside this region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        let start = self.gpa.0;
        gpa >= start && len <= self.len && gpa - start <= self.len - len
    }

    /// Host address of `gpa`, which must be inside the region.
    pub fn host_of(&self, gpa: u64) -> usize {
        // The region fits in the address space, so the offset fits usize.
        self.host_addr + usize::try_from(gpa - self.gpa.0).unwrap_or(usize::MAX)
    }
}

/// One owned host mapping.
struct Mapping {
    desc: RegionDesc,
    file: Option<File>,
}

/// Guest RAM: its host mappings and a vm-memory view of them.
pub struct GuestRam {
    // Dropped before `mappings` are unmapped (see Drop).
    guest_mem: Option<GuestMemoryMmap>,
    mappings: Vec<Mapping>,
    size: MemSize,
    backing: Backing,
    page_size: PageSize,
}

impl fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestRam")
            .field("size", &self.size)
            .field("backing", &self.backing)
            .field("page_size", &self.page_size)
            .field("regions", &self.regions())
            .finish()
    }
}

/// Free 2 MiB huge pages of the host, from `/proc/meminfo`.
pub fn free_huge_pages() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else {
        return 0;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Checks that the host can provide `size` of `backing` with `page_size`
/// (for hugetlb: enough free huge pages), before anything is allocated.
pub fn check_backing(size: MemSize, backing: Backing, page_size: PageSize) -> Result<()> {
    if backing == Backing::Hugetlb {
        if page_size == PageSize::Size4K {
            return Err(MemoryError::HugetlbNeeds2M);
        }
        let needed = size.bytes() / SIZE_2M;
        let free = free_huge_pages();
        if free < needed {
            return Err(MemoryError::NoHugePages { needed, free });
        }
    }
    Ok(())
}

/// Maps `len` bytes at a 2 MiB-aligned host address, so that guest 2 MiB
/// leaves are host huge pages (THP needs host alignment; KVM maps a large
/// page only where guest and host addresses agree modulo 2 MiB).
fn map_aligned(
    len: usize,
    prot: libc::c_int,
    flags: libc::c_int,
    fd: RawFd,
) -> std::io::Result<*mut libc::c_void> {
    let align = to_usize(SIZE_2M);
    let span = len + align;
    // SAFETY: reserves fresh address space (no access) at a kernel-chosen
    // address; no existing mapping is affected.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = (base as usize).next_multiple_of(align);
    // SAFETY: [start, start+len) lies inside the reservation made above,
    // which we own; MAP_FIXED replaces only that part of it. fd is valid or
    // -1 for anonymous memory.
    let addr = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len,
            prot,
            flags | libc::MAP_FIXED,
            fd,
            0,
        )
    };
    let err = std::io::Error::last_os_error();
    let head = start - base as usize;
    let tail = span - head - len;
    // SAFETY: the head and tail are the unused ends of our own reservation.
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
    }
    if addr == libc::MAP_FAILED {
        // SAFETY: the middle of our reservation, still ours.
        unsafe { libc::munmap(start as *mut libc::c_void, len) };
        return Err(err);
    }
    Ok(addr)
}

fn to_usize(v: u64) -> usize {
    // Only called on sizes already checked to be <= MAX_MEM_BYTES.
    usize::try_from(v).unwrap_or(usize::MAX)
}

impl GuestRam {
    /// Allocates guest RAM of `size` with `backing` and `page_size`.
    pub fn new(size: MemSize, backing: Backing, page_size: PageSize) -> Result<Self> {
        let len = size.bytes();
        let ulen = to_usize(len);
        check_backing(size, backing, page_size)?;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let (file, flags) = match backing {
            Backing::Anon => (
                None,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            ),
            Backing::Memfd | Backing::Hugetlb => {
                let mut mflags = libc::MFD_CLOEXEC;
                if backing == Backing::Hugetlb {
                    mflags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
                }
                // SAFETY: the name is a NUL-terminated static string; the
                // call has no memory side effects.
                let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), mflags) };
                if fd < 0 {
                    return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
                }
                // SAFETY: fd was just returned by memfd_create and is owned
                // by nobody else.
                let file = unsafe { File::from_raw_fd(fd) };
                file.set_len(len)
                    .map_err(|e| MemoryError::Truncate(e, len))?;
                (Some(file), libc::MAP_SHARED | libc::MAP_NORESERVE)
            }
        };
        let fd = file.as_ref().map_or(-1, |f| f.as_raw_fd());
        let addr = map_aligned(ulen, prot, flags, fd).map_err(|e| MemoryError::Mmap(e, len))?;
        let advice = match (backing, page_size) {
            (Backing::Hugetlb, _) => None,
            (_, PageSize::Size2M) => Some(libc::MADV_HUGEPAGE),
            (_, PageSize::Size4K) => Some(libc::MADV_NOHUGEPAGE),
        };
        if let Some(advice) = advice {
            // SAFETY: addr/ulen is the mapping created above. The advice is
            // a hint; failure (e.g. THP disabled) is harmless.
            unsafe { libc::madvise(addr, ulen, advice) };
        }
        let desc = RegionDesc {
            slot: 0,
            gpa: GuestAddress(0),
            host_addr: addr as usize,
            len,
            backing,
            page_size,
            fd: file.as_ref().map(|f| f.as_raw_fd()),
            fd_offset: 0,
        };
        let mut ram = Self {
            guest_mem: None,
            mappings: vec![Mapping { desc, file }],
            size,
            backing,
            page_size,
        };
        let mut regions = Vec::new();
        for m in &ram.mappings {
            // SAFETY: host_addr/len is a live mapping owned by `ram`, created
            // with these prot/flags; the view is dropped before the unmap.
            let region = unsafe {
                MmapRegion::build_raw(
                    m.desc.host_addr as *mut u8,
                    to_usize(m.desc.len),
                    prot,
                    flags,
                )
            }
            .map_err(|e| MemoryError::GuestMemory(e.to_string()))?;
            let r = GuestRegionMmap::new(region, m.desc.gpa)
                .ok_or_else(|| MemoryError::GuestMemory("region overflows".into()))?;
            regions.push(r);
        }
        ram.guest_mem = Some(
            GuestMemoryMmap::from_regions(regions)
                .map_err(|e| MemoryError::GuestMemory(e.to_string()))?,
        );
        Ok(ram)
    }

    /// The vm-memory view (for set-up and host-side checks).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        // Always Some between new() and drop.
        self.guest_mem
            .as_ref()
            .unwrap_or_else(|| unreachable!("guest memory view exists until drop"))
    }

    /// Descriptions of every region.
    pub fn regions(&self) -> Vec<RegionDesc> {
        self.mappings.iter().map(|m| m.desc).collect()
    }

    /// Total size.
    pub fn size(&self) -> MemSize {
        self.size
    }

    /// Backing kind.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// Leaf size.
    pub fn page_size(&self) -> PageSize {
        self.page_size
    }

    /// The region containing `[gpa, gpa+len)`, checked for leaf alignment.
    pub fn checked_region(&self, gpa: u64, len: u64) -> Result<RegionDesc> {
        let granule = self.page_size.bytes();
        let bad = MemoryError::BadRange { gpa, len, granule };
        if len == 0 || !gpa.is_multiple_of(granule) || !len.is_multiple_of(granule) {
            return Err(bad);
        }
        self.mappings
            .iter()
            .map(|m| m.desc)
            .find(|d| d.contains(gpa, len))
            .ok_or(bad)
    }

    /// Drops the host backing of `[gpa, gpa+len)` so that the next access
    /// reads zeros (or, once registered with userfaultfd, faults into the
    /// handler). Anonymous: `MADV_DONTNEED`; memfd/hugetlb: punch a hole.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<()> {
        let d = self.checked_region(gpa, len)?;
        let host = d.host_of(gpa);
        let err = |err| MemoryError::Release { gpa, len, err };
        match d.backing {
            Backing::Anon => {
                // SAFETY: [host, host+len) lies inside a mapping we own
                // (checked_region); dropping its pages is what the caller
                // asked for and does not affect other memory.
                let r = unsafe {
                    libc::madvise(
                        host as *mut libc::c_void,
                        to_usize(len),
                        libc::MADV_DONTNEED,
                    )
                };
                if r != 0 {
                    return Err(err(std::io::Error::last_os_error()));
                }
            }
            Backing::Memfd | Backing::Hugetlb => {
                let fd = self
                    .mappings
                    .iter()
                    .find(|m| m.desc.slot == d.slot)
                    .and_then(|m| m.file.as_ref())
                    .map(|f| f.as_raw_fd())
                    .unwrap_or(-1);
                let off = d.fd_offset + (gpa - d.gpa.0);
                let (Ok(off), Ok(flen)) = (i64::try_from(off), i64::try_from(len)) else {
                    return Err(err(std::io::Error::from_raw_os_error(libc::EINVAL)));
                };
                // SAFETY: fd is the memfd backing this region; punching a
                // hole inside it only drops the region's own pages.
                let r = unsafe {
                    libc::fallocate(
                        fd,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        off,
                        flen,
                    )
                };
                if r != 0 {
                    return Err(err(std::io::Error::last_os_error()));
                }
            }
        }
        Ok(())
    }

    /// Unmaps everything now (also done on drop). Returns the bytes unmapped.
    pub fn unmap_all(&mut self) -> u64 {
        self.guest_mem = None;
        let mut total = 0;
        for m in self.mappings.drain(..) {
            // SAFETY: the mapping is owned by us; our view of it (guest_mem)
            // was dropped above, and the clones of that view the vCPU
            // threads held went when Vm joined them. KVM slots referring to
            // it must already be gone (Vm drops the VM first). A clone of
            // `guest_memory()` kept past this point would dangle: callers
            // must not keep one.
            unsafe { libc::munmap(m.desc.host_addr as *mut libc::c_void, to_usize(m.desc.len)) };
            total += m.desc.len;
            drop(m.file);
        }
        total
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        self.unmap_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!("256M".parse::<MemSize>().unwrap().bytes(), 256 << 20);
        assert_eq!("1G".parse::<MemSize>().unwrap().bytes(), 1 << 30);
        assert_eq!("4g".parse::<MemSize>().unwrap().bytes(), 4 << 30);
        assert_eq!("2097152".parse::<MemSize>().unwrap().bytes(), 2 << 20);
        assert!(matches!("0".parse::<MemSize>(), Err(MemoryError::ZeroSize)));
        assert!(matches!(
            "0M".parse::<MemSize>(),
            Err(MemoryError::ZeroSize)
        ));
        assert!(matches!(
            "3M".parse::<MemSize>(),
            Err(MemoryError::Unaligned(_))
        ));
        assert!(matches!(
            "1T".parse::<MemSize>(),
            Err(MemoryError::TooBig(_))
        ));
        assert!(matches!(
            "abc".parse::<MemSize>(),
            Err(MemoryError::BadSize(_))
        ));
        assert!(matches!(
            "".parse::<MemSize>(),
            Err(MemoryError::BadSize(_))
        ));
        assert!(matches!(
            "99999999999G".parse::<MemSize>(),
            Err(MemoryError::BadSize(_))
        ));
        assert_eq!("256M".parse::<MemSize>().unwrap().to_string(), "256M");
    }

    #[test]
    fn anon_ram_reads_back_and_discards() {
        use vm_memory::Bytes;
        let ram = GuestRam::new("4M".parse().unwrap(), Backing::Anon, PageSize::Size2M).unwrap();
        let gm = ram.guest_memory();
        gm.write_obj(0xdead_beef_u64, GuestAddress(SIZE_2M + 8))
            .unwrap();
        assert_eq!(
            gm.read_obj::<u64>(GuestAddress(SIZE_2M + 8)).unwrap(),
            0xdead_beef
        );
        assert!(
            ram.discard(SIZE_4K, SIZE_4K).is_err(),
            "2M leaves need 2M releases"
        );
        ram.discard(SIZE_2M, SIZE_2M).unwrap();
        assert_eq!(gm.read_obj::<u64>(GuestAddress(SIZE_2M + 8)).unwrap(), 0);
    }

    #[test]
    fn memfd_ram_discards() {
        use vm_memory::Bytes;
        let ram = GuestRam::new("4M".parse().unwrap(), Backing::Memfd, PageSize::Size4K).unwrap();
        let gm = ram.guest_memory();
        gm.write_obj(7u64, GuestAddress(0x3000)).unwrap();
        ram.discard(0x3000, SIZE_4K).unwrap();
        assert_eq!(gm.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 0);
        assert!(ram.regions()[0].fd.is_some());
        assert_eq!(
            ram.regions()[0].host_addr % (2 << 20),
            0,
            "host mapping 2 MiB-aligned"
        );
    }
}
