/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Minimal gtp5g declarations for the tracer. When gtp5g is loaded, the builder dumps its BTF into
 * vmlinux.h and defines GTP5G_OP_MODULE_BTF, and the module's own definitions are used; otherwise
 * these opaque forward declarations stand in. The programs never read gtp5g structures: they read
 * sk_buff / net_device (from vmlinux.h) and scalar arguments.
 */
#ifndef GTP5G_OP_TYPES_H
#define GTP5G_OP_TYPES_H

#ifndef GTP5G_OP_MODULE_BTF
struct gtp5g_dev;      /* gtp5g's per-device state (first arg of pdr_find_by_gtp1u) */
struct gtp5g_pktinfo;  /* outer-header info passed along the downlink path */
struct pdr;            /* packet detection rule returned by pdr_find_by_gtp1u */
#endif

/* GTP-U mandatory header (3GPP TS 29.281 5.1): flags, type, length, TEID, all big-endian. */
struct gtp5g_op_gtpu_hdr {
	__u8 flags;    /* version in the top 3 bits: 1 for GTPv1 */
	__u8 type;     /* 0xff = G-PDU */
	__be16 length;
	__be32 teid;
};

#define GTP5G_OP_UDP_HLEN 8
#define GTP5G_OP_GTPV1 1

#endif /* GTP5G_OP_TYPES_H */
