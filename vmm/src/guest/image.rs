//! The embedded default guest: position-independent x86-64 code assembled by
//! `global_asm!` between `vmm_guest_image_start` and `vmm_guest_image_end`.
//! The VMM copies these bytes to [`super::layout::IMAGE`] at run time.
//!
//! The image holds two parts:
//! - the ring-3 workload (`vmm_guest_entry`), entered directly in CPL3 with
//!   its arguments in registers (see [`super::EntryArgs`]); it reports with
//!   MMIO writes to the report device (MMIO exits work from any CPL; `out`
//!   at CPL3 raises #GP on `kvm_pvm` even with IOPL 3), prints through the
//!   console gate, and reads commands from the shared control page;
//! - the console gate (`int3`, through a DPL-3 gate at vector 3): one
//!   `rep outsb` of the string to COM1 at CPL0, one exit per string;
//! - 32 exception stubs (`vmm_guest_exc_stubs`, 16 bytes apart) that run at
//!   CPL0 (emulated on `kvm_pvm`, so kept to four instructions): they report
//!   the vector to the VMM and halt.
//!
//! Only RIP-relative references are used, so the image runs wherever it is
//! copied as long as it is copied whole.

use std::arch::global_asm;

global_asm!(
    r#"
    .pushsection .text.vmm_guest_image, "ax"
    .balign 4096
    .global vmm_guest_image_start
vmm_guest_image_start:
    .global vmm_guest_entry
vmm_guest_entry:
    mov r12, rdi
    mov r13, rsi
    mov r14, rdx
    mov r15, rcx
    mov rbx, r8
    mov rbp, r9
    mov eax, 1
    call .Lreport_op

    cmp rbp, 2
    jne .Lwork
    // Fault workload: read an unmapped GPA (128 GiB) to exercise the IDT.
    movabs rax, 0x2000000000
    mov rax, qword ptr [rax]
    jmp .Ldone

.Lwork:
    lea rsi, [rip + .Lmsg_start]
    mov rdi, r13
    sub rdi, r12
    shr rdi, 20
    lea r10, [rip + .Lmsg_mib]
    call .Lsay

    mov rdi, r12
.Lwrite:
    cmp rdi, r13
    jae .Lwritten
    mov rax, rdi
    xor rax, r15
    mov qword ptr [rdi], rax
    add rdi, 8
    jmp .Lwrite
.Lwritten:
    xor r8, r8
    mov r9, -1
    mov rdi, r12
.Lverify:
    cmp rdi, r13
    jae .Lverified
    mov rax, rdi
    xor rax, r15
    cmp qword ptr [rdi], rax
    je .Lverify_next
    inc r8
    cmp r9, -1
    jne .Lverify_next
    mov r9, rdi
.Lverify_next:
    add rdi, 8
    jmp .Lverify
.Lverified:
    push r8
    push r9
    test r8, r8
    jnz .Lfailed
    lea rsi, [rip + .Lmsg_ok]
    mov rdi, r13
    sub rdi, r12
    shr rdi, 12
    lea r10, [rip + .Lmsg_pages]
    call .Lsay
    jmp .Lreport
.Lfailed:
    lea rsi, [rip + .Lmsg_fail]
    mov rdi, r8
    lea r10, [rip + .Lmsg_bad]
    call .Lsay
.Lreport:
    pop r9
    pop r8
    mov rdi, r12
    mov rsi, r13
    mov eax, 2
    call .Lreport_op

    cmp rbp, 1
    jne .Ldone
    test r14, r14
    jnz .Ldone
    xor r13, r13
.Lprobe_wait:
    pause
    mov rax, qword ptr [rbx + 8]
    cmp rax, r13
    je .Lprobe_wait
    mov r13, rax
    mov rcx, qword ptr [rbx + 16]
    cmp rcx, 2
    je .Ldone
    mov rdi, qword ptr [rbx + 24]
    and rdi, -4096
    mov rsi, rdi
    xor r8, r8
    mov ecx, 512
    lfence
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r10, rax
.Lprobe_or:
    or r8, qword ptr [rsi]
    add rsi, 8
    dec ecx
    jnz .Lprobe_or
    rdtscp
    shl rdx, 32
    or rax, rdx
    sub rax, r10
    mov r10, rax
    mov r9, qword ptr [rdi]
    mov rsi, r13
    mov eax, 3
    call .Lreport_op
    jmp .Lprobe_wait

.Ldone:
    mov eax, 4
    call .Lreport_op
    jmp .Ldone

    // report_op(eax = opcode): one MMIO write to the report device.
.Lreport_op:
    movabs r11, 0x1000000000
    mov dword ptr [r11], eax
    ret

    // say(rsi = text, r10 = 0 or (rdi = number, r10 = text)): one console
    // line "guest: vcpu <r14><text>[<number><text>]" under the console lock.
.Lsay:
    push rsi
    push rdi
    push r10
.Llock:
    mov eax, 1
    xchg eax, dword ptr [rbx]
    test eax, eax
    jz .Llocked
    pause
    jmp .Llock
.Llocked:
    lea rsi, [rip + .Lmsg_prefix]
    call .Lputs
    mov rax, r14
    call .Lputdec
    mov rsi, qword ptr [rsp + 16]
    call .Lputs
    mov r10, qword ptr [rsp]
    test r10, r10
    jz .Lsay_unlock
    mov rax, qword ptr [rsp + 8]
    call .Lputdec
    mov rsi, qword ptr [rsp]
    call .Lputs
.Lsay_unlock:
    mov dword ptr [rbx], 0
    add rsp, 24
    ret

.Lputs:
    xor ecx, ecx
.Lputs_len:
    cmp byte ptr [rsi + rcx], 0
    je .Lputs_out
    inc ecx
    jmp .Lputs_len
.Lputs_out:
    test ecx, ecx
    jz .Lputs_done
    mov r10, rcx
    int3
.Lputs_done:
    ret

.Lputdec:
    sub rsp, 32
    lea rsi, [rsp + 31]
    mov byte ptr [rsi], 0
    mov ecx, 10
.Lputdec_loop:
    xor edx, edx
    div rcx
    add dl, 0x30
    dec rsi
    mov byte ptr [rsi], dl
    test rax, rax
    jnz .Lputdec_loop
    call .Lputs
    add rsp, 32
    ret

.Lmsg_prefix:
    .asciz "guest: vcpu "
.Lmsg_start:
    .asciz ": start, pattern over "
.Lmsg_mib:
    .asciz " MiB\n"
.Lmsg_ok:
    .asciz ": pattern ok, "
.Lmsg_pages:
    .asciz " pages verified\n"
.Lmsg_fail:
    .asciz ": pattern FAILED, "
.Lmsg_bad:
    .asciz " bad words\n"

    .balign 16
    .global vmm_guest_exc_stubs
vmm_guest_exc_stubs:
    .irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    push \vec
    jmp .Lexc_common
    .endr
    .balign 16
.Lexc_common:
    pop rax
    mov edx, 0x511
    out dx, eax
.Lexc_halt:
    hlt
    jmp .Lexc_halt

    // Console gate (vector 3, DPL 3, entered with `int3`): write r10 (> 0)
    // bytes at rsi to COM1 with one `rep outsb` (one exit per string) and
    // return. On kvm_pvm `out`/`int 0x80` at CPL3 and `out` after `syscall`
    // fault, while exception delivery and this path work.
    .balign 16
    .global vmm_guest_console_gate
vmm_guest_console_gate:
    mov edx, 0x3f8
    mov rcx, r10
    rep outsb
    iretq

    .global vmm_guest_image_end
vmm_guest_image_end:
    .popsection
"#
);

