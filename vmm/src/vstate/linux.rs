//! The platform of a Linux guest: KVM's in-kernel interrupt controllers
//! (PIC, IOAPIC, LAPICs) and PIT, and the interrupt lines of our devices as
//! irqfds.
//!
//! | GSI | device |
//! |---|---|
//! | 1 | i8042 keyboard ([`KBD_GSI`]) |
//! | 4 | 8250 console on 0x3f8 ([`SERIAL_GSI`]) |
//! | 5 | virtio-mmio balloon ([`BALLOON_GSI`], announced on the command line) |
//!
//! **Invariants.**
//! - [`create_irqchip`] runs before the first vCPU is created (KVM requires
//!   it), so every vCPU gets an in-kernel LAPIC and `hlt` never leaves KVM.
//! - Every eventfd registered as an irqfd is owned by [`LinuxPlatform`] (or
//!   the device it was handed to) for the VM's life; KVM holds its own
//!   reference, so the order in which VM and eventfds go does not matter.

use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::vm::VmError;
use crate::devices::legacy::serial::{Console, SerialDevice};
use crate::devices::legacy::LegacyIo;
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::mmio::VirtioMmio;

/// The i8042's keyboard interrupt.
pub const KBD_GSI: u32 = 1;
/// COM1's interrupt.
pub const SERIAL_GSI: u32 = 4;
/// The virtio-mmio balloon's interrupt (not 1 or 4; below 16 so the PIC
/// routes it too).
pub const BALLOON_GSI: u32 = 5;

/// Creates the in-kernel irqchip and the PIT (port 0x61 a dummy speaker).
pub fn create_irqchip(vm: &VmFd) -> Result<(), VmError> {
    vm.create_irq_chip()
        .map_err(|e| VmError::Ioctl("KVM_CREATE_IRQCHIP", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmError::Ioctl("KVM_CREATE_PIT2", e))
}

fn irqfd(vm: &VmFd, gsi: u32) -> Result<EventFd, VmError> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.register_irqfd(&evt, gsi)
        .map_err(|e| VmError::Ioctl("KVM_IRQFD", e))?;
    Ok(evt)
}

/// A Linux guest's port devices and interrupt lines.
#[derive(Debug)]
pub struct LinuxPlatform {
    /// Console and i8042.
    pub io: Arc<LegacyIo>,
    /// The balloon's interrupt line (GSI [`BALLOON_GSI`]); the transport
    /// signals a clone of it.
    pub balloon_irq: Option<EventFd>,
    /// The command line the kernel got.
    pub cmdline: String,
}

impl LinuxPlatform {
    /// Wires the console (IRQ 4), the i8042 (IRQ 1) and, with `balloon`, the
    /// balloon's line (IRQ 5) to KVM as irqfds, and hands the balloon's
    /// transport its end of the line.
    pub fn new(
        vm: &VmFd,
        console: Console,
        balloon: Option<&VirtioMmio<Balloon>>,
        cmdline: String,
    ) -> Result<Self, VmError> {
        let serial = Arc::new(SerialDevice::with_irq(console, irqfd(vm, SERIAL_GSI)?));
        let io = LegacyIo::new(serial, irqfd(vm, KBD_GSI)?).map_err(VmError::EventFd)?;
        let balloon_irq = match balloon {
            Some(dev) => {
                let evt = irqfd(vm, BALLOON_GSI)?;
                let theirs = evt.try_clone().map_err(VmError::EventFd)?;
                dev.lock().set_interrupt(theirs);
                Some(evt)
            }
            None => None,
        };
        Ok(Self {
            io: Arc::new(io),
            balloon_irq,
            cmdline,
        })
    }
}
