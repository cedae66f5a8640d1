//! Legacy PC devices on the I/O port bus: the 8250 console ([`serial`]) and,
//! for a Linux guest, the i8042 ([`i8042`]) whose reset ends the VM, all
//! behind one dispatcher, [`LegacyIo`].
//!
//! **Invariants.**
//! - Every port that no device claims reads as 0xff and ignores writes
//!   (Linux probes 0x80, 0x70/0x71, the PIC, ...; the in-kernel irqchip and
//!   PIT take theirs before they reach us).
//! - A port access is split into byte accesses as a PC's bus splits one
//!   to byte-wide devices: byte `j` of each element (an `inw`/`outw` has
//!   one, a `rep ins`/`rep outs` several) at `port + j`, each its own
//!   register access, so a `rep insb` from the console takes as many
//!   received bytes and an `outw` to it sets the register after (rule
//!   `port_split`). [`split_in`] and [`split_out`] do the split; the
//!   default guest's loop, which has the console alone, uses them too.
//! - A guest reset request only sets [`LegacyIo::reset_requested`] (and
//!   wakes whoever waits on its eventfd); the vCPU that sees it ends the VM.
//!   No device call blocks on guest data.

pub mod i8042;
pub mod serial;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use guest_mm::mutation::{broken, Rule};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use i8042::{I8042Error, I8042, I8042_CMD, I8042_DATA};
use serial::{IrqLine, SerialDevice};

/// The i8042's reset line: a flag the vCPU loop checks, and an eventfd.
#[derive(Debug)]
pub struct ResetLine {
    flag: AtomicBool,
    evt: EventFd,
}

/// Shared reset line (an `Arc` so the i8042 and the VM both hold it).
#[derive(Debug, Clone)]
pub struct SharedReset(Arc<ResetLine>);

impl Trigger for SharedReset {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.flag.store(true, Ordering::SeqCst);
        self.0.evt.write(1)
    }
}

/// The port devices of a Linux guest.
#[derive(Debug)]
pub struct LegacyIo {
    /// The console.
    pub serial: Arc<SerialDevice>,
    i8042: Mutex<I8042<SharedReset>>,
    reset: SharedReset,
}

impl LegacyIo {
    /// The devices: `serial` (already wired to its IRQ) and an i8042 whose
    /// keyboard interrupt is `kbd_irq`.
    pub fn new(serial: Arc<SerialDevice>, kbd_irq: EventFd) -> std::io::Result<Self> {
        let reset = SharedReset(Arc::new(ResetLine {
            flag: AtomicBool::new(false),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        }));
        Ok(Self {
            serial,
            i8042: Mutex::new(I8042::new(reset.clone(), IrqLine::Evt(kbd_irq))),
            reset,
        })
    }

    /// Whether the guest asked for a reset (0xfe to port 0x64).
    pub fn reset_requested(&self) -> bool {
        self.reset.0.flag.load(Ordering::SeqCst)
    }

    /// The eventfd signalled on a reset request.
    pub fn reset_evt(&self) -> &EventFd {
        &self.reset.0.evt
    }

    /// Sends Ctrl-Alt-Del through the i8042.
    pub fn ctrl_alt_del(&self) -> Result<(), I8042Error> {
        self.i8042
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ctrl_alt_del()
    }

    /// A guest `in` from `port` of `size` bytes (1, 2 or 4) per element,
    /// `data.len() / size` elements (a `rep ins` delivers them all in one
    /// exit). As on a PC's bus, a wide access to these byte-wide devices
    /// is split into bytes at `port`, `port + 1`, ...: each byte is its own
    /// register read, so a `rep insb` from the console's data register
    /// takes that many received bytes. A `size` that does not divide the
    /// data is treated as 1.
    pub fn read(&self, port: u16, size: usize, data: &mut [u8]) {
        split_in(port, size, data, |p| self.read_byte(p));
    }

    /// A guest `out` to `port` of `size` bytes per element, split like
    /// [`Self::read`]: byte `j` of each element goes to `port + j`.
    pub fn write(&self, port: u16, size: usize, data: &[u8]) {
        split_out(port, size, data, |p, b| self.write_byte(p, b));
    }

    fn read_byte(&self, port: u16) -> u8 {
        if SerialDevice::handles(port) {
            self.serial.read(port)
        } else if port == I8042_DATA || port == I8042_CMD {
            self.i8042
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(port)
        } else {
            0xff
        }
    }

    fn write_byte(&self, port: u16, b: u8) {
        if SerialDevice::handles(port) {
            self.serial.write(port, b);
        } else if port == I8042_DATA || port == I8042_CMD {
            // A failed eventfd write still set the flag the vCPU checks.
            let _ = self
                .i8042
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(port, b);
        }
    }
}

