// SPDX-License-Identifier: GPL-2.0
/*
 * gtp5g-op tracer: fentry/fexit programs on the 7 functions gtp5g exports for tracing.
 *
 * Every event is ONE bpf_printk line (see README.md):
 *   <hook>: PID=<tid>, TGID=<pid>, CPU=<cpu>, LEN=<skb len>, DEV=<ifname|->[, TEID=0x<teid>][, RET=<ret>]
 * PID is the kernel task (thread) id, TGID the process id of the task running the hook.
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

/* One line per event: the hook name is part of the literal format string. */
#define EMIT(hook, len, dev) do {						\
	struct who w; char ifn[IFNAMSIZ_];					\
	who_now(&w); dev_name(ifn, dev);					\
	bpf_printk(hook ": PID=%u, TGID=%u, CPU=%u, LEN=%u, DEV=%s",		\
		   w.pid, w.tgid, w.cpu, len, ifn);				\
} while (0)

#define EMIT_RET(hook, len, dev, ret) do {					\
	struct who w; char ifn[IFNAMSIZ_];					\
	who_now(&w); dev_name(ifn, dev);					\
	bpf_printk(hook ": PID=%u, TGID=%u, CPU=%u, LEN=%u, DEV=%s, RET=%d",	\
		   w.pid, w.tgid, w.cpu, len, ifn, ret);			\
} while (0)

#define EMIT_TEID(hook, len, dev, teid) do {					\
	struct who w; char ifn[IFNAMSIZ_];					\
	who_now(&w); dev_name(ifn, dev);					\
	bpf_printk(hook ": PID=%u, TGID=%u, CPU=%u, LEN=%u, DEV=%s, TEID=0x%08x", \
		   w.pid, w.tgid, w.cpu, len, ifn, teid);			\
} while (0)

#define EMIT_TEID_RET(hook, len, dev, teid, ret) do {				\
	struct who w; char ifn[IFNAMSIZ_];					\
	who_now(&w); dev_name(ifn, dev);					\
	bpf_printk(hook ": PID=%u, TGID=%u, CPU=%u, LEN=%u, DEV=%s, TEID=0x%08x, RET=%d", \
		   w.pid, w.tgid, w.cpu, len, ifn, teid, ret);			\
} while (0)

/* The return value of the traced function, whatever its argument count (kernel >= 5.17). */
static __always_inline long func_ret(void *ctx)
{
	__u64 ret = 0;

	bpf_get_func_ret(ctx, &ret);
	return (long)ret;
}

/* --- uplink: UDP encap_rcv of the N3 socket ------------------------------------------------ */

/* int gtp5g_encap_recv(struct sock *sk, struct sk_buff *skb) */
SEC("fentry/gtp5g_encap_recv")
int BPF_PROG(gtp5g_encap_recv_entry, struct sock *sk, struct sk_buff *skb)
{
	__u32 teid;

	if (gtpu_teid(skb, &teid) == 0)
		EMIT_TEID("fentry/gtp5g_encap_recv", skb_len(skb), skb_dev(skb), teid);
	else
		EMIT("fentry/gtp5g_encap_recv", skb_len(skb), skb_dev(skb));
	return 0;
}

/* RET: 0 consumed, < 0 error, > 0 passed up to the UDP socket. The skb may be freed: no LEN/DEV. */
SEC("fexit/gtp5g_encap_recv")
int BPF_PROG(gtp5g_encap_recv_exit, struct sock *sk, struct sk_buff *skb)
{
	EMIT_RET("fexit/gtp5g_encap_recv", 0, (struct net_device *)NULL, (int)func_ret(ctx));
	return 0;
}

/* struct pdr *pdr_find_by_gtp1u(struct gtp5g_dev *gtp, struct sk_buff *skb,
 *                               unsigned int hdrlen, u32 teid, u8 type)  (teid in network order) */
SEC("fentry/pdr_find_by_gtp1u")
int BPF_PROG(pdr_find_by_gtp1u_entry, struct gtp5g_dev *gtp, struct sk_buff *skb,
	     unsigned int hdrlen, __u32 teid)
{
	EMIT_TEID("fentry/pdr_find_by_gtp1u", skb_len(skb), skb_dev(skb), bpf_ntohl(teid));
	return 0;
}

