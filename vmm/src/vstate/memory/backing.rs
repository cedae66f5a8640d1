//! Guest RAM backings: sizes, kinds, and the host mappings and files that
//! hold guest memory.
//!
//! Guest RAM is one host mapping per region, placed at guest physical
//! address 0 upward (the default guest keeps its page tables and descriptor
//! tables in the first 2 MiB, see `guest`). Four backings exist:
//!
//! | [`Backing`] | host memory | mapping | KVM slot |
//! |---|---|---|---|
//! | `anon` | private anonymous (THP asked for unless 4 KiB leaves) | private | `KVM_SET_USER_MEMORY_REGION` |
//! | `memfd` | a shared memfd (shmem) | shared | `KVM_SET_USER_MEMORY_REGION` |
//! | `hugetlb` | a hugetlb memfd of 2 MiB pages | shared | `KVM_SET_USER_MEMORY_REGION` |
//! | `guest-memfd` | a KVM `guest_memfd` created `MMAP \| INIT_SHARED` | shared | `KVM_SET_USER_MEMORY_REGION2` bound to the file |
//!
//! Every mapping is 2 MiB-aligned on the host, so guest 2 MiB leaves are
//! host huge pages where the backing has them, and has [`GUARD`] bytes of
//! `PROT_NONE` reservation on both sides: a host access that runs off
//! either end of guest RAM (a device or loader bug) faults at once instead
//! of reaching whatever the host mapped next to it (the fuzz targets,
//! `tests/fuzz/`, rely on this: AddressSanitizer does not see mmap bounds). Each region is described by
//! a [`RegionDesc`] (host address, length, kind, fd and offset) for whoever
//! mirrors it.
//!
//! Invariants: [`GuestRam`] owns its mappings and its files ([`OwnedFd`]);
//! a `RegionDesc` only borrows the file's number, valid while the
//! `GuestRam` lives. The `GuestMemoryMmap` view borrows the raw mappings
//! and is dropped before they are unmapped. Nothing here releases memory:
//! that is the gather's job (`release.rs`).

use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::str::FromStr;

use kvm_bindings::{
    kvm_create_guest_memfd, kvm_userspace_memory_region, kvm_userspace_memory_region2,
    KVM_MEM_GUEST_MEMFD,
};
use kvm_ioctls::{Cap, VmFd};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use super::stage2::Stage2Error;
use super::uffd::UffdError;

/// 4 KiB.
pub const SIZE_4K: u64 = 4 << 10;
/// 2 MiB.
pub const SIZE_2M: u64 = 2 << 20;
/// The largest guest RAM accepted (the default guest maps it with one PDPT).
pub const MAX_MEM_BYTES: u64 = 64 << 30;
/// Bytes of inaccessible (`PROT_NONE`) reservation kept on each side of
/// every guest RAM mapping, unmapped with it.
pub const GUARD: u64 = SIZE_2M;

/// `KVM_CAP_GUEST_MEMFD_FLAGS` (Linux 6.18 uapi): the `guest_memfd` flags
/// this KVM accepts (not in kvm-bindings 0.14 yet).
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u64 = 244;
/// `GUEST_MEMFD_FLAG_MMAP`: the file may be mmap'ed by the host.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// `GUEST_MEMFD_FLAG_INIT_SHARED`: its memory starts shared (faultable by
/// the host), as a non-confidential guest's RAM must be.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;

