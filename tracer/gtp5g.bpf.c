// SPDX-License-Identifier: GPL-2.0
/*
 * gtp5g-op tracer: fentry/fexit programs on the 7 functions gtp5g exports for tracing, and a
 * kprobe/kretprobe twin of each that the loader attaches where the BPF trampoline refuses the
 * function (e.g. ip4_find_route's 7 arguments before Linux 6.6). Both print the same lines.
 *
 * Events are counted in the kernel per (thread, hook) (aggregate.h); one line per (thread, hook)
 * per interval (1 s by default) carries the count since the previous one (see README.md):
 *   <hook>: N=<events>, PID=<tid>, TGID=<pid>, CPU=<cpu>, LEN=<skb len>, DEV=<ifname|->[, TEID=0x<teid>][, RET=<ret>]
 * PID is the kernel task (thread) id, TGID the process id of the task running the hook; CPU, LEN,
 * DEV, TEID and RET are those of the event that printed the line.
 *
 * Build: gtp5g-op build tracer (vmlinux.h comes from the running kernel's BTF).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "gtp5g_types.h"

char LICENSE[] SEC("license") = "GPL";

/* Hook ids (the key of the aggregation map) and the names the lines start with. A kprobe twin
 * prints the same hook name as its fentry/fexit program: the name says which event, the loader's
 * report says by which mechanism. */
enum {
	H_ENCAP_RECV_ENTRY, H_ENCAP_RECV_EXIT, H_PDR_FIND_ENTRY, H_PDR_FIND_EXIT,
	H_HANDLE_SKB_ENTRY, H_HANDLE_SKB_EXIT, H_FIND_ROUTE_ENTRY, H_FIND_ROUTE_EXIT,
	H_PUSH_HEADER_ENTRY, H_XMIT_SKB_ENTRY, H_POLICE_ENTRY, H_POLICE_EXIT,
	GTP5G_OP_NHOOKS
};

#define GTP5G_OP_HOOK_LEN 32
static const char gtp5g_op_hooks[GTP5G_OP_NHOOKS][GTP5G_OP_HOOK_LEN] = {
	"fentry/gtp5g_encap_recv", "fexit/gtp5g_encap_recv",
	"fentry/pdr_find_by_gtp1u", "fexit/pdr_find_by_gtp1u",
	"fentry/gtp5g_handle_skb_ipv4", "fexit/gtp5g_handle_skb_ipv4",
	"fentry/ip4_find_route", "fexit/ip4_find_route",
	"fentry/gtp5g_push_header", "fentry/gtp5g_xmit_skb_ipv4",
	"fentry/policePacket", "fexit/policePacket",
};

#include "aggregate.h"

#define IFNAMSIZ_ 16

/* The task fields every line carries. */
struct who {
	__u32 pid;
	__u32 tgid;
	__u32 cpu;
};

static __always_inline void who_now(struct who *w)
{
	__u64 id = bpf_get_current_pid_tgid();

	w->pid = (__u32)id;
	w->tgid = id >> 32;
	w->cpu = bpf_get_smp_processor_id();
}

/* Copy the device name into buf, or "-" when there is no device. */
static __always_inline void dev_name(char *buf, struct net_device *dev)
{
	if (!dev || bpf_probe_read_kernel_str(buf, IFNAMSIZ_, dev->name) <= 1) {
		buf[0] = '-';
		buf[1] = '\0';
	}
}

static __always_inline __u32 skb_len(struct sk_buff *skb)
{
	return skb ? BPF_CORE_READ(skb, len) : 0;
}

static __always_inline struct net_device *skb_dev(struct sk_buff *skb)
{
	return skb ? BPF_CORE_READ(skb, dev) : NULL;
}

/*
 * The TEID of a GTP-U packet at the UDP layer: the GTPv1 header follows the 8-byte UDP header
 * at the transport header. Read only when the whole header sits in the linear part of the skb
 * and its version field says GTPv1; *teid is in host order. Returns 0 on success.
 */
