//! KVM state wrappers: the VM ([`vm`]) and its vCPU threads ([`vcpu`]).

pub mod vcpu;
pub mod vm;
