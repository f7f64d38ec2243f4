/* mell.gateway.journal._frame: the journal writer's hot path in C (optional: each part has a
 * pure-Python twin that writes the same bytes, used when this module was not built).
 *
 * append_record(buf, kind, seq, payload, timestamp=None) -> int
 *     Frames one record exactly as format.append_record_py does (see format.py for the layout:
 *     record header <4s I I = magic, body length, zlib CRC-32 of the body; body = MessagePack
 *     [kind, uint64 seq, float64 timestamp, bin32 payload]) and appends it to the bytearray buf
 *     in one step, so another thread holding the GIL never sees half a record. timestamp None
 *     means now, from the clock and with the conversion of time.time(). Returns len(buf).
 * discard_prefix(buf, n)
 *     del buf[:n], keeping buf's memory for refilling (format.discard_prefix_py).
 * Appender
 *     Base class of writer.Journal: the producer's state and append(payload) -> seq
 *     (writer.PyAppender).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#define HEADER_SIZE 12 /* magic, length, crc */
#define PREFIX_SIZE 25 /* 0x94 kind 0xCF seq(8) 0xCB ts(8) 0xC6 len(4) */

/* Whether bytearrays keep their memory between fills: append_record and discard_prefix then
 * manage the bytearray's length and capacity through its (public, non-limited) struct, keeping
 * its invariants: ob_start[size] == 0, offset + size < ob_alloc, no resize while exported.
 * bytearray's own resize frees memory whenever the length drops below half the capacity, which
 * made the writer fault fresh pages in for every buffer it filled. */
#define KEEP_CAPACITY (PY_VERSION_HEX < 0x030F0000)

#include "_crc32.h"


static inline void
store_le32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static inline void
store_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static inline void
store_be64(unsigned char *p, uint64_t v)
{
    store_be32(p, (uint32_t)(v >> 32));
    store_be32(p + 4, (uint32_t)v);
}

/* Set len(buf) to new_size (> len(buf)); grows the memory geometrically when it is short. */
static int
grow(PyObject *buf, Py_ssize_t new_size)
{
#if KEEP_CAPACITY
    PyByteArrayObject *b = (PyByteArrayObject *)buf;
    if (b->ob_exports == 0 && b->ob_bytes != NULL &&
        (b->ob_start - b->ob_bytes) + new_size < b->ob_alloc) {
        Py_SET_SIZE(b, new_size);
        b->ob_start[new_size] = '\0';
        return 0;
    }
    Py_ssize_t want = new_size <= PY_SSIZE_T_MAX / 2 ? new_size + (new_size >> 2) + 256 : new_size;
    if (PyByteArray_Resize(buf, want) < 0) { /* BufferError when exported */
        return -1;
    }
    Py_SET_SIZE(b, new_size);
    b->ob_start[new_size] = '\0';
    return 0;
#else
    return PyByteArray_Resize(buf, new_size);
#endif
}

/* time.time(): the system clock, converted to float seconds as CPython converts it. */
static int
now_seconds(double *out)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyTime_t t;
    if (PyTime_Time(&t) < 0) {
        return -1;
    }
    *out = PyTime_AsSecondsDouble(t);
#else
    *out = _PyTime_AsSecondsDouble(_PyTime_GetSystemClock());
#endif
    return 0;
}

/* Frame one record onto the end of the bytearray buf; returns len(buf) afterwards, or -1 with
 * an exception set (buf unchanged). */