static __always_inline int gtpu_teid(struct sk_buff *skb, __u32 *teid)
{
	struct gtp5g_op_gtpu_hdr gtp;
	unsigned char *head, *data;
	__u16 thoff;
	__u32 len, data_len;
	long off;

	if (!skb)
		return -1;
	head = BPF_CORE_READ(skb, head);
	data = BPF_CORE_READ(skb, data);
	thoff = BPF_CORE_READ(skb, transport_header);
	len = BPF_CORE_READ(skb, len);
	data_len = BPF_CORE_READ(skb, data_len);
	if (thoff == (__u16)~0U)  /* transport header not set */
		return -1;
	/* offset of the GTP header from skb->data; it must lie in the linear area */
	off = (long)(head + thoff + GTP5G_OP_UDP_HLEN - data);
	if (off < 0 || len < data_len || (long)(len - data_len) < off + (long)sizeof(gtp))
		return -1;
	if (bpf_probe_read_kernel(&gtp, sizeof(gtp), head + thoff + GTP5G_OP_UDP_HLEN))
		return -1;
	if ((gtp.flags >> 5) != GTP5G_OP_GTPV1)
		return -1;
	*teid = bpf_ntohl(gtp.teid);
	return 0;
}

/*
 * One line when the aggregation says one is due; the hook name is part of the literal format.
 * `id` indexes gtp5g_op_hooks, `hook` is the same name as a literal.
 */
#define EMIT(id, hook, len, dev) do {						\
	__u64 n_ = gtp5g_op_agg_take(id);					\
	if (n_) {								\
		struct who w; char ifn[IFNAMSIZ_];				\
		who_now(&w); dev_name(ifn, dev);				\
		bpf_printk(hook ": N=%llu, PID=%u, TGID=%u, CPU=%u, LEN=%u, DEV=%s",	\
			   n_, w.pid, w.tgid, w.cpu, len, ifn);		\
	}									\
} while (0)

#define EMIT_RET(id, hook, len, dev, ret) do {					\
	__u64 n_ = gtp5g_op_agg_take(id);					\
	if (n_) {								\
		struct who w; char ifn[IFNAMSIZ_];				\
		who_now(&w); dev_name(ifn, dev);				\
		bpf_printk(hook ": N=%llu, PID=%u, TGID=%u, CPU=%u, LEN=%u, DEV=%s, RET=%d", \
			   n_, w.pid, w.tgid, w.cpu, len, ifn, ret);	\
	}									\
} while (0)

#define EMIT_TEID(id, hook, len, dev, teid) do {				\
	__u64 n_ = gtp5g_op_agg_take(id);					\
	if (n_) {								\
		struct who w; char ifn[IFNAMSIZ_];				\
		who_now(&w); dev_name(ifn, dev);				\
		bpf_printk(hook ": N=%llu, PID=%u, TGID=%u, CPU=%u, LEN=%u, DEV=%s, TEID=0x%08x", \
			   n_, w.pid, w.tgid, w.cpu, len, ifn, teid);		\
	}									\
} while (0)

#define EMIT_TEID_RET(id, hook, len, dev, teid, ret) do {			\
	__u64 n_ = gtp5g_op_agg_take(id);					\
	if (n_) {								\
		struct who w; char ifn[IFNAMSIZ_];				\
		who_now(&w); dev_name(ifn, dev);				\
		bpf_printk(hook ": N=%llu, PID=%u, TGID=%u, CPU=%u, LEN=%u, DEV=%s, TEID=0x%08x, RET=%d", \
			   n_, w.pid, w.tgid, w.cpu, len, ifn, teid, ret);	\
	}									\
} while (0)

/* The return value of the traced function, whatever its argument count (kernel >= 5.17). */
static __always_inline long func_ret(void *ctx)
{
	__u64 ret = 0;

	bpf_get_func_ret(ctx, &ret);
	return (long)ret;
}

/*
 * What a kprobe entry program saves for its kretprobe twin: at return the arguments are gone.
 * Keyed by (thread, function); fexit programs read their arguments directly and need none of it.
 */
struct args_key {
	__u32 tid;
	__u32 fn;
};

struct args_val {
	struct net_device *dev;
	__u32 len;
	__u32 teid;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct args_key);
	__type(value, struct args_val);
} gtp5g_op_args SEC(".maps");

static __always_inline void args_save(__u32 fn, __u32 len, struct net_device *dev, __u32 teid)
{
	struct args_key k = { .tid = (__u32)bpf_get_current_pid_tgid(), .fn = fn };
	struct args_val v = { .dev = dev, .len = len, .teid = teid };

	bpf_map_update_elem(&gtp5g_op_args, &k, &v, BPF_ANY);
}

