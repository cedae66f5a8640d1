//! Booting a real Linux kernel: checking and loading the kernel, initrd and
//! command line, the boot protocol structures (PVH `hvm_start_info` or the
//! `boot_params` zero page), the MP table, CPUID and the first vCPU state.
//!
//! | file | what |
//! |---|---|
//! | [`layout`] | guest-physical addresses of the boot structures, the memory map |
//! | [`image`] | recognising and checking an ELF vmlinux or bzImage |
//! | [`mptable`] | Intel MP 1.4 tables (vCPUs, ISA bus, IOAPIC, IRQ routes) |
//! | [`cpuid`] | CPUID from KVM's supported set, APIC ids, topology, KVM leaves |
//! | [`cpu`] | registers, segments, GDT, MSRs, FPU, LAPIC LINT pins |
//!
//! The loaders and boot-parameter writers are linux-loader's (rust-vmm):
//! ELF with the PVH note, bzImage, `PvhBootConfigurator`,
//! `LinuxBootConfigurator`, `Cmdline`.
//!
//! **Invariants.**
//! - [`prepare`] reads every file and checks everything that can be known
//!   before a VM exists (format, architecture, truncation, that the 64-bit
//!   entry point lies inside the kernel, that kernel and initrd fit in RAM
//!   without overlapping, command line length, RAM and vCPU limits); it
//!   touches nothing else. A [`Prepared`] boot therefore loads without
//!   error into a guest memory of the size it was prepared for (the
//!   kernel's notes included: [`image`] walks them as the loader will).
//! - [`Prepared::load`] writes only guest memory below the end of RAM: the
//!   kernel (at or above 1 MiB), the initrd (page-aligned, above the kernel,
//!   below end of RAM and the kernel's initrd limit), the fixed structures of
//!   [`layout`].

pub mod cpu;
pub mod cpuid;
pub mod image;
pub mod layout;
pub mod mptable;

use std::io::{Cursor, Seek, SeekFrom};
use std::path::PathBuf;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use image::{KernelFormat, KernelImage, Source};
use layout::{
    memory_map, BOOT_GDT, BOOT_IDT, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MAX_LINUX_MEM,
    MAX_LINUX_VCPUS, MEMMAP_START, MODLIST_START, PDE_START, PDPTE_START, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};