static Py_ssize_t
frame_into(PyObject *buf, int kind, uint64_t seq, double ts, const Py_buffer *view)
{
    Py_ssize_t n = view->len;
    if ((uint64_t)n > (uint64_t)UINT32_MAX - PREFIX_SIZE) {
        PyErr_Format(PyExc_ValueError, "journal record: payload of %zd bytes is too long", n);
        return -1;
    }
    Py_ssize_t old = PyByteArray_GET_SIZE(buf);
    Py_ssize_t total = HEADER_SIZE + PREFIX_SIZE + n;
    if (old > PY_SSIZE_T_MAX - total) {
        PyErr_NoMemory();
        return -1;
    }
    /* Growing fails (BufferError) while buf is exported, and leaves it unchanged. The
     * payload cannot be buf itself: a bytearray exported as `view` cannot be resized. */
    if (grow(buf, old + total) < 0) {
        return -1;
    }
    unsigned char *rec = (unsigned char *)PyByteArray_AS_STRING(buf) + old;
    unsigned char *body = rec + HEADER_SIZE;
    uint64_t ts_bits;
    memcpy(&ts_bits, &ts, sizeof ts_bits);
    body[0] = 0x94;
    body[1] = (unsigned char)kind;
    body[2] = 0xCF;
    store_be64(body + 3, seq);
    body[11] = 0xCB;
    store_be64(body + 12, ts_bits);
    body[20] = 0xC6;
    store_be32(body + 21, (uint32_t)n);
    memcpy(body + PREFIX_SIZE, view->buf, (size_t)n);

    uint32_t length = (uint32_t)(PREFIX_SIZE + n);
    rec[0] = 0x89;
    rec[1] = 'M';
    rec[2] = 'J';
    rec[3] = 'R';
    store_le32(rec + 4, length);
    store_le32(rec + 8, crc32_bytes(body, length));
    return old + total;
}

