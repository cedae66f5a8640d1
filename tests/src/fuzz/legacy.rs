//! `legacy_io`: the I/O port bus of a Linux guest
//! ([`vmm::devices::legacy::LegacyIo`]: the 8250 console of vm-superio
//! behind our port decoding, and our i8042), driven as a vCPU's `in` and
//! `out` exits drive it (any port, accesses of 1, 2 or 4 bytes, up to 8
//! bytes in all: a `rep ins`/`rep outs` delivers every element in one
//! exit), with the host's side in between:
//! terminal input queued into the UART, Ctrl-Alt-Del sent through the
//! i8042.
//!
//! **Properties**, checked after every operation against a model of what
//! the guest may see (the registers a driver reads back, not the devices'
//! internals):
//! - no operation panics or blocks; every byte of an access is its own
//!   register access, byte `j` of each element at port `port + j` (a PC
//!   splits a wide access to a byte-wide device so), so a `rep insb` from
//!   the console's data register takes that many received bytes; a size
//!   that is not 2 or 4 dividing the length counts as bytes;
//! - a port no device claims reads 0xff and a write to it changes nothing
//!   (every later read still matches the model);
//! - console: a byte written to the data register with the divisor latch
//!   closed reaches the console exactly once, in order, unless loopback is
//!   on (then it is received instead, while the 64-byte FIFO has room);
//!   host input is taken exactly while the FIFO has room and loopback is
//!   off, and the guest reads it back in order, then zeros; the line
//!   status's data-ready bit says whether the FIFO holds a byte; the
//!   divisor latch, interrupt enable (a 16550A's four bits), line control,
//!   modem control and scratch read back what was written, from the reset
//!   values on;
//! - i8042: the reset request is raised exactly for each 0xfe written to
//!   the command port (its eventfd counts them); the status byte holds only
//!   the defined bits (output full, command pending, keyboard enabled),
//!   output full exactly when the 16-byte output buffer holds a byte; the
//!   data port returns the control byte, the output port, keyboard
//!   acknowledgements and Ctrl-Alt-Del's scan codes in order, then zeros; a
//!   Ctrl-Alt-Del that does not fit says so (`BufferFull`); the keyboard
//!   interrupt is raised exactly when a byte waits for the driver and the
//!   control byte enables it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use vmm::devices::legacy::serial::SerialDevice;
use vmm::devices::legacy::LegacyIo;
use vmm::Console;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::Input;

// The PC's ports, as a guest's drivers know them (not the devices'
// constants: the model decodes ports on its own).
/// COM1's eight registers.
const COM1_BASE: u16 = 0x3f8;
const COM1_END: u16 = 0x400;
/// The i8042's data port.
const I8042_DATA: u16 = 0x60;
/// The i8042's status (read) and command (write) port.
const I8042_CMD: u16 = 0x64;

/// Operations per input at most (each is a few bytes).
const MAX_OPS: usize = 4096;
/// The UART's receive FIFO (vm-superio's 16550A model).
const FIFO: usize = 64;
/// The i8042's output buffer.
const KBD_BUF: usize = 16;
/// Status bits the i8042 defines: output full, command/data, enabled.
const KBD_STATUS_BITS: u8 = 0x01 | 0x08 | 0x10;
/// Ctrl-Alt-Del's scan codes (set 2), one key per slice.
const CTRL_ALT_DEL: [&[u8]; 3] = [&[0x14], &[0x11], &[0xe0, 0x71]];

/// What the guest may see of the 8250.
struct Uart {
    divisor: [u8; 2],
    ier: u8,
    lcr: u8,
    mcr: u8,
    scratch: u8,
    rx: VecDeque<u8>,
    out: Vec<u8>,
}

impl Uart {
    /// A UART after reset, as vm-superio makes it: divisor 12 (9600
    /// baud), interrupts off, 8N1, OUT2 on.
    fn new() -> Self {
        Uart {
            divisor: [0x0c, 0],
            ier: 0,
            lcr: 0x03,
            mcr: 0x08,
            scratch: 0,
            rx: VecDeque::new(),
            out: Vec::new(),
        }
    }

    fn dlab(&self) -> bool {
        self.lcr & 0x80 != 0
    }

    fn loopback(&self) -> bool {
        self.mcr & 0x10 != 0
    }

    fn write(&mut self, off: u16, v: u8) {
        match off {
            0 | 1 if self.dlab() => self.divisor[usize::from(off)] = v,
            // Received instead, while the FIFO has room.
            0 if self.loopback() && self.rx.len() < FIFO => self.rx.push_back(v),
            0 if self.loopback() => {}
            0 => self.out.push(v),
            // The interrupts a 16550A has.
            1 => self.ier = v & 0x0f,
            3 => self.lcr = v,
            4 => self.mcr = v,
            7 => self.scratch = v,
            _ => {}
        }
    }

