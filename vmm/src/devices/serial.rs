//! The serial console: an 8250 UART (vm-superio) at I/O port 0x3f8 whose
//! transmitted bytes go to a [`Console`] sink (stdout, a capture buffer for
//! tests, or nowhere). Interrupts are not wired: the default guest only
//! transmits, and the UART never blocks it.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};

/// First I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of ports of an 8250.
pub const COM1_LEN: u16 = 8;

/// Where the guest console goes.
#[derive(Debug, Clone, Default)]
pub enum Console {
    /// The VMM's stdout.
    #[default]
    Stdout,
    /// A shared buffer (tests read it).
    Capture(Arc<Mutex<Vec<u8>>>),
    /// Dropped.
    Null,
}

/// The `Write` end of a [`Console`].
#[derive(Debug)]
pub struct ConsoleWriter(Console);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.0 {
            Console::Stdout => std::io::stdout().lock().write(buf),
            Console::Capture(b) => {
                b.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(buf);
                Ok(buf.len())
            }
            Console::Null => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &self.0 {
            Console::Stdout => std::io::stdout().lock().flush(),
            _ => Ok(()),
        }
    }
}

/// An interrupt line that goes nowhere (no interrupt controller is set up).
#[derive(Debug, Default)]
pub struct NoIrq;

impl Trigger for NoIrq {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// The serial device, shared by all vCPU threads.
pub struct SerialDevice {
    uart: Mutex<Serial<NoIrq, vm_superio::serial::NoEvents, ConsoleWriter>>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART writing to `console`.
    pub fn new(console: Console) -> Self {
        Self {
            uart: Mutex::new(Serial::new(NoIrq, ConsoleWriter(console))),
        }
    }

    /// Whether `port` belongs to this device.
    pub fn handles(port: u16) -> bool {
        (COM1_BASE..COM1_BASE + COM1_LEN).contains(&port)
    }

    /// A guest `out` to `port`.
    pub fn write(&self, port: u16, value: u8) {
        let off = u8::try_from(port.wrapping_sub(COM1_BASE)).unwrap_or(0);
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        // A console write error must not stop the guest.
        let _ = uart.write(off, value);
    }

    /// A guest `in` from `port`.
    pub fn read(&self, port: u16) -> u8 {
        let off = u8::try_from(port.wrapping_sub(COM1_BASE)).unwrap_or(0);
        self.uart
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(off)
    }
}
