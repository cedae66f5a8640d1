//! KVM state wrappers: the VM ([`vm`]), its vCPU threads ([`vcpu`]) and its
//! guest memory ([`memory`], one owner for mappings, files, the stage-2
//! table, demand faults and every release).

pub mod linux;
pub mod memory;
pub mod vcpu;
pub mod vm;