static PyObject *
append_record(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs < 4 || nargs > 5) {
        PyErr_Format(PyExc_TypeError,
                     "append_record(buf, kind, seq, payload, timestamp=None) takes 4 or 5 "
                     "positional arguments (%zd given)",
                     nargs);
        return NULL;
    }
    PyObject *buf = args[0];
    if (!PyByteArray_Check(buf)) {
        PyErr_SetString(PyExc_TypeError, "append_record: buf must be a bytearray");
        return NULL;
    }
    long kind = PyLong_AsLong(args[1]);
    if (kind == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (kind < 0 || kind > 127) {
        PyErr_Format(PyExc_ValueError, "append_record: kind %ld is not in [0, 127]", kind);
        return NULL;
    }
    unsigned long long seq = PyLong_AsUnsignedLongLong(args[2]);
    if (seq == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    double ts;
    if (nargs == 5 && args[4] != Py_None) {
        ts = PyFloat_AsDouble(args[4]);
        if (ts == -1.0 && PyErr_Occurred()) {
            return NULL;
        }
    }
    else if (now_seconds(&ts) < 0) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[3], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    Py_ssize_t size = frame_into(buf, (int)kind, (uint64_t)seq, ts, &view);
    PyBuffer_Release(&view);
    return size < 0 ? NULL : PyLong_FromSsize_t(size);
}

/* Appender: the base class of writer.Journal that holds the producer's state and appends event
 * records. Its Python twin is writer.PyAppender; the Journal supplies the slow paths. */
typedef struct {
    PyObject_HEAD
    PyObject *buf;            /* _buf: the current bytearray */
    unsigned long long next_seq; /* _next_seq */
    long long seg_room;       /* _seg_room: bytes the current segment may still take */
    long long limit;          /* _limit: past this len(_buf), call _slow_path() */
} AppenderObject;

static PyObject *str_append_slow;
static PyObject *str_slow_path;

static int
Appender_init(AppenderObject *self, PyObject *args, PyObject *kwds)
{
    (void)args;
    (void)kwds;
    PyObject *buf = PyByteArray_FromStringAndSize(NULL, 0);
    if (buf == NULL) {
        return -1;
    }
    Py_XSETREF(self->buf, buf);
    self->next_seq = 1;
    self->seg_room = 0;
    self->limit = -1;
    return 0;
}

static void
Appender_dealloc(AppenderObject *self)
{
    Py_CLEAR(self->buf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Appender_append(AppenderObject *self, PyObject *payload)
{
    Py_buffer view;
    if (PyBytes_CheckExact(payload)) { /* the common case, without the buffer protocol */
        view.buf = PyBytes_AS_STRING(payload);
        view.len = PyBytes_GET_SIZE(payload);
        view.obj = NULL;
    }
    else if (PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    long long room = self->seg_room - (HEADER_SIZE + PREFIX_SIZE) - (long long)view.len;
    PyObject *buf = self->buf;
    if (room < 0 || buf == NULL || !PyByteArray_CheckExact(buf)) {
        /* The segment is full (or the state is unusual): the Journal's Python path. */
        PyBuffer_Release(&view);
        return PyObject_CallMethodOneArg((PyObject *)self, str_append_slow, payload);
    }
    double ts;
    if (now_seconds(&ts) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    unsigned long long seq = self->next_seq;
    Py_ssize_t size = frame_into(buf, 1, (uint64_t)seq, ts, &view);
    PyBuffer_Release(&view);
    if (size < 0) {
        return NULL;
    }
    self->seg_room = room;
    self->next_seq = seq + 1; /* after the record is in the buffer: the flusher relies on it */
    PyObject *result = PyLong_FromUnsignedLongLong(seq);
    if (result != NULL && size > self->limit) {
        PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self, str_slow_path);
        if (r == NULL) {
            Py_CLEAR(result);
        }
        else {
            Py_DECREF(r);
        }
    }
    return result;
}

static PyMethodDef Appender_methods[] = {
    {"append", (PyCFunction)Appender_append, METH_O,
     "append(payload) -> int\n\n"
     "Append one event record; returns its sequence number. Never waits for the disk\n"
     "under the \"interval\" and \"never\" policies (unless max_pending_bytes is exceeded)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Appender_members[] = {
    {"_buf", T_OBJECT_EX, offsetof(AppenderObject, buf), 0, "the current buffer"},
    {"_next_seq", T_ULONGLONG, offsetof(AppenderObject, next_seq), 0, "next sequence number"},
    {"_seg_room", T_LONGLONG, offsetof(AppenderObject, seg_room), 0, "room in the segment"},
    {"_limit", T_LONGLONG, offsetof(AppenderObject, limit), 0, "slow path past this size"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject AppenderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mell.gateway.journal._frame.Appender",
    .tp_doc = "Producer state and the event-append hot path; base class of writer.Journal.",
    .tp_basicsize = sizeof(AppenderObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Appender_init,
    .tp_dealloc = (destructor)Appender_dealloc,
    .tp_methods = Appender_methods,
    .tp_members = Appender_members,
};

/* discard_prefix(buf, n): delete the first n bytes of buf, keeping its memory for refilling
 * (`del buf[:n]` would give most of it back to the allocator). */
static PyObject *
discard_prefix(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2 || !PyByteArray_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "discard_prefix(buf: bytearray, n: int)");
        return NULL;
    }
    PyObject *buf = args[0];
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    if (n == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t size = PyByteArray_GET_SIZE(buf);
    if (n < 0 || n > size) {
        PyErr_Format(PyExc_ValueError, "discard_prefix: %zd is not in [0, %zd]", n, size);
        return NULL;
    }
#if KEEP_CAPACITY
    PyByteArrayObject *b = (PyByteArrayObject *)buf;
    if (b->ob_exports > 0) {
        PyErr_SetString(PyExc_BufferError, "discard_prefix: buf is exported");
        return NULL;
    }
    if (b->ob_bytes != NULL) {
        memmove(b->ob_bytes, b->ob_start + n, (size_t)(size - n));
        b->ob_start = b->ob_bytes;
        b->ob_start[size - n] = '\0';
    }
    Py_SET_SIZE(b, size - n);
#else
    if (PySequence_DelSlice(buf, 0, n) < 0) {
        return NULL;
    }
#endif
    Py_RETURN_NONE;
}

static PyMethodDef frame_methods[] = {
    {"append_record", (PyCFunction)(void (*)(void))append_record, METH_FASTCALL,
     "append_record(buf, kind, seq, payload, timestamp=None) -> int\n\n"
     "Frame one journal record and append it to the bytearray buf in one step;\n"
     "timestamp None means time.time(). Returns len(buf)."},
    {"discard_prefix", (PyCFunction)(void (*)(void))discard_prefix, METH_FASTCALL,
     "discard_prefix(buf, n) -> None\n\n"
     "Delete the first n bytes of the bytearray buf, keeping its memory for refilling."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef frame_module = {
    PyModuleDef_HEAD_INIT,
    "mell.gateway.journal._frame",
    "C framing of journal records (see format.append_record_py for the pure-Python twin).",
    -1,
    frame_methods,
};

PyMODINIT_FUNC
PyInit__frame(void)
{
    crc_init();
    str_append_slow = PyUnicode_InternFromString("_append_slow");
    str_slow_path = PyUnicode_InternFromString("_slow_path");
    if (str_append_slow == NULL || str_slow_path == NULL || PyType_Ready(&AppenderType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&frame_module);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&AppenderType);
    if (PyModule_AddObject(module, "Appender", (PyObject *)&AppenderType) < 0) {
        Py_DECREF(&AppenderType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
