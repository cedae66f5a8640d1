//! Emulated devices of the microVM: the 8250 serial console and the report
//! device through which the default guest tells the VMM how it did.

pub mod report;
pub mod serial;
