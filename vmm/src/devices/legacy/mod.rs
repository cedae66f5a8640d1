//! Legacy PC devices on the I/O port bus: the 8250 console ([`serial`]) and,
//! for a Linux guest, the i8042 ([`i8042`]) whose reset ends the VM, all
//! behind one dispatcher, [`LegacyIo`].
//!
//! **Invariants.**
//! - Every port that no device claims reads as 0xff and ignores writes
//!   (Linux probes 0x80, 0x70/0x71, the PIC, ...; the in-kernel irqchip and
//!   PIT take theirs before they reach us).
//! - A guest reset request only sets [`LegacyIo::reset_requested`] (and
//!   wakes whoever waits on its eventfd); the vCPU that sees it ends the VM.
//!   No device call blocks on guest data.

pub mod i8042;
pub mod serial;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

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

    /// A guest `in` of `data.len()` bytes from `port`.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        let v = if SerialDevice::handles(port) {
            self.serial.read(port)
        } else if port == I8042_DATA || port == I8042_CMD {
            self.i8042
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(port)
        } else {
            0xff
        };
        data.fill(v);
    }

    /// A guest `out` of `data` to `port` (string I/O: every byte).
    pub fn write(&self, port: u16, data: &[u8]) {
        if SerialDevice::handles(port) {
            for &b in data {
                self.serial.write(port, b);
            }
        } else if port == I8042_DATA || port == I8042_CMD {
            let mut k = self.i8042.lock().unwrap_or_else(|e| e.into_inner());
            for &b in data {
                // A failed eventfd write still set the flag the vCPU checks.
                let _ = k.write(port, b);
            }
        }
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
            io.read(port, &mut d);
            assert_eq!(d, [0xff, 0xff], "port {port:#x}");
            io.write(port, &[1]);
        }
        assert!(!io.reset_requested());
        io.write(I8042_CMD, &[0xfe]);
        assert!(io.reset_requested());
        assert_eq!(io.reset_evt().read().unwrap(), 1);
    }
}
