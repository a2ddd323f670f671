/*
 * C twin of gtp5g_op.trace.rawbuf.decode_py: ring-buffer pages read from trace_pipe_raw -> the
 * trace_pipe text lines of their bpf_trace_printk records.
 *
 * Why hand-written C: the point of reading the raw pages is a watch that costs at most 5 % of a core at
 * 50 000 lines/s; the pure-Python decoder spends several microseconds per record (more than the kernel
 * spends formatting text). The rules, the layout and the counts are those of decode_py (the reference);
 * tests/test_rawbuf.py requires identical output for generated and arbitrary pages. Every offset and
 * type number comes from the caller (read from tracefs at run time); every length is bounded by the
 * page, so garbage pages end in the "bad" count, never outside the buffer.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MISSED_EVENTS (1ULL << 31)
#define MISSED_STORED (1ULL << 30)
#define SIZE_MASK (MISSED_STORED - 1)
#define TS_MSB (0xf8ULL << 56)
enum { DATA_LOC = 0, REL_LOC = 1, FIXED = 2 };

typedef struct {
    Py_ssize_t page_size, ts_offset, commit_offset, commit_size, data_offset;
    long padding, time_extend, time_stamp, max_data, event_id;
    Py_ssize_t type_offset, pid_offset, msg_offset, msg_size;
    int msg_kind, big_endian;
} fmt_t;

typedef struct {
    char *buf;
    Py_ssize_t len, cap;
} out_t;

static int reserve(out_t *o, Py_ssize_t more) {
    if (o->len + more <= o->cap) return 0;
    Py_ssize_t cap = o->cap ? o->cap : 4096;
    while (cap < o->len + more) cap *= 2;
    char *b = PyMem_Realloc(o->buf, cap);
    if (!b) { PyErr_NoMemory(); return -1; }
    o->buf = b;
    o->cap = cap;
    return 0;
}

static uint64_t rd(const unsigned char *p, int n, int be) {
    uint64_t v = 0;
    if (be) for (int i = 0; i < n; i++) v = v << 8 | p[i];
    else for (int i = n - 1; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

/* Decimal digits of v at p (no terminator); returns the count. */
static int put_u64(char *p, uint64_t v) {
    char tmp[20];
    int n = 0;
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    for (int i = 0; i < n; i++) p[i] = tmp[n - 1 - i];
    return n;
}

static int put_i64(char *p, int64_t v) {
    if (v < 0) { p[0] = '-'; return 1 + put_u64(p + 1, (uint64_t)0 - (uint64_t)v); }
    return put_u64(p, (uint64_t)v);
}

/* At least `width` digits, zero-padded (the kernel's %03d and %06lu). */
static int put_padded(char *p, uint64_t v, int width) {
    char tmp[20];
    int n = put_u64(tmp, v), k = 0;
    for (; k < width - n; k++) p[k] = '0';
    memcpy(p + k, tmp, n);
    return k + n;
}

static int lost_line(out_t *o, long cpu, uint64_t count) {
    if (reserve(o, 64) < 0) return -1;
    char *p = o->buf + o->len;
    memcpy(p, "CPU:", 4); p += 4;
    p += put_u64(p, (uint64_t)cpu);
    memcpy(p, " [LOST ", 7); p += 7;
    p += put_u64(p, count);
    memcpy(p, " EVENTS]\n", 9); p += 9;
    o->len = p - o->buf;
    return 0;
}

static int render(out_t *o, long cpu, int32_t pid, uint64_t ts, const unsigned char *msg, Py_ssize_t n) {
    if (reserve(o, 96 + n) < 0) return -1;
    char *p = o->buf + o->len;
    if (pid == 0) { memcpy(p, "<idle>-", 7); p += 7; }
    else { memcpy(p, "<...>-", 6); p += 6; }
    p += put_i64(p, pid);
    memcpy(p, " [", 2); p += 2;
    p += put_padded(p, (uint64_t)cpu, 3);
    *p++ = ']';
    *p++ = ' ';
    uint64_t us = (ts + 500) / 1000;
    p += put_u64(p, us / 1000000);
    *p++ = '.';
    p += put_padded(p, us % 1000000, 6);
    memcpy(p, ": bpf_trace_printk: ", 20); p += 20;
    memcpy(p, msg, n); p += n;
    *p++ = '\n';
    o->len = p - o->buf;
    return 0;
}

/* counts: pages, events, lost, lost_unknown, other, bad */
static int record(const fmt_t *f, const unsigned char *r, Py_ssize_t len, long cpu, uint64_t ts, out_t *o,
                  unsigned long long *c) {
    Py_ssize_t need = f->type_offset + 2;
    if (f->pid_offset + 4 > need) need = f->pid_offset + 4;
    Py_ssize_t m = f->msg_offset + (f->msg_kind != FIXED ? 4 : 0);
    if (m > need) need = m;
    if (len < need) { c[5]++; return 0; }
    if ((long)rd(r + f->type_offset, 2, f->big_endian) != f->event_id) { c[4]++; return 0; }
    int32_t pid = (int32_t)(uint32_t)rd(r + f->pid_offset, 4, f->big_endian);
    Py_ssize_t off, n;
    if (f->msg_kind == FIXED) {
        off = f->msg_offset;
        n = f->msg_size;
    } else {
        uint32_t loc = (uint32_t)rd(r + f->msg_offset, 4, f->big_endian);
        off = loc & 0xffff;
        n = loc >> 16;
        if (f->msg_kind == REL_LOC) off += f->msg_offset + 4;
    }
    if (off >= len) n = 0;
    else if (n > len - off) n = len - off;
    const unsigned char *msg = n ? r + off : r;
    const unsigned char *nul = n ? memchr(msg, 0, n) : NULL;
    if (nul) n = nul - msg;
    c[1]++;
    return render(o, cpu, pid, ts, msg, n);
}