    /// Checks `got`, read from register `off`.
    fn read(&mut self, off: u16, got: u8) {
        match off {
            0 | 1 if self.dlab() => {
                assert_eq!(
                    got,
                    self.divisor[usize::from(off)],
                    "console divisor latch {off}"
                );
            }
            0 => {
                let want = self.rx.pop_front().unwrap_or(0);
                assert_eq!(got, want, "console data register");
            }
            1 => assert_eq!(got, self.ier, "console interrupt enable"),
            3 => assert_eq!(got, self.lcr, "console line control"),
            4 => assert_eq!(got, self.mcr, "console modem control"),
            5 => assert_eq!(
                got & 1 != 0,
                !self.rx.is_empty(),
                "console data-ready bit (line status {got:#x}) with {} byte(s) received",
                self.rx.len()
            ),
            7 => assert_eq!(got, self.scratch, "console scratch register"),
            _ => {}
        }
    }

    /// Host input: how much the UART must take of `bytes`.
    fn enqueue(&mut self, bytes: &[u8]) -> usize {
        if self.loopback() {
            return 0;
        }
        let n = bytes.len().min(FIFO - self.rx.len());
        self.rx.extend(&bytes[..n]);
        n
    }
}

/// What the guest may see of the i8042.
struct Kbd {
    control: u8,
    outp: u8,
    cmd: u8,
    pending: bool,
    buf: VecDeque<u8>,
    resets: u64,
    irqs: u64,
}

impl Kbd {
    fn new() -> Self {
        Kbd {
            control: 0x05,
            outp: 0,
            cmd: 0,
            pending: false,
            buf: VecDeque::new(),
            resets: 0,
            irqs: 0,
        }
    }

    fn push(&mut self, b: u8) -> bool {
        if self.buf.len() == KBD_BUF {
            return false;
        }
        self.buf.push_back(b);
        true
    }

    fn interrupt(&mut self) {
        if self.control & 1 != 0 {
            self.irqs += 1;
        }
    }

    fn status(&self) -> u8 {
        0x10 | u8::from(!self.buf.is_empty()) | if self.pending { 0x08 } else { 0 }
    }

    fn write(&mut self, port: u16, v: u8) {
        if port == I8042_CMD {
            if v == 0xfe {
                self.resets += 1;
                return;
            }
            self.pending = true;
            self.cmd = v;
            let reply = match v {
                0x20 => Some(self.control),
                0xd0 => Some(self.outp),
                _ => None,
            };
            if let Some(r) = reply {
                self.buf.clear();
                self.push(r);
            }
        } else if self.pending {
            match self.cmd {
                0x60 => self.control = v,
                0xd1 => self.outp = v,
                _ => {}
            }
            self.pending = false;
        } else {
            // A keyboard command: acknowledged.
            self.buf.clear();
            self.push(0xfa);
            self.interrupt();
        }
    }

    fn read(&mut self, port: u16, got: u8) {
        if port == I8042_CMD {
            assert_eq!(got & !KBD_STATUS_BITS, 0, "i8042 status {got:#x}");
            assert_eq!(got, self.status(), "i8042 status");
        } else {
            let want = self.buf.pop_front().unwrap_or(0);
            assert_eq!(got, want, "i8042 data port");
            if !self.buf.is_empty() {
                self.interrupt();
            }
        }
    }

    /// Ctrl-Alt-Del; whether it fitted.
    fn ctrl_alt_del(&mut self) -> bool {
        for key in CTRL_ALT_DEL {
            for &b in key {
                if !self.push(b) {
                    return false;
                }
            }
            self.interrupt();
        }
        true
    }
}

/// A port: mostly the devices' own (every console register, the i8042's
/// two), sometimes their neighbours or any port.
fn port(inp: &mut Input<'_>) -> u16 {
    match inp.u8() {
        s @ 0..=7 => COM1_BASE + u16::from(s),
        8 | 9 => I8042_DATA,
        10 | 11 => I8042_CMD,
        12 => COM1_BASE - 1,
        13 => COM1_END,
        14 => I8042_DATA + 1,
        15 => I8042_CMD - 1,
        _ => inp.u16(),
    }
}

/// An access from its length byte: (size, bytes in all).
fn access(b: u8) -> (usize, usize) {
    let n = usize::from(b % 8) + 1;
    match (b >> 3) & 3 {
        0 => (1, n),
        1 => (2, 2 * (n / 2).max(1)),
        2 => (4, 4 * (n / 4).max(1)),
        _ => (3, n),
    }
}

