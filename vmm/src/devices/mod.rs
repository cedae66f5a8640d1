//! Emulated devices of the microVM: the 8250 serial console, the report
//! device through which the default guest tells the VMM how it did, and
//! virtio devices on virtio-mmio (the balloon).

pub mod report;
pub mod serial;
pub mod virtio;