/* RET: 1 a PDR matched, 0 none. */
SEC("fexit/pdr_find_by_gtp1u")
int BPF_PROG(pdr_find_by_gtp1u_exit, struct gtp5g_dev *gtp, struct sk_buff *skb,
	     unsigned int hdrlen, __u32 teid)
{
	EMIT_TEID_RET("fexit/pdr_find_by_gtp1u", skb_len(skb), skb_dev(skb), bpf_ntohl(teid),
		      func_ret(ctx) != 0);
	return 0;
}

/* --- downlink: packet from the upfgtp device ----------------------------------------------- */

/* int gtp5g_handle_skb_ipv4(struct sk_buff *skb, struct net_device *dev,
 *                           struct gtp5g_pktinfo *pktinfo) */
SEC("fentry/gtp5g_handle_skb_ipv4")
int BPF_PROG(gtp5g_handle_skb_ipv4_entry, struct sk_buff *skb, struct net_device *dev)
{
	EMIT("fentry/gtp5g_handle_skb_ipv4", skb_len(skb), dev ? dev : skb_dev(skb));
	return 0;
}

/* RET: gtp5g's PKT_* code (0 sent, 1 passed to the UPF, -1 dropped) or -errno. */
SEC("fexit/gtp5g_handle_skb_ipv4")
int BPF_PROG(gtp5g_handle_skb_ipv4_exit, struct sk_buff *skb, struct net_device *dev)
{
	EMIT_RET("fexit/gtp5g_handle_skb_ipv4", 0, dev, (int)func_ret(ctx));
	return 0;
}

/* struct rtable *ip4_find_route(struct sk_buff *skb, struct iphdr *iph, struct sock *sk,
 *                               struct net_device *gtp_dev, __be32 saddr, __be32 daddr,
 *                               struct flowi4 *fl4) */
SEC("fentry/ip4_find_route")
int BPF_PROG(ip4_find_route_entry, struct sk_buff *skb, struct iphdr *iph, struct sock *sk,
	     struct net_device *gtp_dev)
{
	EMIT("fentry/ip4_find_route", skb_len(skb), gtp_dev ? gtp_dev : skb_dev(skb));
	return 0;
}

/* RET: 1 a route was found, 0 none (an ERR_PTR counts as none). */
SEC("fexit/ip4_find_route")
int BPF_PROG(ip4_find_route_exit, struct sk_buff *skb, struct iphdr *iph, struct sock *sk,
	     struct net_device *gtp_dev)
{
	long rt = func_ret(ctx);

	EMIT_RET("fexit/ip4_find_route", skb_len(skb), gtp_dev ? gtp_dev : skb_dev(skb),
		 rt != 0 && (unsigned long)rt < (unsigned long)-4095L);
	return 0;
}

/* void gtp5g_push_header(struct sk_buff *skb, struct gtp5g_pktinfo *pktinfo) */
SEC("fentry/gtp5g_push_header")
int BPF_PROG(gtp5g_push_header_entry, struct sk_buff *skb)
{
	EMIT("fentry/gtp5g_push_header", skb_len(skb), skb_dev(skb));
	return 0;
}

/* void gtp5g_xmit_skb_ipv4(struct sk_buff *skb, struct gtp5g_pktinfo *pktinfo) */
SEC("fentry/gtp5g_xmit_skb_ipv4")
int BPF_PROG(gtp5g_xmit_skb_ipv4_entry, struct sk_buff *skb)
{
	EMIT("fentry/gtp5g_xmit_skb_ipv4", skb_len(skb), skb_dev(skb));
	return 0;
}

/* --- QoS: trTCM policing where a QER has an MBR ------------------------------------------- */

/* Color policePacket(TrafficPolicer *p, int pktLen)  (v0.9.0 and later; no skb: DEV=-) */
SEC("fentry/policePacket")
int BPF_PROG(policePacket_entry, void *policer, int pkt_len)
{
	EMIT("fentry/policePacket", (__u32)pkt_len, (struct net_device *)NULL);
	return 0;
}

/* RET: the colour, 0 green, 1 yellow, 2 red. */
SEC("fexit/policePacket")
int BPF_PROG(policePacket_exit, void *policer, int pkt_len)
{
	EMIT_RET("fexit/policePacket", (__u32)pkt_len, (struct net_device *)NULL,
		 (int)func_ret(ctx));
	return 0;
}