/// Errors of guest RAM set-up and of range checks.
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
    #[error("unknown backing '{0}': use anon, memfd, hugetlb or guest-memfd")]
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
    /// guest_memfd needs a VM to belong to.
    #[error("guest-memfd backing needs a KVM VM: a guest_memfd belongs to one VM")]
    GuestMemfdNeedsVm,
    /// The host's KVM lacks something guest_memfd backing needs.
    #[error(
        "guest-memfd backing is not supported by this host's KVM: {0}; use --backing memfd \
         (shared file memory, released the same way) or a newer kernel"
    )]
    GuestMemfdUnsupported(String),
    /// KVM_CREATE_GUEST_MEMFD failed.
    #[error("KVM_CREATE_GUEST_MEMFD of {1} bytes (flags MMAP|INIT_SHARED) failed: {0}")]
    GuestMemfd(kvm_ioctls::Error, u64),
    /// mmap failed.
    #[error("mapping {1} bytes of guest RAM failed: {0} (is there enough memory?)")]
    Mmap(std::io::Error, u64),
    /// vm-memory refused the region.
    #[error("building the guest memory map failed: {0}")]
    GuestMemory(String),
    /// KVM refused a memory slot.
    #[error("{0} for slot {1} failed: {2}")]
    Slot(&'static str, u32, kvm_ioctls::Error),
    /// The stage-2 mirror could not be built.
    #[error(transparent)]
    Stage2(#[from] Stage2Error),
    /// The userfaultfd handler could not be started.
    #[error(transparent)]
    FaultHandler(#[from] UffdError),
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
    /// Populating guest RAM failed.
    #[error("populating guest RAM (MADV_POPULATE_WRITE) failed: {0}")]
    Populate(std::io::Error),
}

impl MemoryError {
    /// Whether the request was sound but this host cannot serve it as it
    /// stands (a KVM capability missing, too few free huge pages): `vmm`
    /// exits with [`crate::EXIT_HOST_CANNOT`] for these, so scripts and
    /// tests can tell "not on this host" from a mistake.
    pub fn host_cannot(&self) -> bool {
        matches!(
            self,
            MemoryError::GuestMemfdUnsupported(_) | MemoryError::NoHugePages { .. }
        )
    }
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
    /// A KVM `guest_memfd` (shared, mmap'ed), bound to the memory slot.
    GuestMemfd,
}

impl Backing {
    /// Whether the backing is a file (released by punching holes).
    pub fn is_file(self) -> bool {
        self != Self::Anon
    }

    /// Whether a released page's next touch can be caught by userfaultfd
    /// (`MISSING` mode). Not on guest_memfd: the kernel refuses to register
    /// its mappings (`EINVAL` in every mode on Linux 6.18), so its pages
    /// come back through KVM and the kernel alone.
    pub fn has_demand_faults(self) -> bool {
        self != Self::GuestMemfd
    }
}

impl FromStr for Backing {
    type Err = MemoryError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "anon" => Ok(Self::Anon),
            "memfd" => Ok(Self::Memfd),
            "hugetlb" => Ok(Self::Hugetlb),
            "guest-memfd" | "guest_memfd" | "gmem" => Ok(Self::GuestMemfd),
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
            Self::GuestMemfd => "guest-memfd",
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
    /// The files behind the region (memfd, hugetlb memfd, guest_memfd;
    /// none for anon), borrowed: valid while the memory that described
    /// them lives.
    pub files: RegionFiles,
}

/// Most files one region's memory is split across (memfd backing).
pub const MAX_REGION_FILES: usize = 8;
/// Least bytes per file of a split memfd region.
pub const MIN_SPLIT_FILE_BYTES: u64 = 128 << 20;

/// The files behind one region, in address order: file `i` holds bytes
/// `[i * file_len, (i + 1) * file_len)` of the region (the last one what is
/// left), from offset 0 of the file.
///
/// memfd RAM is split into [`memfd_files`] files instead of one: the
/// kernel serialises the punch-holes of one file on the file's lock, so
/// only a release over several files can run on several cores (a whole-VM
/// release: `guest_mm` gives each file its own lane). Measured here: 1 GiB
/// of 4 KiB shmem pages, one punch-hole 258-283 ms, two threads punching
/// halves of one file 259-288 ms, two threads punching two files of
/// 512 MiB 145-156 ms (munmap + close of one file 274-289 ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionFiles {
    fds: [RawFd; MAX_REGION_FILES],
    n: usize,
    file_len: u64,
    region_len: u64,
}

/// One file of a region: `len` bytes at `region_offset` of the region are
/// the file's bytes from offset 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSpan {
    /// The file, borrowed.
    pub fd: RawFd,
    /// Where in the region the file starts.
    pub region_offset: u64,
    /// Bytes of the file in the region.
    pub len: u64,
}

