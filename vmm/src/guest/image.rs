//! The embedded default guest: position-independent x86-64 code assembled by
//! `global_asm!` between `vmm_guest_image_start` and `vmm_guest_image_end`.
//! The VMM copies these bytes to [`super::layout::IMAGE`] at run time.
//!
//! The image holds two parts:
//! - the ring-3 workload (`vmm_guest_entry`), entered directly in CPL3 with
//!   its arguments in registers (see [`super::EntryArgs`]); it reports with
//!   MMIO writes to the report device (MMIO exits work from any CPL; `out`
//!   at CPL3 raises #GP on `kvm_pvm` even with IOPL 3), prints through the
//!   console gate, and reads commands from the shared control page; it
//!   includes vCPU 0's virtio-balloon driver and the rewrite-and-verify
//!   loops of [`super::Workload::BalloonStress`]; with nothing to do it
//!   polls for [`super::IDLE_SPIN_CYCLES`], then waits in the VMM with
//!   [`crate::devices::report::OP_IDLE`] and looks again (no host CPU while
//!   idle);
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

    cmp rbp, 3
    je .Lballoon
    cmp rbp, 4
    je .Lstress
    cmp rbp, 1
    jne .Ldone
    test r14, r14
    jnz .Ldone
    xor r13, r13
.Lprobe_wait:
    // Poll SEQ for IDLE_SPIN_CYCLES TSC cycles (a busy exchange stays
    // fast), then wait in the VMM (OP_IDLE) until the host may have posted
    // a command, and look again.
    rdtsc
    shl rdx, 32
    or rax, rdx
    lea r10, [rax + {idle_spin}]
.Lprobe_spin:
    pause
    mov rax, qword ptr [rbx + 8]
    cmp rax, r13
    jne .Lprobe_take
    rdtsc
    shl rdx, 32
    or rax, rdx
    cmp rax, r10
    jb .Lprobe_spin
.Lprobe_idle:
    mov eax, {op_idle}
    call .Lreport_op
    mov rax, qword ptr [rbx + 8]
    cmp rax, r13
    je .Lprobe_idle
.Lprobe_take:
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

    // ---- BalloonStress: vCPU 0 drives the balloon and rewrites its share
    // below the balloon between polls (cursor set = this mode); the others
    // rewrite and verify their share, one pass at a time, until CMD_EXIT.
.Lstress:
    test r14, r14
    jnz .Ls_loop
    mov qword ptr [rbx + {s_cursor}], r12
    jmp .Lballoon
.Ls_loop:
    cmp qword ptr [rbx + 16], 2
    je .Ldone
    mov rdi, r12
    mov rsi, r13
    call .Lwv
    inc qword ptr [r10 + {s_passes}]
    jmp .Ls_loop

    // wv(rdi = start, rsi = end): write the pattern over [rdi, rsi), verify
    // it; bad words go to this vCPU's stress block (r10 on return) and are
    // reported with OP_RESULT (rdi/rsi range, r8 bad words, r9 first bad).
    // Keeps rdi, rsi, r9; clobbers rax, rcx, rdx, r8, r10, r11.
.Lwv:
    mov rcx, rdi
.Lwv_w:
    cmp rcx, rsi
    jae .Lwv_wd
    mov rax, rcx
    xor rax, r15
    mov qword ptr [rcx], rax
    add rcx, 8
    jmp .Lwv_w
.Lwv_wd:
    xor r8d, r8d
    mov rdx, -1
    mov rcx, rdi
.Lwv_v:
    cmp rcx, rsi
    jae .Lwv_vd
    mov rax, rcx
    xor rax, r15
    cmp qword ptr [rcx], rax
    je .Lwv_next
    inc r8
    cmp rdx, -1
    jne .Lwv_next
    mov rdx, rcx
.Lwv_next:
    add rcx, 8
    jmp .Lwv_v
.Lwv_vd:
    imul r10, r14, {s_block}
    lea r10, [rbx + r10 + {s_blocks}]
    test r8, r8
    jz .Lwv_ret
    add qword ptr [r10 + {s_bad}], r8
    cmp qword ptr [r10 + {s_first_bad}], 0
    jne .Lwv_report
    mov qword ptr [r10 + {s_first_bad}], rdx
