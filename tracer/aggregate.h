/* SPDX-License-Identifier: GPL-2.0 */
/*
 * In-kernel aggregation for the tracer's bpf_printk lines (see README.md, "Aggregation").
 *
 * Every event adds 1 to a per-(thread, hook) counter in an LRU hash map. A line is printed when the
 * thread's counter for that hook is new (its first event prints at once) or when the last line for
 * it is at least gtp5g_op_interval_ns old; the line carries N=<events since the last line>. Events
 * after the last line stay in the map until the next line, the periodic flush or the final flush:
 * the program gtp5g_op_flush (never attached; the loader runs it with BPF_PROG_TEST_RUN) prints
 *
 *     <hook>: N=<n>, TGID=<tgid>, pid=<tid> (<comm>)
 *
 * for every counter with events pending (args[0] != 0: all of them; 0: only those idle for an
 * interval). Counts are exact: the counter is only ever added to atomically and taken with an
 * atomic exchange, so every event is reported in exactly one line, whichever CPU prints it.
 *
 * The including file defines GTP5G_OP_NHOOKS and gtp5g_op_hooks[][GTP5G_OP_HOOK_LEN] (the hook
 * names by id) before including this header.
 */
#ifndef GTP5G_OP_AGGREGATE_H
#define GTP5G_OP_AGGREGATE_H

#define GTP5G_OP_AGG_ENTRIES 16384 /* (thread, hook) pairs kept; least recently used go first */
#define GTP5G_OP_COMM_LEN 16

/* Seconds between lines per (thread, hook), in ns; 0 prints every event (N=1). The loader sets it
 * before loading (`--interval`); this section holds nothing else so the loader can write it whole. */
const volatile __u64 gtp5g_op_interval_ns SEC(".rodata.agg") = 1000000000ULL;

struct gtp5g_op_agg_key {
	__u32 tid;  /* kernel task id */
	__u16 hook; /* index into gtp5g_op_hooks */
	__u16 cpu;  /* only for tid 0: every CPU has its own idle task */
};

struct gtp5g_op_agg_val {
	__u64 pending; /* events not yet in a line */
	__u64 last_ns; /* when the last line for this key was printed (or the key was created) */
	__u32 tgid;
	char comm[GTP5G_OP_COMM_LEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, GTP5G_OP_AGG_ENTRIES);
	__type(key, struct gtp5g_op_agg_key);
	__type(value, struct gtp5g_op_agg_val);
} gtp5g_op_agg SEC(".maps");

/*
 * Count one event of `hook` for the running thread; return how many events the line printed now
 * must carry, or 0 when no line is due.
 */
static __always_inline __u64 gtp5g_op_agg_take(__u16 hook)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u64 now = bpf_ktime_get_ns();
	struct gtp5g_op_agg_key key = {
		.tid = (__u32)id,
		.hook = hook,
		.cpu = (__u32)id ? 0 : (__u16)bpf_get_smp_processor_id(),
	};
	struct gtp5g_op_agg_val *v;

	if (gtp5g_op_interval_ns == 0)
		return 1;
	v = bpf_map_lookup_elem(&gtp5g_op_agg, &key);
	if (!v) {
		struct gtp5g_op_agg_val fresh = { .pending = 0, .last_ns = now, .tgid = id >> 32 };

		bpf_get_current_comm(fresh.comm, sizeof(fresh.comm));
		if (bpf_map_update_elem(&gtp5g_op_agg, &key, &fresh, BPF_NOEXIST) == 0)
			return 1; /* a new (thread, hook): its first event prints at once */
		v = bpf_map_lookup_elem(&gtp5g_op_agg, &key);
		if (!v)
			return 1; /* the map refused it: print the event alone rather than lose it */
	}
	__sync_fetch_and_add(&v->pending, 1);
	if (now - v->last_ns < gtp5g_op_interval_ns)
		return 0;
	v->last_ns = now;
	bpf_get_current_comm(v->comm, sizeof(v->comm));
	return __sync_lock_test_and_set(&v->pending, 0);
}

struct gtp5g_op_flush_ctx {
	__u64 now;
	__u64 force;
};

static long gtp5g_op_flush_one(struct bpf_map *map, struct gtp5g_op_agg_key *key,
			       struct gtp5g_op_agg_val *v, struct gtp5g_op_flush_ctx *fc)
{
	__u64 n;
	__u32 hook = key->hook;

	if (!fc->force && fc->now - v->last_ns < gtp5g_op_interval_ns)
		return 0;
	if (hook >= GTP5G_OP_NHOOKS || !v->pending)
		return 0;
	n = __sync_lock_test_and_set(&v->pending, 0);
	if (!n)
		return 0;
	v->last_ns = fc->now;
	bpf_printk("%s: N=%llu, TGID=%u, pid=%u (%s)", gtp5g_op_hooks[hook], n, v->tgid, key->tid,
		   v->comm);
	return 0;
}

/* Print the pending counts (see the top of this file). Run by the loader, never attached. */
SEC("raw_tp")
int gtp5g_op_flush(struct bpf_raw_tracepoint_args *ctx)
{
	struct gtp5g_op_flush_ctx fc = { .now = bpf_ktime_get_ns(), .force = ctx->args[0] };

	bpf_for_each_map_elem(&gtp5g_op_agg, gtp5g_op_flush_one, &fc, 0);
	return 0;
}

#endif /* GTP5G_OP_AGGREGATE_H */
