//! A minimal i8042 keyboard controller at ports 0x60 (data) and 0x64
//! (status/command), as Firecracker's: enough for Linux's `i8042` and
//! `atkbd` drivers to bind (with `i8042.noaux i8042.nomux i8042.nopnp
//! i8042.dumbkbd`), the CPU reset command (0xfe to 0x64, how Linux reboots
//! with `reboot=k`) and a Ctrl-Alt-Del key sequence (IRQ 1).
//!
//! vm-superio's `I8042Device` only implements the reset (reads return 0, no
//! output buffer, no interrupt), which cannot deliver Ctrl-Alt-Del; this
//! device keeps its reset behaviour and adds the rest.
//!
//! **Invariants.** Nothing the guest writes can panic or grow memory: the
//! output buffer is a fixed ring of 16 bytes (a full buffer drops the key
//! and says so: rule `kbd_buffer_bound`); the reset and interrupt lines
//! are triggers whose errors are returned, never unwrapped.

use guest_mm::mutation::{broken, Rule};
use vm_superio::Trigger;

use super::serial::IrqLine;

/// First port (data).
pub const I8042_DATA: u16 = 0x60;
/// Status (read) / command (write) port.
pub const I8042_CMD: u16 = 0x64;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
/// Pulse the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;
const SB_OUT_DATA_AVAIL: u8 = 0x01;
const SB_I8042_CMD_DATA: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;
const CB_KBD_INT: u8 = 0x01;
const CB_POST_OK: u8 = 0x04;
/// Scan codes (set 2) of the Ctrl-Alt-Del sequence.
const KEY_CTRL: u16 = 0x0014;
const KEY_ALT: u16 = 0x0011;
const KEY_DEL: u16 = 0xe071;
const BUF_SIZE: usize = 16;

/// Errors of the i8042.
#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    /// The output buffer is full (the guest does not read it).
    #[error("the i8042 output buffer is full: the guest's keyboard driver is not reading it")]
    BufferFull,
    /// Raising the keyboard interrupt failed.
    #[error("raising the i8042 keyboard interrupt failed: {0}")]
    Irq(std::io::Error),
}

/// The controller. `R` is the reset line.
#[derive(Debug)]
pub struct I8042<R: Trigger> {
    reset: R,
    kbd_irq: IrqLine,
    status: u8,
    control: u8,
    outp: u8,
    cmd: u8,
    buf: [u8; BUF_SIZE],
    head: usize,
    len: usize,
}

impl<R: Trigger> I8042<R> {
    /// A controller that triggers `reset` on the reset command and `kbd_irq`
    /// for keyboard data.
    pub fn new(reset: R, kbd_irq: IrqLine) -> Self {
        Self {
            reset,
            kbd_irq,
            status: SB_KBD_ENABLED,
            control: CB_POST_OK | CB_KBD_INT,
            outp: 0,
            cmd: 0,
            buf: [0; BUF_SIZE],
            head: 0,
            len: 0,
        }
    }

    fn push(&mut self, b: u8) -> Result<(), I8042Error> {
        if self.len == BUF_SIZE {
            if broken(Rule::KbdBufferBound) {
                // Broken on purpose: the oldest byte is overwritten and
                // the push reports success.
                self.buf[self.head] = b;
                self.head = (self.head + 1) % BUF_SIZE;
                return Ok(());
            }
            return Err(I8042Error::BufferFull);
        }
        self.buf[(self.head + self.len) % BUF_SIZE] = b;
        self.len += 1;
        self.status |= SB_OUT_DATA_AVAIL;
        Ok(())
    }

    fn pop(&mut self) -> Option<u8> {
        if self.len == 0 {
            return None;
        }
        let b = self.buf[self.head];
        self.head = (self.head + 1) % BUF_SIZE;
        self.len -= 1;
        if self.len == 0 {
            self.status &= !SB_OUT_DATA_AVAIL;
        }
        Some(b)
    }

    fn flush(&mut self) {
        self.head = 0;
        self.len = 0;
        self.status &= !SB_OUT_DATA_AVAIL;
    }