.Lwv_report:
    push r9
    mov r9, rdx
    mov eax, 2
    call .Lreport_op
    pop r9
.Lwv_ret:
    ret

    // ---- virtio-balloon driver (Balloon workload, vCPU 0 only) ----
    // r9 = the device's virtio-mmio window, rbp = pages in the balloon
    // (the last `pages` 4 KiB pages of [r12, r13)), rbx = control page.
    // Register offsets are virtio 1.2 §4.2.2 (virtio-mmio version 2).
.Lballoon:
    test r14, r14
    jnz .Ldone
    movabs r9, {mmio}
    mov qword ptr [rbx + {st_state}], 1
    // Zero the queue pages and the PFN array (all of the driver's pages
    // are then resident before its first request).
    mov rdi, {queues}
    xor eax, eax
.Lb_zero:
    mov qword ptr [rdi], rax
    add rdi, 8
    cmp rdi, {queues_end}
    jb .Lb_zero
    mov rdi, {pfns}
.Lb_zero_pfns:
    mov qword ptr [rdi], rax
    add rdi, 8
    cmp rdi, {area_end}
    jb .Lb_zero_pfns
    // MagicValue, Version, DeviceID.
    mov eax, dword ptr [r9 + 0x000]
    mov esi, eax
    mov edi, 1
    cmp eax, 0x74726976
    jne .Lb_fail
    mov eax, dword ptr [r9 + 0x004]
    mov esi, eax
    mov edi, 2
    cmp eax, 2
    jne .Lb_fail
    mov eax, dword ptr [r9 + 0x008]
    mov esi, eax
    mov edi, 3
    cmp eax, 5
    jne .Lb_fail
    // Status: reset, ACKNOWLEDGE, DRIVER.
    mov dword ptr [r9 + 0x070], 0
    mov dword ptr [r9 + 0x070], 1
    mov dword ptr [r9 + 0x070], 3
    // DeviceFeaturesSel 1: VIRTIO_F_VERSION_1 (bit 32) must be offered.
    mov dword ptr [r9 + 0x014], 1
    mov eax, dword ptr [r9 + 0x010]
    mov esi, eax
    mov edi, 4
    test eax, 1
    jz .Lb_fail_status
    // Features[31:0]: DEFLATE_ON_OOM (bit 2) and REPORTING (bit 5) if
    // offered; [63:32]: VERSION_1. r11 = number of queues (2, or 3 with
    // reporting, whose queue is then number 2: no stats queue).
    mov dword ptr [r9 + 0x014], 0
    mov r8d, dword ptr [r9 + 0x010]
    and r8d, 0x24
    mov dword ptr [r9 + 0x024], 0
    mov dword ptr [r9 + 0x020], r8d
    mov dword ptr [r9 + 0x024], 1
    mov dword ptr [r9 + 0x020], 1
    mov r11d, 2
    xor eax, eax
    test r8d, 0x20
    jz .Lb_no_report
    mov r11d, 3
    mov eax, 3
.Lb_no_report:
    mov qword ptr [rbx + {st_report_q}], rax
    // FEATURES_OK, read back.
    mov dword ptr [r9 + 0x070], 11
    mov eax, dword ptr [r9 + 0x070]
    mov esi, eax
    mov edi, 5
    test eax, 8
    jz .Lb_fail_status
    // Queues, one page each.
    xor r8d, r8d
    mov r10, {queues}