/// Splits a guest `in` from `port` of `size`-byte elements into byte reads
/// as a PC's bus does for byte-wide devices: byte `j` of each element is
/// `read(port + j)`. A `size` other than 2 or 4, or one that does not
/// divide the data, counts as 1 (rule `port_split`).
pub fn split_in(port: u16, size: usize, data: &mut [u8], mut read: impl FnMut(u16) -> u8) {
    if broken(Rule::PortSplit) {
        let v = read(port);
        data.fill(v);
        return;
    }
    for chunk in data.chunks_mut(element(size, data.len())) {
        for (j, b) in (0u16..).zip(chunk) {
            *b = read(port.wrapping_add(j));
        }
    }
}

/// Splits a guest `out` to `port` like [`split_in`]: byte `j` of each
/// element is `write(port + j, byte)`.
pub fn split_out(port: u16, size: usize, data: &[u8], mut write: impl FnMut(u16, u8)) {
    if broken(Rule::PortSplit) {
        for &b in data {
            write(port, b);
        }
        return;
    }
    for chunk in data.chunks(element(size, data.len())) {
        for (j, &b) in (0u16..).zip(chunk) {
            write(port.wrapping_add(j), b);
        }
    }
}

/// The element size of a port access of `len` bytes said to be `size`
/// wide: `size` if it is 2 or 4 and divides `len`, else 1.
fn element(size: usize, len: usize) -> usize {
    if matches!(size, 2 | 4) && len.is_multiple_of(size) {
        size
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::Console;

    #[test]
    fn unknown_ports_read_ff_and_reset_sets_the_flag() {
        let s = Arc::new(SerialDevice::new(Console::Null));
        let io = LegacyIo::new(s, EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap();
        for port in [0x80u16, 0x70, 0x71, 0x21, 0xa1, 0x3fff] {
            let mut d = [0u8; 2];
            io.read(port, 2, &mut d);
            assert_eq!(d, [0xff, 0xff], "port {port:#x}");
            io.write(port, 1, &[1]);
        }
        assert!(!io.reset_requested());
        io.write(I8042_CMD, 1, &[0xfe]);
        assert!(io.reset_requested());
        assert_eq!(io.reset_evt().read().unwrap(), 1);
    }

    #[test]
    fn wide_and_string_accesses_split_into_bytes() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::new(SerialDevice::new(Console::Capture(out.clone())));
        let io = LegacyIo::new(s.clone(), EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap();
        // outw to the data register: the low byte is sent, the high one
        // goes to the interrupt enable register at the next port.
        io.write(0x3f8, 2, &[b'A', 0x05]);
        assert_eq!(*out.lock().unwrap(), b"A");
        let mut ier = [0u8; 1];
        io.read(0x3f9, 1, &mut ier);
        assert_eq!(ier, [0x05]);
        // rep insb from the receive buffer: one FIFO read per byte.
        assert_eq!(s.enqueue(b"hi!"), 3);
        let mut two = [0u8; 2];
        io.read(0x3f8, 1, &mut two);
        assert_eq!(&two, b"hi");
        // inw: the receive buffer, then the interrupt enable register.
        io.read(0x3f8, 2, &mut two);
        assert_eq!(two, [b'!', 0x05]);
        // inw at the i8042's status port: its status, then 0x65, unclaimed.
        io.read(I8042_CMD, 2, &mut two);
        assert_eq!(two[1], 0xff);
        // A size that does not divide the data counts as bytes.
        io.write(0x3f8, 4, b"xy");
        assert_eq!(*out.lock().unwrap(), b"Axy");
    }

    /// The default guest's loop drives the console alone, through the same
    /// split: a wide access that runs past the UART's last port reaches
    /// the UART for its first byte only (the rest reads 0xff, and writes
    /// to it are dropped, not sent to the data register).
    #[test]
    fn console_alone_splits_and_ends_at_its_last_port() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let s = SerialDevice::new(Console::Capture(out.clone()));
        // outw at the scratch register (0x3ff): 0x5a there, 0x11 to 0x400.
        split_out(0x3ff, 2, &[0x5a, 0x11], |p, b| s.write(p, b));
        let mut two = [0u8; 2];
        split_in(0x3ff, 2, &mut two, |p| s.read(p));
        assert_eq!(two, [0x5a, 0xff]);
        // outw to the data register sends its low byte and sets the
        // interrupt enable register with the high one.
        split_out(0x3f8, 2, &[b'A', 0x05], |p, b| s.write(p, b));
        assert_eq!(*out.lock().unwrap(), b"A");
        assert_eq!(s.read(0x3f9), 0x05);
        // Ports outside the UART: reads 0xff, writes change nothing.
        s.write(0x3f7, b'x');
        s.write(0x400, b'y');
        assert_eq!((s.read(0x3f7), s.read(0x400)), (0xff, 0xff));
        assert_eq!(*out.lock().unwrap(), b"A");
    }
}