/// The command line this host needs for the fixture kernel (see
/// `../shared/linux-guest/README.md`); the monitor appends its
/// `virtio_mmio.device=` entries.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 noxsave \
clearcpuid=popcnt,cx16,smap,smep,pcid,invpcid,fsgsbase,rdrand,rdseed,rdpid \
nopti mitigations=off tsc=reliable no_timer_check reboot=k panic=-1 \
i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// Errors of checking and loading a Linux boot. Each says what to change.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file cannot be read.
    #[error("cannot read the {what} {path}: {err}; check the path and its permissions")]
    Read {
        /// Kernel or initrd.
        what: &'static str,
        /// The path given.
        path: String,
        /// Why.
        err: std::io::Error,
    },
    /// Neither ELF nor bzImage.
    #[error(
        "{0} is neither an x86-64 ELF vmlinux nor a bzImage: give --kernel an uncompressed \
         vmlinux (with a PVH note) or arch/x86/boot/bzImage"
    )]
    NotAKernel(String),
    /// The file ends before something the header promises.
    #[error("{path} is truncated: {what} lies past the end of the file; copy the kernel again")]
    Truncated {
        /// The path.
        path: String,
        /// What is missing.
        what: String,
    },
    /// The kernel's entry point is not inside what it loads.
    #[error(
        "the kernel's {how} entry point {entry:#x} lies outside the kernel it loads \
         ([{start:#x}, {end:#x})): the image is corrupt or not a kernel for this boot path"
    )]
    BadEntry {
        /// Which entry (`"64-bit"`, `"PVH"`).
        how: &'static str,
        /// The entry point.
        entry: u64,
        /// First byte the kernel may occupy.
        start: u64,
        /// First byte past it.
        end: u64,
    },
    /// Not a 64-bit x86 kernel.
    #[error("{path} is {what}, not a 64-bit x86 kernel: build the kernel for x86_64")]
    WrongArch {
        /// The path.
        path: String,
        /// What it is.
        what: String,
    },
    /// A malformed ELF.
    #[error("{path} is not a loadable kernel: {what}")]
    BadElf {
        /// The path.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// The kernel does not fit in RAM.
    #[error(
        "the kernel {path} needs guest RAM up to {end:#x} but the guest has only {mem:#x} \
         bytes: raise --mem"
    )]
    KernelTooBig {
        /// The path.
        path: String,
        /// First byte past the loaded kernel.
        end: u64,
        /// RAM size.
        mem: u64,
    },
    /// The initrd does not fit between kernel and end of RAM.
    #[error(
        "the initrd {path} ({size} bytes) does not fit between the kernel's end {kernel_end:#x} \
         and {limit:#x} (end of RAM or the kernel's initrd limit): raise --mem or use a \
         smaller initrd"
    )]
    InitrdTooBig {
        /// The path.
        path: String,
        /// Its size.
        size: u64,
        /// First byte past the kernel.
        kernel_end: u64,
        /// Highest end allowed.
        limit: u64,
    },
    /// Empty initrd file.
    #[error("the initrd {0} is empty: give a cpio archive or leave --initrd out")]
    EmptyInitrd(String),
    /// The command line is too long or malformed.
    #[error("the kernel command line is {len} bytes but this kernel takes at most {max}: shorten --cmdline")]
    CmdlineTooLong {
        /// Its length (with the monitor's additions).
        len: usize,
        /// The limit (NUL excluded).
        max: usize,
    },
    /// The command line has characters Linux cannot take.
    #[error("the kernel command line is invalid ({0}): use printable ASCII without NUL")]
    BadCmdline(String),
    /// RAM size outside what a Linux guest supports here.
    #[error(
        "a Linux guest needs between 16 MiB and {} MiB of RAM here, got {} MiB: RAM is one \
         region at address 0 and must end below the 32-bit MMIO/APIC hole at 3 GiB (not \
         handled yet); change --mem",
        MAX_LINUX_MEM >> 20, .0 >> 20
    )]
    BadMemSize(u64),
    /// Too many (or zero) vCPUs.
    #[error(
        "a Linux guest takes 1 to {MAX_LINUX_VCPUS} vCPUs (MP table), got {0}: change --vcpus"
    )]
    TooManyVcpus(u32),
    /// Writing guest memory failed (the region is smaller than prepared for).
    #[error("writing {0} into guest memory failed: {1}")]
    Write(&'static str, String),
    /// linux-loader refused an image `prepare` accepted.
    #[error("loading the kernel failed: {0}")]
    Load(String),
    /// A CPUID or MSR list too long for KVM's structures.
    #[error("{0} CPUID/MSR entries do not fit KVM's limit")]
    Cpuid(usize),
    /// KVM refused one of the boot MSRs.
    #[error("KVM refused to set MSR {0:#x} at boot; this KVM cannot run the Linux boot path")]
    Msr(u32),
    /// A vCPU ioctl failed.
    #[error("{0} failed while setting up a Linux vCPU: {1}")]
    Vcpu(&'static str, kvm_ioctls::Error),
}

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxSpec {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// An initramfs (cpio), optional.
    pub initrd: Option<PathBuf>,
    /// The kernel command line (without the monitor's device entries).
    pub cmdline: String,
}

impl LinuxSpec {
    /// A spec with [`DEFAULT_CMDLINE`] and no initrd.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
        }
    }
}

/// A virtio-mmio device to announce on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// Window base.
    pub base: u64,
    /// Window size.
    pub size: u64,
    /// Its IOAPIC pin / GSI.
    pub irq: u32,
}

/// Which entry the kernel is started at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// PVH: 32-bit protected mode, EBX = `hvm_start_info`.
    Pvh,
    /// Linux 64-bit boot protocol: long mode, RSI = zero page.
    Linux64,
}

/// Where the vCPUs start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    /// The protocol.
    pub protocol: Protocol,
    /// First instruction.
    pub entry: u64,
}