/* The saved arguments of this thread's call of `fn` (zeroes when none were saved). */
static __always_inline struct args_val args_take(__u32 fn)
{
	struct args_key k = { .tid = (__u32)bpf_get_current_pid_tgid(), .fn = fn };
	struct args_val out = {}, *v = bpf_map_lookup_elem(&gtp5g_op_args, &k);

	if (v) {
		out = *v;
		bpf_map_delete_elem(&gtp5g_op_args, &k);
	}
	return out;
}

/* An ERR_PTR or NULL route counts as none. */
static __always_inline int route_found(long rt)
{
	return rt != 0 && (unsigned long)rt < (unsigned long)-4095L;
}

/* --- the hooks' bodies, shared by the fentry/fexit programs and their kprobe twins ---------- */

static __always_inline void encap_recv_entry(struct sk_buff *skb)
{
	__u32 teid;

	if (gtpu_teid(skb, &teid) == 0)
		EMIT_TEID(H_ENCAP_RECV_ENTRY, "fentry/gtp5g_encap_recv", skb_len(skb), skb_dev(skb), teid);
	else
		EMIT(H_ENCAP_RECV_ENTRY, "fentry/gtp5g_encap_recv", skb_len(skb), skb_dev(skb));
}

/* RET: 0 consumed, < 0 error, > 0 passed up to the UDP socket. The skb may be freed: no LEN/DEV. */
static __always_inline void encap_recv_exit(int ret)
{
	EMIT_RET(H_ENCAP_RECV_EXIT, "fexit/gtp5g_encap_recv", 0, (struct net_device *)NULL, ret);
}

static __always_inline void pdr_find_entry(struct sk_buff *skb, __u32 teid_be)
{
	EMIT_TEID(H_PDR_FIND_ENTRY, "fentry/pdr_find_by_gtp1u", skb_len(skb), skb_dev(skb),
		  bpf_ntohl(teid_be));
}

/* RET: 1 a PDR matched, 0 none. */
static __always_inline void pdr_find_exit(__u32 len, struct net_device *dev, __u32 teid, long pdr)
{
	EMIT_TEID_RET(H_PDR_FIND_EXIT, "fexit/pdr_find_by_gtp1u", len, dev, teid, pdr != 0);
}

static __always_inline void handle_skb_entry(struct sk_buff *skb, struct net_device *dev)
{
	EMIT(H_HANDLE_SKB_ENTRY, "fentry/gtp5g_handle_skb_ipv4", skb_len(skb), dev ? dev : skb_dev(skb));
}

/* RET: gtp5g's PKT_* code (0 sent, 1 passed to the UPF, -1 dropped) or -errno. */
static __always_inline void handle_skb_exit(struct net_device *dev, int ret)
{
	EMIT_RET(H_HANDLE_SKB_EXIT, "fexit/gtp5g_handle_skb_ipv4", 0, dev, ret);
}

static __always_inline void find_route_entry(struct sk_buff *skb, struct net_device *gtp_dev)
{
	EMIT(H_FIND_ROUTE_ENTRY, "fentry/ip4_find_route", skb_len(skb), gtp_dev ? gtp_dev : skb_dev(skb));
}

/* RET: 1 a route was found, 0 none. */
static __always_inline void find_route_exit(__u32 len, struct net_device *dev, long rt)
{
	EMIT_RET(H_FIND_ROUTE_EXIT, "fexit/ip4_find_route", len, dev, route_found(rt));
}

static __always_inline void push_header_entry(struct sk_buff *skb)
{
	EMIT(H_PUSH_HEADER_ENTRY, "fentry/gtp5g_push_header", skb_len(skb), skb_dev(skb));
}

static __always_inline void xmit_skb_entry(struct sk_buff *skb)
{
	EMIT(H_XMIT_SKB_ENTRY, "fentry/gtp5g_xmit_skb_ipv4", skb_len(skb), skb_dev(skb));
}

/* policePacket has no skb: DEV=- */
static __always_inline void police_entry(int pkt_len)
{
	EMIT(H_POLICE_ENTRY, "fentry/policePacket", (__u32)pkt_len, (struct net_device *)NULL);
}

