#!/usr/bin/env python3
"""Write fixtures/traces/noisy-mixed.trace: every awkward thing a trace_pipe reader meets, one per line.

Comments, blank lines, garbage, NUL and invalid UTF-8, LOST markers, CRLF, comms with spaces, dashes,
brackets and ``pid=``, a 15-byte comm with a 7-digit pid, older event prefixes, an empty message, an
8-digit pid, a missing colon, and a last line without its newline. Its expected result
(noisy-mixed.expected.json) was checked by hand, line by line.

usage: make_noisy_trace.py [OUT]
"""

import sys

LINES = [
    b"# a capture with everything a reader meets",
    b"",
    b"   ",
    b"hello world",
    b"\x00\x01\x02 binary garbage \xff\xfe",
    b"CPU:3 [LOST 1234 EVENTS]",
    b"CPU:0 [LOST 7 EVENTS]",
    b"          nr-gnb-2001    [000] ..s21   100.000001: bpf_trace_printk: fentry/gtp5g_encap_recv: PID=2001, "
    b"TGID=2000, CPU=0, LEN=108, DEV=n3, TEID=0x00000001",
    b"          nr-gnb-2001    [000] ..s21   100.000002: bpf_trace_printk: fexit/gtp5g_encap_recv: PID=2001, "
    b"TGID=2000, CPU=0, LEN=108, DEV=n3, RET=1\r",
    b"       a b-c [1]-42      [003] d..31   100.000003: bpf_trace_printk: stop: pid=42 (a b-c [1])",
    b"     pid=1 pid=2-99      [000] d..31   100.000004: bpf_trace_printk: enqueue: pid=2003 (nr-ue)",
    b"Chrome_IOThread-1234567 [001] ..s21   100.000005: bpf_trace_printk: fentry/gtp5g_handle_skb_ipv4: DEV=upfgtp",
    b"nr-gnb-timer-XY-1234568 [001] ..s21   100.000006: bpf_trace_printk: fentry/gtp5g_handle_skb_ipv4: DEV=upfgtp",
    b"           <...>-1234    [000] d...   100.000007: 0x00000001: stop: pid=2004 (nr-ue)",
    b"           nr-ue-2005    [001] d...   100.000008: <...>: 0x00000001: fentry/gtp5g_encap_recv: DEV=n3",
    b"           nr-ue-2006    [001] ....   100.000009: bpf_trace_printk: ",
    b"          nr-gnb-99999999 [000] ..s21 100.000010: bpf_trace_printk: fentry/gtp5g_encap_recv: DEV=n3",
    b"          <idle>-0       [000] d.h51   100.000011: bpf_trace_printk: stop: pid=99999999 (nr-gnb)",
    b"          nr-gnb-2001    [000] ..s21   100.000012 bpf_trace_printk: missing colon after the timestamp",
    b"  \xc3\xa9t\xc3\xa9-\xff\xfe-2007 [002] ..s21   100.000013: bpf_trace_printk: stop: pid=2007 "
    b"(\xc3\xa9t\xc3\xa9-\xff\xfe)",
    b"          nr-gnb-2001    [000] ..s21   100.000014: bpf_trace_printk: stop: pid=2008 (nr-gnb)",
    b"          nr-gnb-2009    [000] ..s21 100.000015: bpf_trace_printk: fentry/gtp5g_encap_recv: DEV=n3",
]
LAST = b"          nr-gnb-2010    [000] ..s21   100.000016: bpf_trace_printk: stop: pid=2010 (nr-gnb)"

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "fixtures/traces/noisy-mixed.trace"
    with open(out, "wb") as fh:
        fh.write(b"\n".join(LINES) + b"\n" + LAST)
