//! A test-side virtio-balloon driver: it plays the guest by writing
//! virtqueue structures into guest RAM through the stage-2 fast walk
//! ([`vmm::GuestAccess`]) and by issuing virtio-mmio register accesses
//! directly against the device object, so the whole device path runs on a
//! real VM's memory without a vCPU.
//!
//! Layout inside the driver's area (1 MiB of guest RAM the tests leave
//! alone): queue `i`'s rings at `area + i * 16 KiB` (descriptor table,
//! available ring at +4 KiB, used ring at +8 KiB), buffers from
//! `area + 64 KiB`.

use std::sync::Arc;

use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_STATUS,
};
use vmm::devices::virtio::balloon::{Balloon, BalloonConfig, F_REPORTING, F_STATS_VQ};
use vmm::devices::virtio::mmio::{VirtioMmio, F_VERSION_1};
use vmm::devices::virtio::BusDevice;
use vmm::{Backing, GuestAccess, PageSize, Vm, Workload};

/// Descriptor flag: chained.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub const F_WRITE: u16 = 2;
/// Queue size the driver uses.
pub const QSIZE: u16 = 256;
/// Bytes of guest RAM the driver uses.
pub const AREA: u64 = 1 << 20;
/// Offset of the buffer space in the driver's area (the rings of the four
/// queues lie below it).
pub const BUFS: u64 = 0x1_0000;

/// Queue roles by feature set, in index order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Q {
    /// inflateq.
    Inflate,
    /// deflateq.
    Deflate,
    /// statsq.
    Stats,
    /// reporting_vq.
    Reporting,
}

#[derive(Debug, Default, Clone, Copy)]
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
}

/// The driver.
pub struct Driver {
    dev: Arc<VirtioMmio<Balloon>>,
    /// Guest memory, through the fast walk.
    pub mem: GuestAccess,
    area: u64,
    rings: Vec<Ring>,
    roles: Vec<Q>,
}

impl Driver {
    /// A driver for `vm`'s balloon using `[area, area + AREA)` of its RAM.
    pub fn new(vm: &Vm, area: u64) -> Self {
        Self {
            dev: Arc::clone(vm.balloon().expect("VM built with a balloon")),
            mem: vm.stage2().access(),
            area,
            rings: Vec::new(),
            roles: Vec::new(),
        }
    }

    /// The device object.
    pub fn dev(&self) -> &Arc<VirtioMmio<Balloon>> {
        &self.dev
    }

    /// A 32-bit register write.
    pub fn w32(&self, off: u32, v: u32) {
        self.dev.write(u64::from(off), &v.to_le_bytes());
    }

    /// A 32-bit register read.
    pub fn r32(&self, off: u32) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    /// Reads config field at `off` (32-bit).
    pub fn config(&self, off: u32) -> u32 {
        self.r32(VIRTIO_MMIO_CONFIG + off)
    }

    /// Resets, negotiates `features` (plus VERSION_1), sets every queue up
    /// and sets DRIVER_OK. Returns the final status.
    pub fn init(&mut self, features: u64) -> u32 {
        self.setup(features);
        self.w32(VIRTIO_MMIO_STATUS, 0xf);
        self.r32(VIRTIO_MMIO_STATUS)
    }