/* RET: the colour, 0 green, 1 yellow, 2 red. */
static __always_inline void police_exit(int pkt_len, int colour)
{
	EMIT_RET(H_POLICE_EXIT, "fexit/policePacket", (__u32)pkt_len, (struct net_device *)NULL, colour);
}

/* --- fentry/fexit: the first choice (BTF-typed arguments, no per-call probe cost) ---------- */

/* int gtp5g_encap_recv(struct sock *sk, struct sk_buff *skb) */
SEC("fentry/gtp5g_encap_recv")
int BPF_PROG(gtp5g_encap_recv_entry, struct sock *sk, struct sk_buff *skb)
{
	encap_recv_entry(skb);
	return 0;
}

SEC("fexit/gtp5g_encap_recv")
int BPF_PROG(gtp5g_encap_recv_exit, struct sock *sk, struct sk_buff *skb)
{
	encap_recv_exit((int)func_ret(ctx));
	return 0;
}

/* struct pdr *pdr_find_by_gtp1u(struct gtp5g_dev *gtp, struct sk_buff *skb,
 *                               unsigned int hdrlen, u32 teid, u8 type)  (teid in network order) */
SEC("fentry/pdr_find_by_gtp1u")
int BPF_PROG(pdr_find_by_gtp1u_entry, struct gtp5g_dev *gtp, struct sk_buff *skb,
	     unsigned int hdrlen, __u32 teid)
{
	pdr_find_entry(skb, teid);
	return 0;
}

SEC("fexit/pdr_find_by_gtp1u")
int BPF_PROG(pdr_find_by_gtp1u_exit, struct gtp5g_dev *gtp, struct sk_buff *skb,
	     unsigned int hdrlen, __u32 teid)
{
	pdr_find_exit(skb_len(skb), skb_dev(skb), bpf_ntohl(teid), func_ret(ctx));
	return 0;
}

/* int gtp5g_handle_skb_ipv4(struct sk_buff *skb, struct net_device *dev,
 *                           struct gtp5g_pktinfo *pktinfo) */
SEC("fentry/gtp5g_handle_skb_ipv4")
int BPF_PROG(gtp5g_handle_skb_ipv4_entry, struct sk_buff *skb, struct net_device *dev)
{
	handle_skb_entry(skb, dev);
	return 0;
}

SEC("fexit/gtp5g_handle_skb_ipv4")
int BPF_PROG(gtp5g_handle_skb_ipv4_exit, struct sk_buff *skb, struct net_device *dev)
{
	handle_skb_exit(dev, (int)func_ret(ctx));
	return 0;
}

/* struct rtable *ip4_find_route(struct sk_buff *skb, struct iphdr *iph, struct sock *sk,
 *                               struct net_device *gtp_dev, __be32 saddr, __be32 daddr,
 *                               struct flowi4 *fl4)   (7 arguments) */
SEC("fentry/ip4_find_route")
int BPF_PROG(ip4_find_route_entry, struct sk_buff *skb, struct iphdr *iph, struct sock *sk,
	     struct net_device *gtp_dev)
{
	find_route_entry(skb, gtp_dev);
	return 0;
}

SEC("fexit/ip4_find_route")
int BPF_PROG(ip4_find_route_exit, struct sk_buff *skb, struct iphdr *iph, struct sock *sk,
	     struct net_device *gtp_dev)
{
	find_route_exit(skb_len(skb), gtp_dev ? gtp_dev : skb_dev(skb), func_ret(ctx));
	return 0;
}

/* void gtp5g_push_header(struct sk_buff *skb, struct gtp5g_pktinfo *pktinfo) */
SEC("fentry/gtp5g_push_header")
int BPF_PROG(gtp5g_push_header_entry, struct sk_buff *skb)
{
	push_header_entry(skb);
	return 0;
}

/* void gtp5g_xmit_skb_ipv4(struct sk_buff *skb, struct gtp5g_pktinfo *pktinfo) */
SEC("fentry/gtp5g_xmit_skb_ipv4")
int BPF_PROG(gtp5g_xmit_skb_ipv4_entry, struct sk_buff *skb)
{
	xmit_skb_entry(skb);
	return 0;
}

