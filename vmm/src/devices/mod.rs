//! Emulated devices of the microVM: the legacy port devices (the 8250
//! serial console, and for a Linux guest the i8042), the report device
//! through which the default guest tells the VMM how it did, and virtio
//! devices on virtio-mmio (the balloon).

pub mod legacy;
pub mod report;
pub mod virtio;

pub use legacy::serial;