impl RegionFiles {
    /// No file (anonymous memory).
    pub const NONE: RegionFiles = RegionFiles {
        fds: [-1; MAX_REGION_FILES],
        n: 0,
        file_len: 0,
        region_len: 0,
    };

    /// `fds` (at most [`MAX_REGION_FILES`]) each holding `file_len` bytes
    /// of a region of `region_len` bytes, in order.
    fn new(fds: &[RawFd], file_len: u64, region_len: u64) -> RegionFiles {
        if fds.is_empty() {
            return RegionFiles::NONE;
        }
        let mut f = RegionFiles {
            file_len,
            region_len,
            ..RegionFiles::NONE
        };
        for (slot, &fd) in f.fds.iter_mut().zip(fds) {
            *slot = fd;
            f.n += 1;
        }
        f
    }

    /// The first file, if any (the only one of hugetlb and guest_memfd RAM).
    pub fn first(&self) -> Option<RawFd> {
        (self.n > 0).then_some(self.fds[0])
    }

    /// Every file with the part of the region it holds.
    pub fn spans(&self) -> impl Iterator<Item = FileSpan> + '_ {
        let (file_len, region_len) = (self.file_len, self.region_len);
        self.fds[..self.n].iter().enumerate().map(move |(i, &fd)| {
            let region_offset = i as u64 * file_len;
            FileSpan {
                fd,
                region_offset,
                len: file_len.min(region_len - region_offset),
            }
        })
    }
}

/// How many files memfd RAM of `len` bytes is split into (see
/// [`RegionFiles`]): one per [`MIN_SPLIT_FILE_BYTES`], at most
/// [`MAX_REGION_FILES`], and the size of each but the last (a multiple of
/// 2 MiB, so no huge page straddles two files).
pub fn memfd_files(len: u64) -> (usize, u64) {
    let n = (len / MIN_SPLIT_FILE_BYTES).clamp(1, MAX_REGION_FILES as u64);
    let file_len = len.div_ceil(n).next_multiple_of(SIZE_2M);
    (n as usize, file_len)
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

/// Free 2 MiB huge pages of the host.
pub fn free_huge_pages() -> u64 {
    crate::proc_stats::free_huge_pages()
}

/// Checks that the host can provide `size` of `backing` with `page_size`
/// (for hugetlb: enough free huge pages), before anything is allocated.
/// guest_memfd support is checked against the VM when it is created.
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

/// Checks that `vm`'s KVM can back guest RAM with a host-mappable, shared
/// guest_memfd bound to a memory slot; says what is missing otherwise.
pub fn check_guest_memfd(vm: &VmFd) -> Result<()> {
    let flags = u64::try_from(vm.check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS)).unwrap_or(0);
    match guest_memfd_missing(
        vm.check_extension(Cap::GuestMemfd),
        vm.check_extension(Cap::UserMemory2),
        flags,
    ) {
        Some(missing) => Err(MemoryError::GuestMemfdUnsupported(missing)),
        None => Ok(()),
    }
}