/* Color policePacket(TrafficPolicer *p, int pktLen)  (v0.9.0 and later) */
SEC("fentry/policePacket")
int BPF_PROG(policePacket_entry, void *policer, int pkt_len)
{
	police_entry(pkt_len);
	return 0;
}

SEC("fexit/policePacket")
int BPF_PROG(policePacket_exit, void *policer, int pkt_len)
{
	police_exit(pkt_len, (int)func_ret(ctx));
	return 0;
}

/* --- kprobe/kretprobe twins: the fallback, attached only where the fentry/fexit program is refused.
 * A twin is named after its program with _kprobe appended; the loader pairs them by that name. */

enum { FN_PDR_FIND, FN_HANDLE_SKB, FN_FIND_ROUTE, FN_POLICE };

SEC("kprobe/gtp5g_encap_recv")
int BPF_KPROBE(gtp5g_encap_recv_entry_kprobe, struct sock *sk, struct sk_buff *skb)
{
	encap_recv_entry(skb);
	return 0;
}

SEC("kretprobe/gtp5g_encap_recv")
int BPF_KRETPROBE(gtp5g_encap_recv_exit_kprobe, long ret)
{
	encap_recv_exit((int)ret);
	return 0;
}

SEC("kprobe/pdr_find_by_gtp1u")
int BPF_KPROBE(pdr_find_by_gtp1u_entry_kprobe, struct gtp5g_dev *gtp, struct sk_buff *skb,
	       unsigned int hdrlen, __u32 teid)
{
	pdr_find_entry(skb, teid);
	args_save(FN_PDR_FIND, skb_len(skb), skb_dev(skb), bpf_ntohl(teid));
	return 0;
}

SEC("kretprobe/pdr_find_by_gtp1u")
int BPF_KRETPROBE(pdr_find_by_gtp1u_exit_kprobe, long pdr)
{
	struct args_val a = args_take(FN_PDR_FIND);

	pdr_find_exit(a.len, a.dev, a.teid, pdr);
	return 0;
}

SEC("kprobe/gtp5g_handle_skb_ipv4")
int BPF_KPROBE(gtp5g_handle_skb_ipv4_entry_kprobe, struct sk_buff *skb, struct net_device *dev)
{
	handle_skb_entry(skb, dev);
	args_save(FN_HANDLE_SKB, 0, dev, 0);
	return 0;
}

SEC("kretprobe/gtp5g_handle_skb_ipv4")
int BPF_KRETPROBE(gtp5g_handle_skb_ipv4_exit_kprobe, long ret)
{
	struct args_val a = args_take(FN_HANDLE_SKB);

	handle_skb_exit(a.dev, (int)ret);
	return 0;
}

SEC("kprobe/ip4_find_route")
int BPF_KPROBE(ip4_find_route_entry_kprobe, struct sk_buff *skb, struct iphdr *iph, struct sock *sk,
	       struct net_device *gtp_dev)
{
	find_route_entry(skb, gtp_dev);
	args_save(FN_FIND_ROUTE, skb_len(skb), gtp_dev ? gtp_dev : skb_dev(skb), 0);
	return 0;
}

SEC("kretprobe/ip4_find_route")
int BPF_KRETPROBE(ip4_find_route_exit_kprobe, long rt)
{
	struct args_val a = args_take(FN_FIND_ROUTE);

	find_route_exit(a.len, a.dev, rt);
	return 0;
}

SEC("kprobe/gtp5g_push_header")
int BPF_KPROBE(gtp5g_push_header_entry_kprobe, struct sk_buff *skb)
{
	push_header_entry(skb);
	return 0;
}

SEC("kprobe/gtp5g_xmit_skb_ipv4")
int BPF_KPROBE(gtp5g_xmit_skb_ipv4_entry_kprobe, struct sk_buff *skb)
{
	xmit_skb_entry(skb);
	return 0;
}

SEC("kprobe/policePacket")
int BPF_KPROBE(policePacket_entry_kprobe, void *policer, int pkt_len)
{
	police_entry(pkt_len);
	args_save(FN_POLICE, (__u32)pkt_len, NULL, 0);
	return 0;
}

SEC("kretprobe/policePacket")
int BPF_KRETPROBE(policePacket_exit_kprobe, long colour)
{
	struct args_val a = args_take(FN_POLICE);

	police_exit((int)a.len, (int)colour);
	return 0;
}