/// A checked boot, ready to load into guest memory of `mem` bytes.
#[derive(Debug)]
pub struct Prepared {
    kernel: KernelImage,
    /// The open initrd, its size and its guest address.
    initrd: Option<(std::fs::File, u64, u64)>,
    cmdline: Cmdline,
    cmdline_len: usize,
    mem: u64,
    vcpus: u32,
}

fn align_down(v: u64, a: u64) -> u64 {
    v & !(a - 1)
}

/// Reads and checks everything for booting `spec` with `mem` bytes of RAM,
/// `vcpus` vCPUs and the virtio-mmio `devices`; see the module invariants.
pub fn prepare(
    spec: &LinuxSpec,
    mem: u64,
    vcpus: u32,
    devices: &[MmioDeviceInfo],
) -> Result<Prepared, BootError> {
    // The same bounds as the memory map's, checked before any file is read.
    memory_map(mem)?;
    if vcpus == 0 || vcpus > MAX_LINUX_VCPUS {
        return Err(BootError::TooManyVcpus(vcpus));
    }
    let kpath = spec.kernel.display().to_string();
    let file = std::fs::File::open(&spec.kernel).map_err(|err| BootError::Read {
        what: "kernel",
        path: kpath.clone(),
        err,
    })?;
    let kernel = image::inspect_file(&kpath, file, mem)?;
    let (cmd_max, initrd_limit) = match kernel.format {
        // PVH: our own limit; the initrd anywhere in RAM below 4 GiB.
        KernelFormat::Elf => (CMDLINE_MAX_SIZE - 1, mem),
        KernelFormat::BzImage {
            initrd_addr_max,
            cmdline_size,
        } => (
            cmdline_size.min(CMDLINE_MAX_SIZE - 1),
            mem.min(initrd_addr_max.saturating_add(1)),
        ),
    };
    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE * 4).map_err(|e| BootError::BadCmdline(e.to_string()))?;
    cmdline
        .insert_str(spec.cmdline.trim())
        .map_err(|e| BootError::BadCmdline(e.to_string()))?;
    for d in devices {
        cmdline
            .add_virtio_mmio_device(d.size, GuestAddress(d.base), d.irq, None)
            .map_err(|e| BootError::BadCmdline(e.to_string()))?;
    }
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| BootError::BadCmdline(e.to_string()))?
        .as_bytes()
        .len();
    if cmdline_len > cmd_max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline_len,
            max: cmd_max,
        });
    }
    let initrd = match &spec.initrd {
        None => None,
        Some(p) => {
            let path = p.display().to_string();
            let io = |err| BootError::Read {
                what: "initrd",
                path: path.clone(),
                err,
            };
            let file = std::fs::File::open(p).map_err(io)?;
            let size = file.metadata().map_err(io)?.len();
            if size == 0 {
                return Err(BootError::EmptyInitrd(path));
            }
            let kernel_end = kernel.end.next_multiple_of(4096);
            let addr = initrd_limit
                .checked_sub(size)
                .map(|a| align_down(a, 4096))
                .filter(|&a| a >= kernel_end);
            let Some(addr) = addr else {
                return Err(BootError::InitrdTooBig {
                    path,
                    size,
                    kernel_end,
                    limit: initrd_limit,
                });
            };
            Some((file, size, addr))
        }
    };
    Ok(Prepared {
        kernel,
        initrd,
        cmdline,
        cmdline_len,
        mem,
        vcpus,
    })
}

