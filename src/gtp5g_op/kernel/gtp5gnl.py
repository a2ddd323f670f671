"""gtp5g's two netlink interfaces, through pyroute2: the rtnetlink link of kind ``gtp5g`` and the
generic-netlink family ``gtp5g`` that installs PDR, FAR and QER rules.

pyroute2 knows the kernel's own ``gtp`` link but not gtp5g, so the attribute layouts are declared here
with pyroute2's ``nla`` / ``genlmsg`` classes. The numbers come from gtp5g's ``include/link.h`` and
``include/genl*.h``; they are the same in v0.8.0 and v0.10.2 (both read), except that v0.8.0's PDI has
no ``GTP5G_PDI_SRC_INTF`` (4): the kernel's strict nested parsing then answers EINVAL, so
:meth:`Gtp5gGenl.add_pdr` retries without it (the PDR then has no direction, which v0.8.0 ignores).

Value encodings follow the kernel side: TEIDs and ports are host-order u32/u16 (gtp5g applies
htonl/htons), IPv4 addresses are network-order (``nla_get_be32``). Nested attributes carry
NLA_F_NESTED: gtp5g parses them with the kernel's ``nla_parse_nested``, which refuses a nest without
it (EINVAL), and for a QER's MBR silently ignores the refusal (measured in the VM lab).
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink import NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST, genlmsg, nla
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from gtp5g_op.errors import EnvironmentProblem, OpError

log = logging.getLogger(__name__)

KIND = "gtp5g"
FAMILY = "gtp5g"
GTPU_PORT = 2152

# include/genl.h: enum gtp5g_cmd
CMD_ADD_PDR, CMD_ADD_FAR, CMD_ADD_QER = 1, 2, 3
CMD_DEL_PDR, CMD_DEL_FAR, CMD_DEL_QER = 4, 5, 6
# include/link.h: enum ifla_gtp5g_role
ROLE_UPF, ROLE_RAN = 0, 1
# include/pdr.h: PDI source interface
SRC_INTF_ACCESS, SRC_INTF_CORE = 0, 1
# include/far.h: apply action bits
FAR_ACTION_DROP, FAR_ACTION_FORW = 0x01, 0x02
OUTER_HEADER_CREATION_GTPU_UDP_IPV4 = 0x0100  # TS 29.244 8.2.56, octet 5 bit 1
PDI_SRC_INTF = 4


class gtp5g_link_data(nla):
    """IFLA_INFO_DATA of a gtp5g link (include/link.h), numbered from 0 in this order.

    Two-element entries: pyroute2's link request maps keyword arguments (``gtp5g_fd1=``) through them.
    """

    nla_map = (
        ("IFLA_GTP5G_UNSPEC", "none"),
        ("IFLA_GTP5G_FD1", "uint32"),
        ("IFLA_GTP5G_PDR_HASHSIZE", "uint32"),
        ("IFLA_GTP5G_ROLE", "uint32"),
    )


# pyroute2 picks the IFLA_INFO_DATA layout by kind; register gtp5g's (its documented plugin hook).
ifinfmsg.ifinfo.register_link_kind(module={KIND: gtp5g_link_data})

# Attributes 1 and 2 of every gtp5g command (include/genl.h: enum gtp5g_device_attrs).
_DEVICE_ATTRS = ((0, "GTP5G_UNSPEC", "none"), (1, "GTP5G_LINK", "uint32"), (2, "GTP5G_NET_NS_FD", "uint32"))


class pdrmsg(genlmsg):
    """GTP5G_CMD_ADD_PDR / DEL_PDR (include/genl_pdr.h)."""

    nla_map = _DEVICE_ATTRS + (
        (3, "GTP5G_PDR_ID", "uint32"),
        (4, "GTP5G_PDR_PRECEDENCE", "uint32"),
        (5, "GTP5G_PDR_PDI", "pdi"),
        (6, "GTP5G_OUTER_HEADER_REMOVAL", "uint8"),
        (7, "GTP5G_PDR_FAR_ID", "uint32"),
        (8, "GTP5G_PDR_ROLE_ADDR_IPV4", "ip4addr"),
        (9, "GTP5G_PDR_UNIX_SOCKET_PATH", "asciiz"),
        (10, "GTP5G_PDR_QER_ID", "uint32"),
        (11, "GTP5G_PDR_SEID", "uint64"),
        (12, "GTP5G_PDR_URR_ID", "uint32"),
    )

    class pdi(nla):
        nla_flags = NLA_F_NESTED
        nla_map = (
            (0, "GTP5G_PDI_UNSPEC", "none"),
            (1, "GTP5G_PDI_UE_ADDR_IPV4", "ip4addr"),
            (2, "GTP5G_PDI_F_TEID", "f_teid"),
            (3, "GTP5G_PDI_SDF_FILTER", "hex"),
            (4, "GTP5G_PDI_SRC_INTF", "uint8"),  # v0.9+; absent from v0.8.0
        )

        class f_teid(nla):
            nla_flags = NLA_F_NESTED
            nla_map = (
                (0, "GTP5G_F_TEID_UNSPEC", "none"),
                (1, "GTP5G_F_TEID_I_TEID", "uint32"),
                (2, "GTP5G_F_TEID_GTPU_ADDR_IPV4", "ip4addr"),
            )


class farmsg(genlmsg):
    """GTP5G_CMD_ADD_FAR / DEL_FAR (include/genl_far.h)."""

    nla_map = _DEVICE_ATTRS + (
        (3, "GTP5G_FAR_ID", "uint32"),
        (4, "GTP5G_FAR_APPLY_ACTION", "uint8"),
        (5, "GTP5G_FAR_FORWARDING_PARAMETER", "fwd_param"),
        (6, "GTP5G_FAR_RELATED_TO_PDR", "hex"),
        (7, "GTP5G_FAR_SEID", "uint64"),
        (8, "GTP5G_FAR_BAR_ID", "uint8"),
    )

    class fwd_param(nla):
        nla_flags = NLA_F_NESTED
        nla_map = (
            (0, "GTP5G_FORWARDING_PARAMETER_UNSPEC", "none"),
            (1, "GTP5G_FORWARDING_PARAMETER_OUTER_HEADER_CREATION", "hdr_creation"),
            (2, "GTP5G_FORWARDING_PARAMETER_FORWARDING_POLICY", "asciiz"),
            (3, "GTP5G_FORWARDING_PARAMETER_PFCPSM_REQ_FLAGS", "uint8"),
        )

        class hdr_creation(nla):
            nla_flags = NLA_F_NESTED
            nla_map = (
                (0, "GTP5G_OUTER_HEADER_CREATION_UNSPEC", "none"),
                (1, "GTP5G_OUTER_HEADER_CREATION_DESCRIPTION", "uint16"),
                (2, "GTP5G_OUTER_HEADER_CREATION_O_TEID", "uint32"),
                (3, "GTP5G_OUTER_HEADER_CREATION_PEER_ADDR_IPV4", "ip4addr"),
                (4, "GTP5G_OUTER_HEADER_CREATION_PORT", "uint16"),
            )


class qermsg(genlmsg):
    """GTP5G_CMD_ADD_QER / DEL_QER (include/genl_qer.h)."""

    nla_map = _DEVICE_ATTRS + (
        (3, "GTP5G_QER_ID", "uint32"),
        (4, "GTP5G_QER_GATE", "uint8"),
        (5, "GTP5G_QER_MBR", "bitrate"),
        (6, "GTP5G_QER_GBR", "bitrate"),
        (7, "GTP5G_QER_CORR_ID", "uint32"),
        (8, "GTP5G_QER_RQI", "uint8"),
        (9, "GTP5G_QER_QFI", "uint8"),
        (10, "GTP5G_QER_PPI", "uint8"),
        (11, "GTP5G_QER_RCSR", "uint8"),
        (12, "GTP5G_QER_RELATED_TO_PDR", "hex"),
        (13, "GTP5G_QER_SEID", "uint64"),
    )

    class bitrate(nla):  # the same layout for MBR and GBR
        nla_flags = NLA_F_NESTED
        nla_map = (
            (0, "GTP5G_QER_BR_UNSPEC", "none"),
            (1, "GTP5G_QER_BR_UL_HIGH32", "uint32"),
            (2, "GTP5G_QER_BR_UL_LOW8", "uint8"),
            (3, "GTP5G_QER_BR_DL_HIGH32", "uint32"),
            (4, "GTP5G_QER_BR_DL_LOW8", "uint8"),
        )


def _bitrate(kbps: int) -> dict:
    """gtp5g's 40-bit bit rate (kbit/s) split as high 32 bits and low 8 bits, both directions."""
    high, low = kbps >> 8, kbps & 0xFF
    return {"attrs": [("GTP5G_QER_BR_UL_HIGH32", high), ("GTP5G_QER_BR_UL_LOW8", low),
                      ("GTP5G_QER_BR_DL_HIGH32", high), ("GTP5G_QER_BR_DL_LOW8", low)]}


