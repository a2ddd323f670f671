// SPDX-License-Identifier: GPL-2.0
/*
 * gtp5g-op selftest probe: tracepoint programs that print lines in the tracer's own format,
 * so that BPF loading, bpf_printk, a tracefs instance pipe and the parser can be proven end to
 * end on any host (tracepoints need neither gtp5g nor fentry support).
 *
 *   selftest/sys_enter_getppid: PID=<tid>, TGID=<pid>, CPU=<cpu>, LEN=0, DEV=-
 *   selftest/sys_exit_getppid: PID=<tid>, TGID=<pid>, CPU=<cpu>, LEN=0, DEV=-, RET=<parent pid>
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

/* Context layouts from /sys/kernel/tracing/events/syscalls/sys_{enter,exit}_getppid/format. */
struct getppid_enter_ctx {
	__u64 common;
	int syscall_nr;
};

struct getppid_exit_ctx {
	__u64 common;
	int syscall_nr;
	long ret;
};

SEC("tp/syscalls/sys_enter_getppid")
int selftest_getppid_enter(struct getppid_enter_ctx *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();

	bpf_printk("selftest/sys_enter_getppid: PID=%u, TGID=%u, CPU=%u, LEN=0, DEV=-",
		   (__u32)id, (__u32)(id >> 32), bpf_get_smp_processor_id());
	return 0;
}

SEC("tp/syscalls/sys_exit_getppid")
int selftest_getppid_exit(struct getppid_exit_ctx *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();

	bpf_printk("selftest/sys_exit_getppid: PID=%u, TGID=%u, CPU=%u, LEN=0, DEV=-, RET=%ld",
		   (__u32)id, (__u32)(id >> 32), bpf_get_smp_processor_id(), ctx->ret);
	return 0;
}