    fn interrupt(&self) -> Result<(), I8042Error> {
        if self.control & CB_KBD_INT == 0 {
            return Ok(());
        }
        self.kbd_irq.trigger().map_err(I8042Error::Irq)
    }

    /// Queues one key press (make code) and raises IRQ 1.
    pub fn key(&mut self, key: u16) -> Result<(), I8042Error> {
        if key & 0xff00 != 0 {
            self.push((key >> 8) as u8)?;
        }
        self.push((key & 0xff) as u8)?;
        self.interrupt()
    }

    /// Sends Ctrl-Alt-Del.
    pub fn ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        self.key(KEY_CTRL)?;
        self.key(KEY_ALT)?;
        self.key(KEY_DEL)
    }

    /// A guest `in` from `port` (0x60 or 0x64).
    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            I8042_CMD => self.status,
            I8042_DATA => {
                let b = self.pop().unwrap_or(0);
                if self.status & SB_OUT_DATA_AVAIL != 0 {
                    // More to read: tell the driver again.
                    let _ = self.interrupt();
                }
                b
            }
            _ => 0xff,
        }
    }

    /// A guest `out` to `port`; returns the reset line's error if the
    /// reset could not be signalled.
    pub fn write(&mut self, port: u16, value: u8) -> Result<(), R::E> {
        match port {
            I8042_CMD if value == CMD_RESET_CPU => return self.reset.trigger(),
            I8042_CMD => {
                self.status |= SB_I8042_CMD_DATA;
                self.cmd = value;
                match value {
                    CMD_READ_CTR => {
                        self.flush();
                        let _ = self.push(self.control);
                    }
                    CMD_READ_OUTP => {
                        self.flush();
                        let _ = self.push(self.outp);
                    }
                    _ => {}
                }
            }
            I8042_DATA if self.status & SB_I8042_CMD_DATA != 0 => {
                match self.cmd {
                    CMD_WRITE_CTR => self.control = value,
                    CMD_WRITE_OUTP => self.outp = value,
                    _ => {}
                }
                self.status &= !SB_I8042_CMD_DATA;
            }
            I8042_DATA => {
                // A keyboard command: acknowledge it.
                self.flush();
                let _ = self.push(0xfa);
                let _ = self.interrupt();
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    #[derive(Default)]
    struct Count(AtomicU32);
    impl Trigger for &Count {
        type E = std::convert::Infallible;
        fn trigger(&self) -> Result<(), Self::E> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn reset_command_triggers_reset() {
        let c = Count::default();
        let mut k = I8042::new(&c, IrqLine::None);
        k.write(I8042_CMD, 0x20).unwrap();
        assert_eq!(c.0.load(Ordering::SeqCst), 0);
        k.write(I8042_CMD, CMD_RESET_CPU).unwrap();
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn control_byte_and_keys() {
        let c = Count::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut k = I8042::new(&c, IrqLine::Evt(irq.try_clone().unwrap()));
        k.write(I8042_CMD, CMD_READ_CTR).unwrap();
        assert!(k.read(I8042_CMD) & SB_OUT_DATA_AVAIL != 0);
        assert_eq!(k.read(I8042_DATA), CB_POST_OK | CB_KBD_INT);
        k.write(I8042_CMD, CMD_WRITE_CTR).unwrap();
        k.write(I8042_DATA, CB_KBD_INT).unwrap();
        k.write(I8042_CMD, CMD_READ_CTR).unwrap();
        assert_eq!(k.read(I8042_DATA), CB_KBD_INT);
        k.ctrl_alt_del().unwrap();
        assert!(irq.read().unwrap() >= 3);
        let seq: Vec<u8> = (0..4).map(|_| k.read(I8042_DATA)).collect();
        assert_eq!(seq, [0x14, 0x11, 0xe0, 0x71]);
        assert_eq!(k.read(I8042_CMD) & SB_OUT_DATA_AVAIL, 0);
        assert_eq!(k.read(I8042_DATA), 0);
        for _ in 0..BUF_SIZE {
            let _ = k.key(0x1c);
        }
        assert!(matches!(k.key(0x1c), Err(I8042Error::BufferFull)));
    }
}