impl Prepared {
    /// The command line the kernel will get.
    pub fn cmdline(&self) -> String {
        self.cmdline
            .as_cstring()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The initrd's guest address and size, if any.
    pub fn initrd_range(&self) -> Option<(u64, u64)> {
        self.initrd.as_ref().map(|(_, size, a)| (*a, *size))
    }

    /// The guest ranges [`Prepared::load_kernel`] copies the kernel's file
    /// bytes to (see [`image::KernelImage::loads`]).
    pub fn kernel_loads(&self) -> &[(u64, u64)] {
        &self.kernel.loads
    }

    /// Writes kernel, initrd, command line, boot parameters, MP table, GDT
    /// and (64-bit protocol) page tables into `gm`; returns the entry.
    pub fn load(&self, gm: &GuestMemoryMmap) -> Result<BootEntry, BootError> {
        let entry = self.load_kernel(gm)?;
        self.load_initrd(gm)?;
        Ok(entry)
    }

    /// The initrd's part of [`Prepared::load`]: its bytes at the address
    /// `prepare` chose (nothing else is written there, so it may run
    /// beside [`Prepared::load_kernel`]).
    pub fn load_initrd(&self, gm: &GuestMemoryMmap) -> Result<(), BootError> {
        if let Some((file, size, addr)) = &self.initrd {
            let err = |e: &dyn std::fmt::Display| BootError::Write("the initrd", e.to_string());
            // Straight from the file into guest memory (no heap copy).
            let mut f = file;
            f.seek(SeekFrom::Start(0)).map_err(|e| err(&e))?;
            let n = usize::try_from(*size).map_err(|e| err(&e))?;
            gm.read_exact_volatile_from(GuestAddress(*addr), &mut f, n)
                .map_err(|e| err(&e))?;
        }
        Ok(())
    }

    /// [`Prepared::load`] but the initrd: kernel, command line, boot
    /// parameters (which point at where the initrd goes), MP table, GDT
    /// and page tables; returns the entry.
    pub fn load_kernel(&self, gm: &GuestMemoryMmap) -> Result<BootEntry, BootError> {
        let w = |what: &'static str| {
            move |e: vm_memory::GuestMemoryError| BootError::Write(what, e.to_string())
        };
        let himem = Some(GuestAddress(HIMEM_START));
        let (entry, setup_header) = match self.kernel.format {
            KernelFormat::Elf => {
                let r = match &self.kernel.source {
                    Source::File(f) => {
                        let mut f = f;
                        f.seek(SeekFrom::Start(0))
                            .map_err(|e| BootError::Load(e.to_string()))?;
                        Elf::load(gm, None, &mut f, himem)
                    }
                    Source::Bytes(b) => Elf::load(gm, None, &mut Cursor::new(b.as_slice()), himem),
                }
                .map_err(|e| BootError::Load(e.to_string()))?;
                match r.pvh_boot_cap {
                    PvhBootCapability::PvhEntryPresent(a) => (
                        BootEntry {
                            protocol: Protocol::Pvh,
                            entry: a.0,
                        },
                        None,
                    ),
                    _ => (
                        BootEntry {
                            protocol: Protocol::Linux64,
                            entry: r.kernel_load.0,
                        },
                        None,
                    ),
                }
            }
            KernelFormat::BzImage { .. } => {
                let r = match &self.kernel.source {
                    Source::File(f) => {
                        let mut f = f;
                        f.seek(SeekFrom::Start(0))
                            .map_err(|e| BootError::Load(e.to_string()))?;
                        BzImage::load(gm, None, &mut f, himem)
                    }
                    Source::Bytes(b) => {
                        BzImage::load(gm, None, &mut Cursor::new(b.as_slice()), himem)
                    }
                }
                .map_err(|e| BootError::Load(e.to_string()))?;
                (
                    BootEntry {
                        protocol: Protocol::Linux64,
                        // The 64-bit entry is 0x200 past the load address.
                        entry: r.kernel_load.0 + 0x200,
                    },
                    r.setup_header,
                )
            }
        };
        // `prepare` checked both entries against the image; checked again
        // here in case the file changed since.
        if !(HIMEM_START..self.kernel.end).contains(&entry.entry) {
            return Err(BootError::BadEntry {
                how: match entry.protocol {
                    Protocol::Pvh => "PVH",
                    Protocol::Linux64 => "64-bit",
                },
                entry: entry.entry,
                start: HIMEM_START,
                end: self.kernel.end,
            });
        }
        load_cmdline(gm, GuestAddress(CMDLINE_START), &self.cmdline)
            .map_err(|e| BootError::Write("the command line", e.to_string()))?;
        mptable::write(gm, self.vcpus)?;
        let gdt = cpu::gdt_table(entry.protocol);
        for (i, e) in gdt.iter().enumerate() {
            gm.write_obj(*e, GuestAddress(BOOT_GDT + 8 * i as u64))
                .map_err(w("the boot GDT"))?;
        }
        gm.write_obj(0u64, GuestAddress(BOOT_IDT))
            .map_err(w("the boot IDT"))?;
        let map = memory_map(self.mem)?;
        match entry.protocol {
            Protocol::Pvh => self.write_pvh(gm, &map)?,
            Protocol::Linux64 => {
                self.write_zero_page(gm, &map, setup_header)?;
                write_page_tables(gm)?;
            }
        }
        Ok(entry)
    }