extern "C" {
    static vmm_guest_image_start: u8;
    static vmm_guest_image_end: u8;
    static vmm_guest_entry: u8;
    static vmm_guest_exc_stubs: u8;
    static vmm_guest_console_gate: u8;
}

/// Distance between two exception stubs.
pub const EXC_STUB_STRIDE: u64 = 16;

/// The image bytes and the offsets of its entry points.
#[derive(Debug, Clone, Copy)]
pub struct Image {
    /// The code.
    pub bytes: &'static [u8],
    /// Offset of the ring-3 entry point.
    pub entry: u64,
    /// Offset of the first exception stub.
    pub exc_stubs: u64,
    /// Offset of the console gate (the handler of vector 3, `int3`).
    pub console_gate: u64,
}

/// The embedded guest image.
pub fn image() -> Image {
    let start = &raw const vmm_guest_image_start;
    let end = &raw const vmm_guest_image_end;
    let entry = &raw const vmm_guest_entry;
    let exc = &raw const vmm_guest_exc_stubs;
    let gate = &raw const vmm_guest_console_gate;
    let len = end as usize - start as usize;
    // SAFETY: both symbols are defined in the one global_asm block above, in
    // one section, start before end; the bytes between them are the
    // assembled code, readable (text) and immutable for the program's life.
    let bytes = unsafe { std::slice::from_raw_parts(start, len) };
    Image {
        bytes,
        entry: (entry as usize - start as usize) as u64,
        exc_stubs: (exc as usize - start as usize) as u64,
        console_gate: (gate as usize - start as usize) as u64,
    }
}