.Lb_queue:
    mov dword ptr [r9 + 0x030], r8d
    mov eax, dword ptr [r9 + 0x034]
    mov esi, eax
    mov edi, 6
    cmp eax, {qsize}
    jb .Lb_fail_status
    mov dword ptr [r9 + 0x038], {qsize}
    lea rax, [r10 + {desc}]
    mov dword ptr [r9 + 0x080], eax
    shr rax, 32
    mov dword ptr [r9 + 0x084], eax
    lea rax, [r10 + {avail}]
    mov dword ptr [r9 + 0x090], eax
    shr rax, 32
    mov dword ptr [r9 + 0x094], eax
    lea rax, [r10 + {used}]
    mov dword ptr [r9 + 0x0a0], eax
    shr rax, 32
    mov dword ptr [r9 + 0x0a4], eax
    mov dword ptr [r9 + 0x044], 1
    mov eax, dword ptr [r9 + 0x044]
    mov esi, eax
    mov edi, 7
    cmp eax, 1
    jne .Lb_fail_status
    add r10, 0x1000
    inc r8d
    cmp r8d, r11d
    jb .Lb_queue
    // DRIVER_OK, read back.
    mov dword ptr [r9 + 0x070], 15
    mov eax, dword ptr [r9 + 0x070]
    mov esi, eax
    mov edi, 8
    test eax, 64
    jnz .Lb_fail_status
    mov edi, 9
    test eax, 4
    jz .Lb_fail_status
    mov qword ptr [rbx + {st_state}], 2
    lea rsi, [rip + .Lmsg_bready]
    xor r10, r10
    call .Lsay
    xor ebp, ebp

.Lb_loop:
    // Target: num_pages (config +0), clamped to the share.
    mov eax, dword ptr [r9 + 0x100]
    mov rcx, r13
    sub rcx, r12
    shr rcx, 12
    cmp rax, rcx
    cmova rax, rcx
    mov qword ptr [rbx + {st_target}], rax
    cmp rax, rbp
    ja .Lb_inflate
    jb .Lb_deflate
    // At the target: take a new command (SEQ moved), else spin and poll.
    mov rax, qword ptr [rbx + 8]
    cmp rax, qword ptr [rbx + {st_seq}]
    je .Lb_idle
    mov qword ptr [rbx + {st_seq}], rax
    mov qword ptr [rbx + {st_idle_until}], 0
    mov rax, qword ptr [rbx + 16]
    cmp rax, 2
    je .Lb_exit
    cmp rax, 3
    je .Lb_report
.Lb_idle:
    mov rdi, qword ptr [rbx + {s_cursor}]
    test rdi, rdi
    jnz .Lb_chunk
.Lb_idle_spin:
    // Nothing to do: poll (rounds of pauses, each followed by a new look
    // at the target and SEQ) until IDLE_UNTIL, IDLE_SPIN_CYCLES TSC cycles
    // after the driver last worked (0: worked since, start the spin now);
    // then wait in the VMM (OP_IDLE) until the host may have given work,
    // and look again.
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov rcx, qword ptr [rbx + {st_idle_until}]
    test rcx, rcx
    jnz .Lb_idle_check
    lea rcx, [rax + {idle_spin}]
    mov qword ptr [rbx + {st_idle_until}], rcx
.Lb_idle_check:
    cmp rax, rcx
    jae .Lb_idle_wait
    mov ecx, 64
.Lb_spin:
    pause
    dec ecx
    jnz .Lb_spin
    jmp .Lb_loop
.Lb_idle_wait:
    inc qword ptr [rbx + {st_idle_waits}]
    mov eax, {op_idle}
    call .Lreport_op
    jmp .Lb_loop

.Lb_chunk:
    // BalloonStress: rewrite and verify the next chunk below the balloon
    // (rsi = its first page); a sweep that reaches it is one pass.
    mov rsi, rbp
    shl rsi, 12
    neg rsi
    add rsi, r13
    cmp rdi, rsi
    jb .Lb_chunk_go
    mov rdi, r12
    mov qword ptr [rbx + {s_cursor}], rdi
    cmp rdi, rsi
    jae .Lb_idle_spin
    inc qword ptr [rbx + {s_blocks} + {s_passes}]
.Lb_chunk_go:
    lea rax, [rdi + {s_chunk}]
    cmp rax, rsi
    cmovb rsi, rax
    mov qword ptr [rbx + {s_cursor}], rsi
    call .Lwv
    jmp .Lb_loop

.Lb_inflate:
    // r8 = min(target - pages, MAX_PFNS) pages, going down from the end.
    mov qword ptr [rbx + {st_idle_until}], 0
    sub rax, rbp
    mov ecx, {max_pfns}
    cmp rax, rcx
    cmova rax, rcx
    mov r8, rax
    mov rdx, r13
    shr rdx, 12
    sub rdx, rbp
    mov rdi, {pfns}
    xor ecx, ecx