/// What a KVM with these capabilities lacks for guest_memfd backing, if
/// anything: `KVM_CAP_GUEST_MEMFD`, `KVM_CAP_USER_MEMORY2`, and the
/// `MMAP` and `INIT_SHARED` flags in `KVM_CAP_GUEST_MEMFD_FLAGS`.
fn guest_memfd_missing(guest_memfd: bool, user_memory2: bool, flags: u64) -> Option<String> {
    if !guest_memfd {
        return Some(
            "KVM_CAP_GUEST_MEMFD is missing (Linux 6.8+ built with CONFIG_KVM_GUEST_MEMFD)".into(),
        );
    }
    if !user_memory2 {
        return Some("KVM_CAP_USER_MEMORY2 (KVM_SET_USER_MEMORY_REGION2) is missing".into());
    }
    let mut missing = Vec::new();
    if flags & GUEST_MEMFD_FLAG_MMAP == 0 {
        missing.push("GUEST_MEMFD_FLAG_MMAP");
    }
    if flags & GUEST_MEMFD_FLAG_INIT_SHARED == 0 {
        missing.push("GUEST_MEMFD_FLAG_INIT_SHARED");
    }
    (!missing.is_empty()).then(|| {
        format!(
            "KVM_CAP_GUEST_MEMFD_FLAGS is {flags:#x}, without {} (a host-mappable, shared \
             guest_memfd needs Linux 6.18+)",
            missing.join(" and ")
        )
    })
}

/// Maps `len` bytes at a 2 MiB-aligned host address, so that guest 2 MiB
/// leaves are host huge pages (THP needs host alignment; KVM maps a large
/// page only where guest and host addresses agree modulo 2 MiB), with
/// [`GUARD`] bytes of `PROT_NONE` reservation left on both sides (unmapped
/// by [`unmap_guarded`]).
fn map_aligned(
    len: usize,
    prot: libc::c_int,
    flags: libc::c_int,
    files: &RegionFiles,
) -> std::io::Result<*mut libc::c_void> {
    let align = to_usize(SIZE_2M);
    let guard = to_usize(GUARD);
    let span = len + align + 2 * guard;
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
    let start = (base as usize + guard).next_multiple_of(align);
    let pieces: Vec<(RawFd, usize, usize)> = match files.first() {
        None => vec![(-1, 0, len)],
        Some(_) => files
            .spans()
            .map(|f| (f.fd, to_usize(f.region_offset), to_usize(f.len)))
            .collect(),
    };
    let mut addr = start as *mut libc::c_void;
    for (fd, off, l) in pieces {
        // SAFETY: [start + off, start + off + l) lies inside [start,
        // start + len), inside the reservation made above (start + len +
        // guard <= base + span), which we own; MAP_FIXED replaces only that
        // part of it. fd is valid or -1 for anonymous memory.
        let a = unsafe {
            libc::mmap(
                (start + off) as *mut libc::c_void,
                l,
                prot,
                flags | libc::MAP_FIXED,
                fd,
                0,
            )
        };
        if a == libc::MAP_FAILED {
            addr = a;
            break;
        }
    }
    let err = std::io::Error::last_os_error();
    // What is left of the reservation beyond the guards.
    let head = start - guard - base as usize;
    let tail = span - head - len - 2 * guard;
    // SAFETY: the head and tail are the unused ends of our own reservation;
    // the guards next to [start, start+len) stay reserved.
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((start + len + guard) as *mut libc::c_void, tail);
        }
    }
    if addr == libc::MAP_FAILED {
        // SAFETY: the middle of our reservation and its guards, still ours.
        unsafe { unmap_guarded(start, len) };
        return Err(err);
    }
    Ok(addr)
}

/// Unmaps a mapping made by [`map_aligned`] at `start` of `len` bytes,
/// with its guards; whether `munmap` succeeded.
///
/// # Safety
///
/// `[start - GUARD, start + len + GUARD)` must be a reservation made by
/// `map_aligned` that nothing uses any more.
unsafe fn unmap_guarded(start: usize, len: usize) -> bool {
    let guard = to_usize(GUARD);
    // SAFETY: the caller's contract: the range is ours and unused.
    unsafe { libc::munmap((start - guard) as *mut libc::c_void, len + 2 * guard) == 0 }
}