    /// Everything [`Driver::init`] does but setting DRIVER_OK.
    pub fn setup(&mut self, features: u64) {
        let f = features | F_VERSION_1;
        self.w32(VIRTIO_MMIO_STATUS, 0);
        self.w32(VIRTIO_MMIO_STATUS, 1);
        self.w32(VIRTIO_MMIO_STATUS, 3);
        self.w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.w32(VIRTIO_MMIO_DRIVER_FEATURES, f as u32);
        self.w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.w32(VIRTIO_MMIO_DRIVER_FEATURES, (f >> 32) as u32);
        self.w32(VIRTIO_MMIO_STATUS, 0xb);
        self.roles = vec![Q::Inflate, Q::Deflate];
        if f & F_STATS_VQ != 0 {
            self.roles.push(Q::Stats);
        }
        if f & F_REPORTING != 0 {
            self.roles.push(Q::Reporting);
        }
        self.rings.clear();
        for i in 0..self.roles.len() {
            let base = self.area + i as u64 * 0x4000;
            let r = Ring {
                desc: base,
                avail: base + 0x1000,
                used: base + 0x2000,
                avail_idx: 0,
            };
            self.mem.write(base, &[0u8; 0x4000]).expect("clear rings");
            self.w32(VIRTIO_MMIO_QUEUE_SEL, i as u32);
            self.w32(VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
            for (lo, hi, a) in [
                (
                    VIRTIO_MMIO_QUEUE_DESC_LOW,
                    VIRTIO_MMIO_QUEUE_DESC_HIGH,
                    r.desc,
                ),
                (
                    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                    r.avail,
                ),
                (
                    VIRTIO_MMIO_QUEUE_USED_LOW,
                    VIRTIO_MMIO_QUEUE_USED_HIGH,
                    r.used,
                ),
            ] {
                self.w32(lo, a as u32);
                self.w32(hi, (a >> 32) as u32);
            }
            self.w32(VIRTIO_MMIO_QUEUE_READY, 1);
            self.rings.push(r);
        }
    }

    /// Index of the queue with `role`.
    pub fn index(&self, role: Q) -> u32 {
        self.roles
            .iter()
            .position(|r| *r == role)
            .expect("queue negotiated") as u32
    }

    /// Address of buffer byte `off` in the driver's buffer space.
    pub fn buf(&self, off: u64) -> u64 {
        self.area + BUFS + off
    }

    /// Writes descriptor `i` of queue `role`.
    pub fn desc(&mut self, role: Q, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let r = self.rings[self.index(role) as usize];
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write(r.desc + 16 * u64::from(i), &b)
            .expect("write desc");
    }

    /// Makes `heads` available on `role` (no notify).
    pub fn publish(&mut self, role: Q, heads: &[u16]) {
        let i = self.index(role) as usize;
        let mut r = self.rings[i];
        for &h in heads {
            let slot = u64::from(r.avail_idx % QSIZE);
            self.mem
                .write(r.avail + 4 + 2 * slot, &h.to_le_bytes())
                .expect("avail entry");
            r.avail_idx = r.avail_idx.wrapping_add(1);
        }
        self.mem
            .write(r.avail + 2, &r.avail_idx.to_le_bytes())
            .expect("avail idx");
        self.rings[i] = r;
    }

    /// Sets the raw available index of `role` (corruption tests).
    pub fn set_avail_idx(&mut self, role: Q, idx: u16) {
        let r = self.rings[self.index(role) as usize];
        self.mem
            .write(r.avail + 2, &idx.to_le_bytes())
            .expect("avail idx");
    }

    /// Notifies `role`.
    pub fn notify(&self, role: Q) {
        self.w32(VIRTIO_MMIO_QUEUE_NOTIFY, self.index(role));
    }

    /// Notifies queue index `index`, which need not exist.
    pub fn notify_index(&self, index: u32) {
        self.w32(VIRTIO_MMIO_QUEUE_NOTIFY, index);
    }

    /// The driver's available index of `role` (what it last published).
    pub fn avail_idx(&self, role: Q) -> u16 {
        self.rings[self.index(role) as usize].avail_idx
    }

    /// Used element `i` (ring slot `i % QSIZE`) of `role`: (id, len).
    pub fn used_elem(&mut self, role: Q, i: u16) -> (u32, u32) {
        let r = self.rings[self.index(role) as usize];
        let mut b = [0u8; 8];
        self.mem
            .read(r.used + 4 + 8 * u64::from(i % QSIZE), &mut b)
            .expect("used element");
        (
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        )
    }

    /// The device's used index of `role`.
    pub fn used_idx(&mut self, role: Q) -> u16 {
        let r = self.rings[self.index(role) as usize];
        let mut b = [0u8; 2];
        self.mem.read(r.used + 2, &mut b).expect("used idx");
        u16::from_le_bytes(b)
    }

    /// Sends `pfns` on `role` (inflate or deflate) as chains of at most
    /// `per_chain` PFNs, one descriptor each, with one notify (one gather).
    /// Returns how many chains were sent.
    pub fn send_pfns(&mut self, role: Q, pfns: &[u32], per_chain: usize) -> u16 {
        let mut heads = Vec::new();
        let mut off = 0u64;
        for (i, chunk) in pfns.chunks(per_chain).enumerate() {
            let bytes: Vec<u8> = chunk.iter().flat_map(|p| p.to_le_bytes()).collect();
            let addr = self.buf(off);
            self.mem.write(addr, &bytes).expect("PFN array");
            let i = u16::try_from(i).expect("fits the queue");
            self.desc(role, i, addr, bytes.len() as u32, 0, 0);
            heads.push(i);
            off += bytes.len() as u64;
        }
        assert!(heads.len() <= usize::from(QSIZE), "too many chains");
        assert!(off <= AREA - BUFS, "PFN arrays overflow the driver area");
        self.publish(role, &heads);
        self.notify(role);
        heads.len() as u16
    }
}

/// A VM with the default balloon, one vCPU and the verify workload (not
/// started: the driver plays the guest), console discarded.
pub fn balloon_vm(mem: &str, backing: Backing, page: PageSize) -> Vm {
    let (mut c, _console) = crate::config(mem, 1, backing, page, Workload::Verify);
    c.balloon = Some(BalloonConfig::default());
    Vm::new(c).expect("VM creation")
}

/// PFNs of `[gpa, gpa + len)`.
pub fn pfns(gpa: u64, len: u64) -> Vec<u32> {
    (gpa >> 12..(gpa + len) >> 12)
        .map(|p| u32::try_from(p).expect("test RAM below 16 TiB"))
        .collect()
}

/// Resident 4 KiB pages of host range `[host, host + len)` (mincore).
pub fn resident_pages(host: usize, len: u64) -> u64 {
    let n = usize::try_from(len / 4096).expect("fits");
    let mut v = vec![0u8; n];
    // SAFETY: mincore only reads page-table state of the live guest RAM
    // mapping and writes one byte per page into `v`, which has n bytes.
    let r = unsafe { libc::mincore(host as *mut libc::c_void, n * 4096, v.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    v.iter().filter(|b| **b & 1 == 1).count() as u64
}

/// Bytes allocated to a region's files (their st_blocks * 512, summed).
pub fn file_bytes(files: &vmm::memory::RegionFiles) -> u64 {
    files
        .spans()
        .map(|f| {
            // SAFETY: fstat writes into a zeroed stat we own; the fd is one
            // of the VM's memfds, alive while the VM is.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let r = unsafe { libc::fstat(f.fd, &mut st) };
            assert_eq!(r, 0, "fstat: {}", std::io::Error::last_os_error());
            u64::try_from(st.st_blocks).unwrap_or(0) * 512
        })
        .sum()
}