/// The bytes per element of an access: `size` when it is 2 or 4 and
/// divides the length (a PC's bus), else single bytes.
fn element(size: usize, len: usize) -> usize {
    if (size == 2 || size == 4) && len.is_multiple_of(size) {
        size
    } else {
        1
    }
}

/// Reads all of `eventfd`'s count (0 if none).
fn drain(evt: &EventFd) -> u64 {
    evt.read().unwrap_or(0)
}

/// Runs the operations `data` encodes and checks every property.
///
/// Format: operations until the input ends (at most 4096), each an
/// opcode byte (mod 5): 0 a guest `out` (port, then a length byte, then
/// the bytes), 1 a guest `in` (port, length byte), 2 host
/// input (a length-prefixed slice), 3 Ctrl-Alt-Del, 4 the reset and
/// interrupt counts checked. A port is a selector byte: 0-7 the console's
/// registers, 8-11 the i8042's data and command ports, 12-15 their
/// neighbours, else a little-endian u16 that follows. A length byte's
/// bits 0-2 are a length `n - 1` (1 to 8), bits 3-4 the access size (1,
/// 2, 4, or 3: not a size KVM reports); a size of 2 or 4 takes `n / size`
/// elements (at least one).
pub fn run(data: &[u8]) {
    let out = Arc::new(Mutex::new(Vec::new()));
    let serial = Arc::new(SerialDevice::new(Console::Capture(out.clone())));
    let kbd_irq = EventFd::new(EFD_NONBLOCK).expect("an eventfd");
    let io = LegacyIo::new(
        serial.clone(),
        kbd_irq.try_clone().expect("a second eventfd handle"),
    )
    .expect("the port devices");
    let (mut uart, mut kbd) = (Uart::new(), Kbd::new());
    let (mut irqs, mut resets) = (0u64, 0u64);
    let mut shown = 0;
    let mut inp = Input::new(data);
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 5 {
            0 => {
                let p = port(&mut inp);
                let (size, n) = access(inp.u8());
                let mut bytes = [0u8; 8];
                for b in &mut bytes[..n] {
                    *b = inp.u8();
                }
                io.write(p, size, &bytes[..n]);
                for chunk in bytes[..n].chunks(element(size, n)) {
                    for (j, &b) in (0u16..).zip(chunk) {
                        let q = p.wrapping_add(j);
                        if (COM1_BASE..COM1_END).contains(&q) {
                            uart.write(q - COM1_BASE, b);
                        } else if q == I8042_DATA || q == I8042_CMD {
                            kbd.write(q, b);
                        }
                    }
                }
            }
            1 => {
                let p = port(&mut inp);
                let (size, n) = access(inp.u8());
                let mut got = [0x5au8; 8];
                io.read(p, size, &mut got[..n]);
                for chunk in got[..n].chunks(element(size, n)) {
                    for (j, &v) in (0u16..).zip(chunk) {
                        let q = p.wrapping_add(j);
                        if (COM1_BASE..COM1_END).contains(&q) {
                            uart.read(q - COM1_BASE, v);
                        } else if q == I8042_DATA || q == I8042_CMD {
                            kbd.read(q, v);
                        } else {
                            assert_eq!(v, 0xff, "port {q:#x}, which no device claims");
                        }
                    }
                }
            }
            2 => {
                let bytes = inp.bytes();
                let took = serial.enqueue(bytes);
                let want = uart.enqueue(bytes);
                assert_eq!(
                    took,
                    want,
                    "host input of {} byte(s) with {} in the FIFO (loopback {})",
                    bytes.len(),
                    uart.rx.len() - want,
                    uart.loopback()
                );
            }
            3 => {
                let fitted = io.ctrl_alt_del().is_ok();
                assert_eq!(
                    fitted,
                    kbd.ctrl_alt_del(),
                    "Ctrl-Alt-Del's result with {} byte(s) waiting",
                    kbd.buf.len()
                );
            }
            _ => {
                irqs += drain(&kbd_irq);
                resets += drain(io.reset_evt());
                assert_eq!(irqs, kbd.irqs, "keyboard interrupts raised");
                assert_eq!(resets, kbd.resets, "reset requests signalled");
            }
        }
        assert_eq!(
            io.reset_requested(),
            kbd.resets > 0,
            "the reset flag after {} reset command(s)",
            kbd.resets
        );
        // What reached the console since the last check.
        let console = out.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(
            console.get(shown..),
            uart.out.get(shown..),
            "console output after byte {shown}"
        );
        shown = uart.out.len();
    }
    irqs += drain(&kbd_irq);
    resets += drain(io.reset_evt());
    assert_eq!(irqs, kbd.irqs, "keyboard interrupts raised");
    assert_eq!(resets, kbd.resets, "reset requests signalled");
}
