//! The serial console: an 8250 UART (vm-superio) at I/O port 0x3f8 whose
//! transmitted bytes go to a [`Console`] sink (stdout, a capture buffer for
//! tests, or nowhere). The default guest only transmits and gets no
//! interrupt ([`SerialDevice::new`]); a Linux guest gets IRQ 4 through an
//! eventfd that KVM raises as an irqfd ([`SerialDevice::with_irq`]) and input
//! through [`SerialDevice::enqueue`] (the terminal reader,
//! [`spawn_stdin_reader`]).
//!
//! **Invariants.** A console write error never stops the guest; the UART
//! lock is held only for one register access or one enqueue; the stdin
//! reader is a detached thread holding only an `Arc` of the device, so it
//! never keeps the process (or guest memory) alive.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

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

/// An interrupt line: nowhere (no interrupt controller, the default guest)
/// or an eventfd registered with KVM as an irqfd.
#[derive(Debug, Default)]
pub enum IrqLine {
    /// Goes nowhere.
    #[default]
    None,
    /// Raises the irqfd's GSI.
    Evt(EventFd),
}

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        match self {
            Self::None => Ok(()),
            Self::Evt(e) => e.write(1),
        }
    }
}

/// The serial device, shared by all vCPU threads.
pub struct SerialDevice {
    uart: Mutex<Serial<IrqLine, vm_superio::serial::NoEvents, ConsoleWriter>>,
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
            uart: Mutex::new(Serial::new(IrqLine::None, ConsoleWriter(console))),
        }
    }

    /// A UART writing to `console` whose interrupt is `irq` (an eventfd
    /// registered as irqfd).
    pub fn with_irq(console: Console, irq: EventFd) -> Self {
        Self {
            uart: Mutex::new(Serial::new(IrqLine::Evt(irq), ConsoleWriter(console))),
        }
    }

    /// Queues `bytes` as received input; returns how many fit in the FIFO.
    pub fn enqueue(&self, bytes: &[u8]) -> usize {
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        let room = uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        uart.enqueue_raw_bytes(&bytes[..room]).unwrap_or(0)
    }

    /// Whether `port` belongs to this device.
    pub fn handles(port: u16) -> bool {
        (COM1_BASE..COM1_BASE + COM1_LEN).contains(&port)
    }

    /// A guest `out` to `port`; dropped if `port` is not this device's.
    pub fn write(&self, port: u16, value: u8) {
        let Some(off) = Self::offset(port) else {
            return;
        };
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        // A console write error must not stop the guest.
        let _ = uart.write(off, value);
    }

    /// A guest `in` from `port`; 0xff, as an unclaimed port reads, if
    /// `port` is not this device's.
    pub fn read(&self, port: u16) -> u8 {
        let Some(off) = Self::offset(port) else {
            return 0xff;
        };
        self.uart
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(off)
    }

    /// The register offset of `port`, if it is this device's.
    fn offset(port: u16) -> Option<u8> {
        if Self::handles(port) {
            u8::try_from(port - COM1_BASE).ok()
        } else {
            None
        }
    }
}

/// Whether stdin is a terminal.
pub fn stdin_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stdin().is_terminal()
}

/// Feeds what is typed on the terminal to `serial`, from a detached thread
/// (it dies with the process; it never blocks exit). Bytes that do not fit
/// in the UART's FIFO wait until the guest drained it.
pub fn spawn_stdin_reader(serial: Arc<SerialDevice>) -> std::io::Result<()> {
    use std::io::Read;
    std::thread::Builder::new()
        .name("serial-stdin".into())
        .spawn(move || {
            crate::seccomp::install(crate::seccomp::ThreadKind::ConsoleInput);
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 {
                    return;
                }
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let k = serial.enqueue(rest);
                    rest = &rest[k..];
                    if k == 0 {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                }
            }
        })
        .map(|_| ())
}