static int page(const fmt_t *f, const unsigned char *pg, Py_ssize_t len, long cpu, out_t *o,
                unsigned long long *c) {
    if (len < f->data_offset) { c[5]++; return 0; }
    uint64_t ts = rd(pg + f->ts_offset, 8, f->big_endian);
    uint64_t commit = rd(pg + f->commit_offset, (int)f->commit_size, f->big_endian);
    uint64_t size = commit & SIZE_MASK;
    uint64_t room = (uint64_t)(len - f->data_offset);
    if (size > room) { c[5]++; return 0; }
    const unsigned char *d = pg + f->data_offset;
    if (commit & MISSED_EVENTS) {
        if ((commit & MISSED_STORED) && size + (uint64_t)f->commit_size <= room) {
            uint64_t lost = rd(d + size, (int)f->commit_size, f->big_endian);
            c[2] += lost;
            if (lost_line(o, cpu, lost) < 0) return -1;
        } else {
            c[3]++;
        }
    }
    uint64_t pos = 0;
    while (pos + 4 <= size) {
        uint32_t head = (uint32_t)rd(d + pos, 4, f->big_endian);
        long type_len;
        uint32_t delta;
        if (f->big_endian) { type_len = head >> 27; delta = head & 0x7ffffff; }
        else { type_len = head & 31; delta = head >> 5; }
        if (type_len == f->padding && delta == 0) return 0;
        uint64_t array0 = 0;
        if (type_len == f->padding || type_len == f->time_extend || type_len == f->time_stamp || type_len == 0) {
            if (pos + 8 > size) { c[5]++; return 0; }
            array0 = rd(d + pos + 4, 4, f->big_endian);
        }
        if (type_len == f->padding) {
            pos += 4 + array0;
            if (pos > size) c[5]++;
            continue;
        }
        if (type_len == f->time_extend) {
            ts += delta | array0 << 27;
            pos += 8;
            continue;
        }
        if (type_len == f->time_stamp) {
            uint64_t abs = delta | array0 << 27;
            if (ts & TS_MSB) {
                abs |= ts & TS_MSB;
                if (abs < ts) abs += 1ULL << 59;
            }
            ts = abs;
            pos += 8;
            continue;
        }
        const unsigned char *r;
        uint64_t rlen;
        if (type_len == 0) {
            if (array0 < 4 || pos + 4 + array0 > size) { c[5]++; return 0; }
            r = d + pos + 8;
            rlen = array0 - 4;
            pos += 4 + array0;
        } else if (type_len <= f->max_data) {
            rlen = 4 * (uint64_t)type_len;
            if (pos + 4 + rlen > size) { c[5]++; return 0; }
            r = d + pos + 4;
            pos += 4 + rlen;
        } else {
            c[5]++;
            return 0;
        }
        ts += delta;
        if (record(f, r, (Py_ssize_t)rlen, cpu, ts, o, c) < 0) return -1;
    }
    return 0;
}

static int in_page(Py_ssize_t off, Py_ssize_t size, Py_ssize_t page_size) {
    return off >= 0 && size > 0 && off + size <= page_size;
}

static PyObject *decode(PyObject *self, PyObject *args) {
    Py_buffer view;
    PyObject *params;
    long cpu;
    fmt_t f;
    if (!PyArg_ParseTuple(args, "y*O!l", &view, &PyTuple_Type, &params, &cpu)) return NULL;
    if (!PyArg_ParseTuple(params, "nnnnnlllllnnnnii;format: 16 integers", &f.page_size, &f.ts_offset,
                          &f.commit_offset, &f.commit_size, &f.data_offset, &f.padding, &f.time_extend,
                          &f.time_stamp, &f.max_data, &f.event_id, &f.type_offset, &f.pid_offset,
                          &f.msg_offset, &f.msg_size, &f.msg_kind, &f.big_endian)) {
        PyBuffer_Release(&view);
        return NULL;
    }
    if (!(f.commit_size == 4 || f.commit_size == 8) || f.data_offset < 0 || f.data_offset >= f.page_size ||
        !in_page(f.ts_offset, 8, f.data_offset) || !in_page(f.commit_offset, f.commit_size, f.data_offset) ||
        f.type_offset < 0 || f.pid_offset < 0 || f.msg_offset < 0 || f.msg_size < 0 ||
        f.msg_kind < DATA_LOC || f.msg_kind > FIXED || cpu < 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "bad ring-buffer format");
        return NULL;
    }
    unsigned long long c[6] = {0, 0, 0, 0, 0, 0};
    out_t o = {NULL, 0, 0};
    PyObject *result = NULL;
    const unsigned char *b = view.buf;
    for (Py_ssize_t start = 0; start < view.len; start += f.page_size) {
        Py_ssize_t n = view.len - start < f.page_size ? view.len - start : f.page_size;
        c[0]++;
        if (page(&f, b + start, n, cpu, &o, c) < 0) goto done;
    }
    result = Py_BuildValue("y#(KKKKKK)", o.buf ? o.buf : "", o.len, c[0], c[1], c[2], c[3], c[4], c[5]);
done:
    PyMem_Free(o.buf);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS,
     "decode(pages, format, cpu) -> (text, (pages, events, lost, lost_unknown, other, bad))"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rawbuf", "C decoder of tracefs ring-buffer pages.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__rawbuf(void) { return PyModule_Create(&module); }