.Lb_inf_fill:
    dec rdx
    mov dword ptr [rdi + rcx*4], edx
    inc rcx
    cmp rcx, r8
    jb .Lb_inf_fill
    mov r10, {queues}
    xor esi, esi
    lea edx, [r8*4]
    xor ecx, ecx
    call .Lb_send
    add rbp, r8
    add qword ptr [rbx + {st_inflated}], r8
    jmp .Lb_actual

.Lb_deflate:
    // r8 = min(pages - target, MAX_PFNS) most recently inflated pages:
    // PFNs end - pages .. end - pages + r8 - 1.
    mov qword ptr [rbx + {st_idle_until}], 0
    mov rcx, rbp
    sub rcx, rax
    mov eax, {max_pfns}
    cmp rcx, rax
    cmova rcx, rax
    mov r8, rcx
    mov rdx, r13
    shr rdx, 12
    sub rdx, rbp
    mov rdi, {pfns}
    xor ecx, ecx
.Lb_def_fill:
    mov dword ptr [rdi + rcx*4], edx
    inc rdx
    inc rcx
    cmp rcx, r8
    jb .Lb_def_fill
    mov r10, {queues} + 0x1000
    mov esi, 1
    lea edx, [r8*4]
    xor ecx, ecx
    call .Lb_send
    sub rbp, r8
    add qword ptr [rbx + {st_deflated}], r8
    // Touch the deflated pages [end - (pages + r8) * 4K, end - pages * 4K).
    lea rdi, [rbp + r8]
    shl rdi, 12
    neg rdi
    add rdi, r13
    mov rsi, rbp
    shl rsi, 12
    neg rsi
    add rsi, r13
    call .Lb_touch

.Lb_actual:
    // actual (config +4) = pages, after the device returned the buffer.
    mov dword ptr [r9 + 0x104], ebp
    mov qword ptr [rbx + {st_pages}], rbp
    cmp rbp, qword ptr [rbx + {st_target}]
    jne .Lb_loop
    lea rsi, [rip + .Lmsg_bat]
    mov rdi, rbp
    lea r10, [rip + .Lmsg_pages_nl]
    call .Lsay
    jmp .Lb_loop

.Lb_report:
    // Report ARG pages just below the balloon as free, clamped to the
    // share, in device-writable buffers of at most MAX_PFNS pages going
    // down from the balloon; then touch and verify them again.
    cmp qword ptr [rbx + {st_report_q}], 0
    jne .Lb_rep_go
    inc qword ptr [rbx + {st_refused}]
    jmp .Lb_loop
.Lb_rep_go:
    mov r8, qword ptr [rbx + 24]
    mov rcx, r13
    sub rcx, r12
    shr rcx, 12
    sub rcx, rbp
    cmp r8, rcx
    cmova r8, rcx
    mov rdi, rbp
    shl rdi, 12
    neg rdi
    add rdi, r13
    push rdi
.Lb_rep_chunk:
    test r8, r8
    jz .Lb_rep_touch
    mov rdx, r8
    mov ecx, {max_pfns}
    cmp rdx, rcx
    cmova rdx, rcx
    sub r8, rdx
    add qword ptr [rbx + {st_reported}], rdx
    shl rdx, 12
    sub rdi, rdx
    push rdi
    mov r10, {queues} + 0x2000
    mov esi, 2
    mov ecx, 2
    call .Lb_send
    pop rdi
    jmp .Lb_rep_chunk
.Lb_rep_touch:
    pop rsi
    call .Lb_touch
    lea rsi, [rip + .Lmsg_brep]
    mov rdi, qword ptr [rbx + {st_reported}]
    lea r10, [rip + .Lmsg_pages_nl]
    call .Lsay
    jmp .Lb_loop

    // touch(rdi = start, rsi = end): write the pattern over the pages
    // (each first touch faults in through the VMM's handler), verify it,
    // add bad words and pages to the status block.
.Lb_touch:
    mov rcx, rdi