def module_loaded(sys_root: Path = Path("/sys")) -> bool:
    return (sys_root / "module" / "gtp5g").is_dir()


def module_version(sys_root: Path = Path("/sys")) -> str | None:
    """MODULE_VERSION of the loaded gtp5g (e.g. ``0.10.2``), None when not loaded or unknown."""
    try:
        return (sys_root / "module" / "gtp5g" / "version").read_text().strip() or None
    except OSError:
        return None


def create_link(ipr: IPRoute, name: str, fd: int, hashsize: int = 1024, role: int = ROLE_UPF) -> int:
    """RTM_NEWLINK of kind gtp5g bound to the UDP socket ``fd``; returns the new device's index.

    The device holds the socket: it lives until the link is deleted (or its netns goes away).
    """
    try:
        ipr.link("add", ifname=name, kind=KIND, gtp5g_fd1=fd, gtp5g_pdr_hashsize=hashsize, gtp5g_role=role)
    except NetlinkError as exc:
        if exc.code == errno.EOPNOTSUPP:
            raise EnvironmentProblem("the kernel knows no link kind gtp5g (module not loaded)",
                                     fix="modprobe gtp5g") from exc
        raise OpError(f"creating gtp5g device {name} failed: {os.strerror(exc.code)}",
                      fix="see dmesg for gtp5g's reason") from exc
    links = ipr.link_lookup(ifname=name)
    if not links:
        raise OpError(f"gtp5g device {name} was not created", fix="see dmesg for gtp5g's reason")
    return links[0]