pub(super) fn to_usize(v: u64) -> usize {
    // Only called on sizes already checked to be <= MAX_MEM_BYTES.
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// A memfd (hugetlb or not) of `len` bytes.
fn memfd(len: u64, hugetlb: bool) -> Result<OwnedFd> {
    let mut flags = libc::MFD_CLOEXEC;
    if hugetlb {
        flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    }
    // SAFETY: the name is a NUL-terminated static string; the call has no
    // memory side effects.
    let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let file = std::fs::File::from(fd);
    file.set_len(len)
        .map_err(|e| MemoryError::Truncate(e, len))?;
    Ok(OwnedFd::from(file))
}

/// A host-mappable, initially shared guest_memfd of `len` bytes for `vm`.
fn guest_memfd(vm: &VmFd, len: u64) -> Result<OwnedFd> {
    check_guest_memfd(vm)?;
    let fd = vm
        .create_guest_memfd(kvm_create_guest_memfd {
            size: len,
            flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            reserved: [0; 6],
        })
        .map_err(|e| MemoryError::GuestMemfd(e, len))?;
    // SAFETY: fd was just returned by KVM_CREATE_GUEST_MEMFD and is owned
    // by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One owned host mapping and the file behind it.
struct Mapping {
    desc: RegionDesc,
    prot: libc::c_int,
    flags: libc::c_int,
    /// Never read: held so that they are closed when the mapping is
    /// dropped, which is only once it is unmapped (see
    /// `GuestRam::unmap_all`).
    _files: Vec<OwnedFd>,
}

/// Guest RAM: its host mappings, their files and a vm-memory view of them
/// (owned by [`super::VmMemory`] in a VM; alone, with no stage-2 table, by
/// the boot loader's fuzz target and tests).
pub struct GuestRam {
    // Dropped before `mappings` are unmapped (see `unmap_all`).
    guest_mem: Option<GuestMemoryMmap>,
    /// Still mapped: all of them until `unmap_all`, then those whose
    /// `munmap` failed (retried by the next `unmap_all`).
    mappings: Vec<Mapping>,
    faults: std::sync::Arc<super::faults::MemoryFaults>,
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

impl GuestRam {
    /// Allocates and maps guest RAM of `size` with `backing` and
    /// `page_size`; guest_memfd needs the VM it belongs to.
    pub fn new(
        size: MemSize,
        backing: Backing,
        page_size: PageSize,
        vm: Option<&VmFd>,
    ) -> Result<Self> {
        let len = size.bytes();
        let ulen = to_usize(len);
        check_backing(size, backing, page_size)?;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let (files, file_len, flags) = match backing {
            Backing::Anon => (
                Vec::new(),
                0,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            ),
            Backing::Memfd => {
                let (n, file_len) = memfd_files(len);
                let files = (0..n as u64)
                    .map(|i| memfd(file_len.min(len - i * file_len), false))
                    .collect::<Result<Vec<_>>>()?;
                (files, file_len, libc::MAP_SHARED | libc::MAP_NORESERVE)
            }
            Backing::Hugetlb => (
                vec![memfd(len, true)?],
                len,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
            ),
            Backing::GuestMemfd => (
                vec![guest_memfd(vm.ok_or(MemoryError::GuestMemfdNeedsVm)?, len)?],
                len,
                libc::MAP_SHARED,
            ),
        };
        let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        let region_files = RegionFiles::new(&fds, file_len, len);
        let addr =
            map_aligned(ulen, prot, flags, &region_files).map_err(|e| MemoryError::Mmap(e, len))?;
        let advice = match (backing, page_size) {
            // hugetlb is huge already; guest_memfd allocates 4 KiB folios
            // whatever the advice.
            (Backing::Hugetlb | Backing::GuestMemfd, _) => None,
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
            files: region_files,
        };
        let mut ram = Self {
            guest_mem: None,
            faults: std::sync::Arc::default(),
            mappings: vec![Mapping {
                desc,
                prot,
                flags,
                _files: files,
            }],
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
                    m.prot,
                    m.flags,
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

    /// Registers every region with `vm` as a KVM memory slot: a user
    /// memory region over the mapping, bound to the file for guest_memfd
    /// (`KVM_SET_USER_MEMORY_REGION2` with `KVM_MEM_GUEST_MEMFD`: KVM then
    /// faults guest pages from the file itself, and a punched hole zaps
    /// them through KVM's guest_memfd invalidation).
    ///
    /// The caller must drop `vm` (and with it the slots) before this RAM.
    ///
    /// All or nothing: if one slot cannot be made, the ones made before it
    /// are deleted again (a slot of size 0) before the error is returned,
    /// so that no slot is left to refer to RAM the caller then unmaps.
    pub fn register_slots(&self, vm: &VmFd) -> Result<()> {
        for (i, m) in self.mappings.iter().enumerate() {
            if let Err(e) = Self::register_slot(vm, &m.desc, &self.faults.memslot) {
                for done in &self.mappings[..i] {
                    Self::delete_slot(vm, &done.desc);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Deletes the slot of `r` (`memory_size` 0), best effort: it is only
    /// called to undo a registration, and a slot KVM cannot delete goes
    /// with the VM, which the caller drops before this RAM.
    fn delete_slot(vm: &VmFd, r: &RegionDesc) {
        let region = kvm_userspace_memory_region {
            slot: r.slot,
            flags: 0,
            guest_phys_addr: r.gpa.0,
            memory_size: 0,
            userspace_addr: r.host_addr as u64,
        };
        // SAFETY: deleting a slot makes KVM drop its references to the
        // mapping; no memory is handed to KVM.
        let _ = unsafe { vm.set_user_memory_region(region) };
    }

    /// One slot for `r` (`fail` injects a failure of the ioctl).
    fn register_slot(vm: &VmFd, r: &RegionDesc, fail: &guest_mm::FailPoint) -> Result<()> {
        let injected = || kvm_ioctls::Error::new(guest_mm::fault::INJECTED_ERRNO);
        match (r.backing, r.files.first()) {
            (Backing::GuestMemfd, Some(fd)) => {
                let region = kvm_userspace_memory_region2 {
                    slot: r.slot,
                    flags: KVM_MEM_GUEST_MEMFD,
                    guest_phys_addr: r.gpa.0,
                    memory_size: r.len,
                    userspace_addr: r.host_addr as u64,
                    guest_memfd_offset: 0,
                    guest_memfd: u32::try_from(fd).unwrap_or(u32::MAX),
                    pad1: 0,
                    pad2: [0; 14],
                };
                let res = if fail.should_fail() {
                    Err(injected())
                } else {
                    // SAFETY: the host range is a live shared mapping of
                    // the guest_memfd, both owned by `self`, which
                    // outlives the slot (the caller drops the VM first).
                    unsafe { vm.set_user_memory_region2(region) }
                };
                res.map_err(|e| MemoryError::Slot("KVM_SET_USER_MEMORY_REGION2", r.slot, e))?;
            }
            _ => {
                let region = kvm_userspace_memory_region {
                    slot: r.slot,
                    flags: 0,
                    guest_phys_addr: r.gpa.0,
                    memory_size: r.len,
                    userspace_addr: r.host_addr as u64,
                };
                let res = if fail.should_fail() {
                    Err(injected())
                } else {
                    // SAFETY: the host range is a live mapping owned by
                    // `self`, which outlives the slot (the caller drops
                    // the VM first).
                    unsafe { vm.set_user_memory_region(region) }
                };
                res.map_err(|e| MemoryError::Slot("KVM_SET_USER_MEMORY_REGION", r.slot, e))?;
            }
        }
        Ok(())
    }

    /// The vm-memory view (for set-up and host-side checks).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        // Always Some between new() and unmap_all().
        self.guest_mem
            .as_ref()
            .unwrap_or_else(|| unreachable!("guest memory view exists until unmapped"))
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

    /// The injection points (shared with the owner, [`super::VmMemory`]).
    pub(crate) fn set_faults(&mut self, faults: std::sync::Arc<super::faults::MemoryFaults>) {
        self.faults = faults;
    }

    /// Unmaps everything and closes the files. Returns the bytes unmapped
    /// by this call. A mapping whose `munmap` fails
    /// [`super::faults::SYSCALL_ATTEMPTS`] times stays (with its file) for
    /// the next call: see [`GuestRam::mapped_bytes`].
    pub fn unmap_all(&mut self) -> u64 {
        self.guest_mem = None;
        let mut total = 0;
        let faults = std::sync::Arc::clone(&self.faults);
        self.mappings.retain(|m| {
            let (addr, len) = (m.desc.host_addr, to_usize(m.desc.len));
            for _ in 0..super::faults::SYSCALL_ATTEMPTS {
                if faults.munmap.should_fail() {
                    continue;
                }
                // SAFETY: the mapping (map_aligned's, with its guards) is
                // owned by us; our view of it (guest_mem) was dropped
                // above, and the clones of that view the vCPU threads held
                // went when Vm joined them. KVM slots referring to it must
                // already be gone (Vm drops the VM first). A clone of
                // `guest_memory()` kept past this point would dangle:
                // callers must not keep one.
                if unsafe { unmap_guarded(addr, len) } {
                    total += m.desc.len;
                    // Dropping `m` closes the files (and with them a
                    // memfd's pages) after the mapping.
                    return false;
                }
            }
            true
        });
        total
    }

    /// Bytes still mapped: all of RAM before [`GuestRam::unmap_all`], the
    /// mappings whose `munmap` failed after it.
    pub fn mapped_bytes(&self) -> u64 {
        self.mappings.iter().map(|m| m.desc.len).sum()
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        self.unmap_all();
        // Nobody can retry any more: what is still mapped is leaked, and
        // counted as such.
        let left = self.mapped_bytes();
        if left > 0 {
            super::faults::note_leaked_ram(left);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `[addr, addr + 4096)` is mapped at all (any protection).
    fn mapped(addr: usize) -> bool {
        let mut v = [0u8; 1];
        // SAFETY: mincore only reports residency into `v` (one page); it
        // fails with ENOMEM where nothing is mapped.
        unsafe { libc::mincore(addr as *mut libc::c_void, 4096, v.as_mut_ptr()) == 0 }
    }

    #[test]
    fn guest_ram_has_guards_on_both_sides_and_unmaps_them() {
        let mut ram =
            GuestRam::new("4M".parse().unwrap(), Backing::Anon, PageSize::Size4K, None).unwrap();
        let r = ram.regions()[0];
        let (lo, hi) = (r.host_addr, r.host_addr + to_usize(r.len));
        let g = to_usize(GUARD);
        for a in [lo - g, lo - 4096, hi, hi + g - 4096] {
            assert!(mapped(a), "guard page at {a:#x} missing");
        }
        ram.unmap_all();
        for a in [lo - g, lo, hi - 4096, hi + g - 4096] {
            assert!(!mapped(a), "{a:#x} still mapped after unmap_all");
        }
    }

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
    fn parses_backings() {
        for b in [
            Backing::Anon,
            Backing::Memfd,
            Backing::Hugetlb,
            Backing::GuestMemfd,
        ] {
            assert_eq!(b.to_string().parse::<Backing>().unwrap(), b);
        }
        assert_eq!(
            "guest_memfd".parse::<Backing>().unwrap(),
            Backing::GuestMemfd
        );
        let e = "shm".parse::<Backing>().unwrap_err();
        assert!(e.to_string().contains("guest-memfd"), "{e}");
    }

    #[test]
    fn guest_memfd_support_says_what_is_missing() {
        assert_eq!(guest_memfd_missing(true, true, 3), None);
        assert_eq!(guest_memfd_missing(true, true, 7), None);
        let m = guest_memfd_missing(false, true, 3).unwrap();
        assert!(m.contains("KVM_CAP_GUEST_MEMFD is missing"), "{m}");
        let m = guest_memfd_missing(true, false, 3).unwrap();
        assert!(m.contains("KVM_CAP_USER_MEMORY2"), "{m}");
        // Linux 6.17: MMAP alone (memory shared by default there, private
        // by default from 6.18 on).
        let m = guest_memfd_missing(true, true, 1).unwrap();
        assert!(m.contains("without GUEST_MEMFD_FLAG_INIT_SHARED"), "{m}");
        assert!(!m.contains("FLAG_MMAP"), "{m}");
        // Linux 6.8 - 6.16: no flags capability at all.
        let m = guest_memfd_missing(true, true, 0).unwrap();
        assert!(
            m.contains("GUEST_MEMFD_FLAG_MMAP and GUEST_MEMFD_FLAG_INIT_SHARED"),
            "{m}"
        );
        let e = MemoryError::GuestMemfdUnsupported(m);
        assert!(e.to_string().contains("--backing memfd"), "{e}");
    }

    #[test]
    fn guest_memfd_needs_a_vm() {
        let e = GuestRam::new(
            "4M".parse().unwrap(),
            Backing::GuestMemfd,
            PageSize::Size4K,
            None,
        )
        .unwrap_err();
        assert!(matches!(e, MemoryError::GuestMemfdNeedsVm), "{e:?}");
    }

    #[test]
    fn memfd_ram_is_split_into_files_in_address_order() {
        assert_eq!(memfd_files(2 << 20), (1, 2 << 20));
        assert_eq!(memfd_files(254 << 20), (1, 254 << 20));
        assert_eq!(memfd_files(256 << 20), (2, 128 << 20));
        assert_eq!(memfd_files(1 << 30), (8, 128 << 20));
        assert_eq!(memfd_files(4 << 30), (8, 512 << 20));
        // Rounded up to 2 MiB: the last file holds what is left.
        assert_eq!(memfd_files(258 << 20), (2, 130 << 20));
        let ram = GuestRam::new(
            "258M".parse().unwrap(),
            Backing::Memfd,
            PageSize::Size4K,
            None,
        )
        .unwrap();
        let r = ram.regions()[0];
        let spans: Vec<FileSpan> = r.files.spans().collect();
        assert_eq!(spans.len(), 2);
        assert_eq!((spans[0].region_offset, spans[0].len), (0, 130 << 20));
        assert_eq!(
            (spans[1].region_offset, spans[1].len),
            (130 << 20, 128 << 20)
        );
        assert_eq!(r.files.first(), Some(spans[0].fd));
        use vm_memory::Bytes;
        let gm = ram.guest_memory();
        for (f, v) in spans.iter().zip([0x1111u64, 0x2222]) {
            gm.write_obj(v, GuestAddress(f.region_offset + 8)).unwrap();
            let mut got = [0u8; 8];
            // SAFETY: reads 8 bytes of our own file into `got`.
            let n = unsafe { libc::pread(f.fd, got.as_mut_ptr().cast(), 8, 8) };
            assert_eq!(n, 8);
            assert_eq!(
                u64::from_ne_bytes(got),
                v,
                "guest bytes land in their own file"
            );
            let size = std::fs::metadata(format!("/proc/self/fd/{}", f.fd))
                .unwrap()
                .len();
            assert_eq!(size, f.len);
        }
        let anon =
            GuestRam::new("4M".parse().unwrap(), Backing::Anon, PageSize::Size4K, None).unwrap();
        assert_eq!(anon.regions()[0].files, RegionFiles::NONE);
        assert_eq!(anon.regions()[0].files.spans().count(), 0);
    }

    #[test]
    fn memfd_ram_is_an_aligned_shared_file() {
        use vm_memory::Bytes;
        let ram = GuestRam::new(
            "4M".parse().unwrap(),
            Backing::Memfd,
            PageSize::Size4K,
            None,
        )
        .unwrap();
        let gm = ram.guest_memory();
        gm.write_obj(7u64, GuestAddress(0x3000)).unwrap();
        assert_eq!(gm.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 7);
        assert!(ram.regions()[0].files.first().is_some());
        assert_eq!(
            ram.regions()[0].host_addr % (2 << 20),
            0,
            "host mapping 2 MiB-aligned"
        );
    }
}