.Lb_touch_w:
    cmp rcx, rsi
    jae .Lb_touch_wd
    mov rax, rcx
    xor rax, r15
    mov qword ptr [rcx], rax
    add rcx, 8
    jmp .Lb_touch_w
.Lb_touch_wd:
    xor edx, edx
    mov rcx, rdi
.Lb_touch_v:
    cmp rcx, rsi
    jae .Lb_touch_vd
    mov rax, rcx
    xor rax, r15
    cmp qword ptr [rcx], rax
    je .Lb_touch_next
    inc rdx
    cmp qword ptr [rbx + {st_first_bad}], 0
    jne .Lb_touch_next
    mov qword ptr [rbx + {st_first_bad}], rcx
.Lb_touch_next:
    add rcx, 8
    jmp .Lb_touch_v
.Lb_touch_vd:
    add qword ptr [rbx + {st_bad}], rdx
    mov rax, rsi
    sub rax, rdi
    shr rax, 12
    add qword ptr [rbx + {st_reverified}], rax
    ret

    // send(r10 = queue page, esi = queue index, rdi = buffer, edx = bytes,
    // ecx = descriptor flags): descriptor 0 over the buffer, publish it,
    // notify, poll the used ring until the device returned it.
.Lb_send:
    mov qword ptr [r10 + {desc}], rdi
    mov dword ptr [r10 + {desc} + 8], edx
    mov dword ptr [r10 + {desc} + 12], ecx
    movzx eax, word ptr [r10 + {avail} + 2]
    mov ecx, eax
    and ecx, {qsize} - 1
    mov word ptr [r10 + {avail} + 4 + rcx*2], 0
    // x86 is TSO: the index store is seen after the ring and descriptor.
    inc eax
    mov word ptr [r10 + {avail} + 2], ax
    // The QueueNotify write, timed with rdtsc on both sides (the write
    // exits to the VMM, so the second read runs after the vCPU is back):
    // one sample into queue esi's ring of the timing block, its count and
    // its maximum (see balloon::notify_timing).
    push rax
    push rdx
    push rcx
    push r11
    lfence
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r11, rax
    mov dword ptr [r9 + 0x050], esi
    lfence
    rdtsc
    shl rdx, 32
    or rax, rdx
    sub rax, r11
    mov ecx, esi
    shl rcx, 4
    cmp rax, qword ptr [rbx + {nt_max} + rcx]
    jbe .Lb_nt_count
    mov qword ptr [rbx + {nt_max} + rcx], rax
.Lb_nt_count:
    mov rdx, qword ptr [rbx + {nt_count} + rcx]
    inc qword ptr [rbx + {nt_count} + rcx]
    and edx, {nt_slots} - 1
    mov ecx, esi
    shl rcx, {nt_ring_shift}
    lea rcx, [rcx + rdx*8]
    mov qword ptr [rbx + {nt_samples} + rcx], rax
    pop r11
    pop rcx
    pop rdx
    pop rax
    // Poll the used ring for IDLE_SPIN_CYCLES TSC cycles (memory reads
    // only: no exit), then wait in the VMM (OP_IDLE) between looks: the
    // device thread wakes the vCPU whenever it returns a buffer (the
    // transport's waker), so the vCPU does not spin on a host core while
    // the device releases. rcx = the spin's end; rax (the index waited
    // for) is kept.
    push rcx
    push rax
    rdtsc
    shl rdx, 32
    or rax, rdx
    lea rcx, [rax + {idle_spin}]
    pop rax
.Lb_wait:
    cmp ax, word ptr [r10 + {used} + 2]
    je .Lb_sent
    pause
    push rax
    rdtsc
    shl rdx, 32
    or rax, rdx
    cmp rax, rcx
    pop rax
    jb .Lb_wait
.Lb_wait_idle:
    inc qword ptr [rbx + {st_send_waits}]
    push rax
    mov eax, {op_idle}
    call .Lreport_op
    pop rax
    cmp ax, word ptr [r10 + {used} + 2]
    je .Lb_sent
    // Woken (or the backstop passed) and still not returned: a device
    // that gave up (NEEDS_RESET) ignores the notify; it woke the vCPU when
    // it set the bit, or the backstop does.
    mov edx, dword ptr [r9 + 0x070]
    test edx, 64
    jnz .Lb_send_reset
    jmp .Lb_wait_idle