    fn write_pvh(&self, gm: &GuestMemoryMmap, map: &[layout::MemRange]) -> Result<(), BootError> {
        let memmap: Vec<hvm_memmap_table_entry> = map
            .iter()
            .map(|r| hvm_memmap_table_entry {
                addr: r.addr,
                size: r.size,
                type_: r.kind,
                reserved: 0,
            })
            .collect();
        let modules: Vec<hvm_modlist_entry> = self
            .initrd_range()
            .map(|(paddr, size)| hvm_modlist_entry {
                paddr,
                size,
                ..Default::default()
            })
            .into_iter()
            .collect();
        let start_info = hvm_start_info {
            magic: 0x336e_c578, // XEN_HVM_START_MAGIC_VALUE
            version: 1,         // with the memory map
            nr_modules: modules.len() as u32,
            modlist_paddr: if modules.is_empty() { 0 } else { MODLIST_START },
            cmdline_paddr: CMDLINE_START,
            memmap_paddr: MEMMAP_START,
            memmap_entries: memmap.len() as u32,
            ..Default::default()
        };
        let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
        params.set_sections(&memmap, GuestAddress(MEMMAP_START));
        if !modules.is_empty() {
            params.set_modules(&modules, GuestAddress(MODLIST_START));
        }
        PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, gm)
            .map_err(|e| BootError::Write("the PVH start info", e.to_string()))
    }

    fn write_zero_page(
        &self,
        gm: &GuestMemoryMmap,
        map: &[layout::MemRange],
        hdr: Option<linux_loader::loader::bootparam::setup_header>,
    ) -> Result<(), BootError> {
        let mut p = boot_params::default();
        if let Some(h) = hdr {
            p.hdr = h;
        }
        p.hdr.type_of_loader = 0xff;
        p.hdr.boot_flag = 0xaa55;
        p.hdr.header = 0x5372_6448;
        p.hdr.kernel_alignment = 0x0100_0000;
        p.hdr.cmd_line_ptr = CMDLINE_START as u32;
        p.hdr.cmdline_size = self.cmdline_len as u32;
        if let Some((addr, size)) = self.initrd_range() {
            p.hdr.ramdisk_image = addr as u32;
            p.hdr.ramdisk_size = size as u32;
        }
        for (i, r) in map.iter().enumerate() {
            p.e820_table[i] = boot_e820_entry {
                addr: r.addr,
                size: r.size,
                r#type: r.kind,
            };
        }
        p.e820_entries = map.len() as u8;
        LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
            &BootParams::new(&p, GuestAddress(ZERO_PAGE_START)),
            gm,
        )
        .map_err(|e| BootError::Write("the zero page", e.to_string()))
    }
}