class Gtp5gRefused(OpError):
    """gtp5g's generic netlink family refused a request; ``code`` is the errno, ``said`` the kernel's words."""

    def __init__(self, what: str, code: int, said: str):
        self.code, self.said = code, said
        if code == errno.EINVAL and "policy validation" in said:
            # Linux 6.1 rejects every attribute of a generic netlink command that has no policy and is
            # not below the family's resv_start_op; gtp5g releases before v0.9 set neither.
            super().__init__(
                f"{what}: the kernel refused every attribute ({said}): this gtp5g registers its commands "
                "without a netlink policy, which Linux 6.1+ rejects, so no PDR/FAR/QER can be installed "
                "(a UPF cannot configure it either)", fix="use gtp5g v0.9 or newer on this kernel")
        else:
            super().__init__(f"{what}: {os.strerror(code)}" + (f" ({said})" if said and said != os.strerror(code)
                                                                else ""),
                             fix="see dmesg for gtp5g's reason")


@dataclass(frozen=True)
class Rule:
    """What was installed, for the report."""

    kind: str  # PDR, FAR, QER
    id: int
    detail: str


class Gtp5gGenl:
    """gtp5g's generic netlink family in the calling thread's network namespace."""

    def __init__(self) -> None:
        self._socks: dict[type, GenericNetlinkSocket] = {}

    def _sock(self, cls: type) -> GenericNetlinkSocket:
        # pyroute2 maps one message class per socket and family: one socket per rule kind.
        if cls not in self._socks:
            sock = GenericNetlinkSocket(ext_ack=True)  # the kernel then says why it refused
            try:
                sock.bind(FAMILY, cls)
            except NetlinkError as exc:
                sock.close()
                raise EnvironmentProblem(
                    f"gtp5g's generic netlink family is not registered ({os.strerror(exc.code)})",
                    fix="modprobe gtp5g") from exc
            self._socks[cls] = sock
        return self._socks[cls]

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()

    def __enter__(self) -> Gtp5gGenl:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, cls: type, cmd: int, attrs: list) -> None:
        sock = self._sock(cls)
        msg = cls()
        msg["cmd"] = cmd
        msg["version"] = 0
        msg["attrs"] = attrs
        try:
            tuple(sock.nlm_request(msg, msg_type=sock.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK))
        except NetlinkError as exc:
            what = {CMD_ADD_PDR: "adding a PDR", CMD_ADD_FAR: "adding a FAR", CMD_ADD_QER: "adding a QER"}.get(
                cmd, f"gtp5g command {cmd}")
            said = str(exc.args[1]) if len(exc.args) > 1 else ""
            raise Gtp5gRefused(what, exc.code, said) from exc

    def add_qer(self, ifindex: int, qer_id: int, mbr_kbps: int, qfi: int = 9) -> Rule:
        """A QER with an open gate and an MBR both ways (so policePacket runs when QoS is on)."""
        self._request(qermsg, CMD_ADD_QER, [
            ("GTP5G_LINK", ifindex), ("GTP5G_QER_ID", qer_id), ("GTP5G_QER_GATE", 0),
            ("GTP5G_QER_MBR", _bitrate(mbr_kbps)), ("GTP5G_QER_QFI", qfi),
        ])
        return Rule("QER", qer_id, f"gate open, MBR {mbr_kbps} kbit/s, QFI {qfi}")

    def add_far(self, ifindex: int, far_id: int, peer: str | None = None, teid: int = 0,
                port: int = GTPU_PORT) -> Rule:
        """A forwarding FAR; with ``peer``, outer header creation GTP-U/UDP/IPv4 to peer:port, TEID."""
        attrs: list = [("GTP5G_LINK", ifindex), ("GTP5G_FAR_ID", far_id),
                       ("GTP5G_FAR_APPLY_ACTION", FAR_ACTION_FORW)]
        detail = "forward (decapsulated)"
        if peer is not None:
            attrs.append(("GTP5G_FAR_FORWARDING_PARAMETER", {"attrs": [
                ("GTP5G_FORWARDING_PARAMETER_OUTER_HEADER_CREATION", {"attrs": [
                    ("GTP5G_OUTER_HEADER_CREATION_DESCRIPTION", OUTER_HEADER_CREATION_GTPU_UDP_IPV4),
                    ("GTP5G_OUTER_HEADER_CREATION_O_TEID", teid),
                    ("GTP5G_OUTER_HEADER_CREATION_PEER_ADDR_IPV4", peer),
                    ("GTP5G_OUTER_HEADER_CREATION_PORT", port),
                ]}),
            ]}))
            detail = f"forward, GTP-U to {peer}:{port} TEID 0x{teid:08x}"
        self._request(farmsg, CMD_ADD_FAR, attrs)
        return Rule("FAR", far_id, detail)

    def add_pdr(self, ifindex: int, pdr_id: int, far_id: int, *, precedence: int = 255,
                ue_addr: str | None = None, teid: int | None = None, gtpu_addr: str | None = None,
                src_intf: int | None = None, qer_id: int | None = None,
                outer_header_removal: int | None = None) -> Rule:
        """A PDR matching the UE address (downlink) or the local F-TEID (uplink)."""
        pdi: list = []
        if ue_addr is not None:
            pdi.append(("GTP5G_PDI_UE_ADDR_IPV4", ue_addr))
        if teid is not None:
            pdi.append(("GTP5G_PDI_F_TEID", {"attrs": [("GTP5G_F_TEID_I_TEID", teid),
                                                       ("GTP5G_F_TEID_GTPU_ADDR_IPV4", gtpu_addr)]}))
        attrs: list = [("GTP5G_LINK", ifindex), ("GTP5G_PDR_ID", pdr_id), ("GTP5G_PDR_PRECEDENCE", precedence),
                       ("GTP5G_PDR_FAR_ID", far_id)]
        if outer_header_removal is not None:
            attrs.append(("GTP5G_OUTER_HEADER_REMOVAL", outer_header_removal))
        if qer_id is not None:
            attrs.append(("GTP5G_PDR_QER_ID", qer_id))
        match = f"UE {ue_addr}" if ue_addr else f"TEID 0x{teid or 0:08x} at {gtpu_addr}"
        detail = f"{match} -> FAR {far_id}" + (f", QER {qer_id}" if qer_id is not None else "")

        def send(with_intf: bool) -> None:
            nested = pdi + ([("GTP5G_PDI_SRC_INTF", src_intf)] if with_intf else [])
            self._request(pdrmsg, CMD_ADD_PDR, attrs + [("GTP5G_PDR_PDI", {"attrs": nested})])

        if src_intf is None:
            send(False)
            return Rule("PDR", pdr_id, detail)
        try:
            send(True)
        except Gtp5gRefused as exc:
            if exc.code != errno.EINVAL or "policy validation" in exc.said:
                raise
            log.info("gtp5g refused GTP5G_PDI_SRC_INTF (a release before v0.9): PDR %d without it", pdr_id)
            send(False)
            return Rule("PDR", pdr_id, detail + " (no source interface: this gtp5g has none)")
        return Rule("PDR", pdr_id, detail + (", from core" if src_intf == SRC_INTF_CORE else ", from access"))