.Lb_sent:
    pop rcx
    ret
.Lb_send_reset:
    mov esi, edx
    mov edi, 8
    jmp .Lb_fail

.Lb_exit:
    mov qword ptr [rbx + {st_state}], 3
    jmp .Ldone

    // fail(edi = code, esi = detail): FAILED in the device status (once
    // negotiation began), status block, console line, report, stop. The
    // stack may hold return addresses: it is not used again.
.Lb_fail_status:
    mov eax, dword ptr [r9 + 0x070]
    or eax, 128
    mov dword ptr [r9 + 0x070], eax
.Lb_fail:
    mov qword ptr [rbx + {st_error}], rdi
    mov qword ptr [rbx + {st_detail}], rsi
    mov qword ptr [rbx + {st_state}], 4
    push rdi
    push rsi
    lea rsi, [rip + .Lmsg_bfail]
    lea r10, [rip + .Lmsg_bfail_end]
    call .Lsay
    pop rsi
    pop rdi
    mov eax, {op_error}
    call .Lreport_op
.Lb_stopped:
    pause
    jmp .Lb_stopped

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
.Lmsg_bready:
    .asciz ": balloon driver ready\n"
.Lmsg_bat:
    .asciz ": balloon at "
.Lmsg_brep:
    .asciz ": free pages reported so far "
.Lmsg_pages_nl:
    .asciz " pages\n"
.Lmsg_bfail:
    .asciz ": balloon driver error "
.Lmsg_bfail_end:
    .asciz "\n"

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
"#,
    mmio = const crate::devices::virtio::BALLOON_MMIO_BASE,
    queues = const super::layout::BALLOON_QUEUES,
    queues_end = const super::layout::BALLOON_QUEUES_END,
    area_end = const super::layout::BALLOON_END,
    pfns = const super::layout::BALLOON_PFNS,
    qsize = const super::balloon::QUEUE_SIZE,
    max_pfns = const super::balloon::MAX_PFNS,
    desc = const super::balloon::DESC_OFFSET,
    avail = const super::balloon::AVAIL_OFFSET,
    used = const super::balloon::USED_OFFSET,
    op_error = const super::balloon::OP_BALLOON_ERROR,
    op_idle = const crate::devices::report::OP_IDLE,
    idle_spin = const super::IDLE_SPIN_CYCLES,
    st_idle_until = const super::balloon::status::IDLE_UNTIL,
    st_idle_waits = const super::balloon::status::IDLE_WAITS,
    st_send_waits = const super::balloon::status::SEND_WAITS,
    st_state = const super::balloon::status::STATE,
    st_pages = const super::balloon::status::PAGES,
    st_inflated = const super::balloon::status::INFLATED,
    st_deflated = const super::balloon::status::DEFLATED,
    st_reverified = const super::balloon::status::REVERIFIED,
    st_bad = const super::balloon::status::BAD_WORDS,
    st_first_bad = const super::balloon::status::FIRST_BAD,
    st_error = const super::balloon::status::ERROR,
    st_detail = const super::balloon::status::DETAIL,
    st_target = const super::balloon::status::TARGET,
    st_report_q = const super::balloon::status::REPORT_QUEUE,
    st_reported = const super::balloon::status::REPORTED,
    st_seq = const super::balloon::status::SEQ,
    st_refused = const super::balloon::status::REPORTS_REFUSED,
    nt_count = const super::balloon::notify_timing::COUNT,
    nt_max = const super::balloon::notify_timing::MAX,
    nt_samples = const super::balloon::notify_timing::SAMPLES,
    nt_slots = const super::balloon::notify_timing::SLOTS,
    nt_ring_shift = const super::balloon::notify_timing::RING_SHIFT,
    s_cursor = const super::stress::CURSOR,
    s_blocks = const super::stress::BLOCKS,
    s_block = const super::stress::BLOCK,
    s_passes = const super::stress::PASSES,
    s_bad = const super::stress::BAD_WORDS,
    s_first_bad = const super::stress::FIRST_BAD,
    s_chunk = const super::stress::CHUNK,
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