/// Identity-maps the first GiB with 2 MiB pages (64-bit boot protocol).
fn write_page_tables(gm: &GuestMemoryMmap) -> Result<(), BootError> {
    let w =
        |e: vm_memory::GuestMemoryError| BootError::Write("the boot page tables", e.to_string());
    gm.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(w)?;
    gm.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
        .map_err(w)?;
    for i in 0..512u64 {
        gm.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
            .map_err(w)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tmp(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    fn gm(mem: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem as usize)]).unwrap()
    }

    #[test]
    fn missing_files_and_limits() {
        let spec = LinuxSpec::new("/nonexistent/vmlinux");
        let e = prepare(&spec, 64 << 20, 1, &[]).unwrap_err();
        assert!(matches!(e, BootError::Read { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/vmlinux"), "{e}");
        let k = tmp("k1", &image::fixtures::tiny_elf(4096));
        let mut spec = LinuxSpec::new(&k);
        assert!(matches!(
            prepare(&spec, 4 << 30, 1, &[]),
            Err(BootError::BadMemSize(_))
        ));
        assert!(prepare(&spec, 4 << 30, 1, &[])
            .unwrap_err()
            .to_string()
            .contains("3072 MiB"));
        assert!(matches!(
            prepare(&spec, 64 << 20, 33, &[]),
            Err(BootError::TooManyVcpus(33))
        ));
        spec.cmdline = "x".repeat(3000);
        let e = prepare(&spec, 64 << 20, 1, &[]).unwrap_err();
        assert!(matches!(e, BootError::CmdlineTooLong { .. }), "{e}");
        spec.cmdline = "a\u{7}b".into();
        assert!(prepare(&spec, 64 << 20, 1, &[]).is_err());
        spec.cmdline = "console=ttyS0".into();
        spec.initrd = Some("/nonexistent/initrd".into());
        assert!(matches!(
            prepare(&spec, 64 << 20, 1, &[]),
            Err(BootError::Read { .. })
        ));
        spec.initrd = Some(tmp("empty", b""));
        assert!(matches!(
            prepare(&spec, 64 << 20, 1, &[]),
            Err(BootError::EmptyInitrd(_))
        ));
        // 40 MiB initrd: kernel ends at 16 MiB + 4K, RAM at 48 MiB.
        spec.initrd = Some(tmp("big", &vec![0u8; 40 << 20]));
        let e = prepare(&spec, 48 << 20, 1, &[]).unwrap_err();
        assert!(matches!(e, BootError::InitrdTooBig { .. }), "{e}");
    }

    #[test]
    fn bzimage_cmdline_limit_comes_from_its_header() {
        let mut bz = image::fixtures::tiny_bzimage(4096);
        bz[0x238..0x23c].copy_from_slice(&100u32.to_le_bytes());
        let mut spec = LinuxSpec::new(tmp("bz", &bz));
        spec.cmdline = "y".repeat(101);
        let e = prepare(&spec, 64 << 20, 1, &[]).unwrap_err();
        assert!(
            matches!(e, BootError::CmdlineTooLong { max: 100, .. }),
            "{e}"
        );
    }

    #[test]
    fn loads_elf_initrd_and_cmdline() {
        let mut spec = LinuxSpec::new(tmp("k2", &image::fixtures::tiny_elf(4096)));
        spec.initrd = Some(tmp("initrd", &[7u8; 10000]));
        let dev = MmioDeviceInfo {
            base: 0x10_0000_1000,
            size: 0x1000,
            irq: 5,
        };
        let p = prepare(&spec, 64 << 20, 2, &[dev]).unwrap();
        assert!(
            p.cmdline()
                .ends_with("virtio_mmio.device=4K@0x1000001000:5"),
            "{}",
            p.cmdline()
        );
        let (addr, size) = p.initrd_range().unwrap();
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20 && addr >= (16 << 20) + 4096);
        let m = gm(64 << 20);
        // No PVH note: the 64-bit protocol at e_entry.
        let e = p.load(&m).unwrap();
        assert_eq!(e.protocol, Protocol::Linux64);
        let mut b = [0u8; 4];
        m.read_slice(&mut b, GuestAddress(layout::EBDA_START))
            .unwrap();
        assert_eq!(&b, b"_MP_");
        let ptr: u32 = m.read_obj(GuestAddress(ZERO_PAGE_START + 0x228)).unwrap();
        assert_eq!(u64::from(ptr), CMDLINE_START);
        let rd: u32 = m.read_obj(GuestAddress(ZERO_PAGE_START + 0x218)).unwrap();
        assert_eq!(u64::from(rd), addr);
        assert_eq!(m.read_obj::<u8>(GuestAddress(addr)).unwrap(), 7);
    }
}
