/*
 * CRLF -> LF for message bodies on their way into Maildir files.
 *
 * Why C: a first sync passes every byte of every message through this
 * conversion, and on 2 cores CPU is what limits it. The best pure-Python
 * way (mirrord.store.newlines._crlf_to_lf_python, through Latin-1 and the
 * io module's newline decoder) converts about 1 GB/s and took 0.4 s of
 * CPU of a 10,000-message first sync; this loop (memchr to the next CR,
 * memcpy of the run before it) converts about 8 GB/s and writes each byte
 * once.
 *
 * Optional: pip builds it when a C compiler and Python's headers are
 * there, and mirrord.store.newlines falls back to the pure-Python
 * function (same results, tested against each other) when it is not.
 *
 * Meaning, exactly as the fallback's: every CR immediately followed by LF
 * is dropped; a lone CR and a lone LF stay as they are. A CR that is the
 * last byte stays too: the caller (TmpMessage.write) holds such a CR back
 * until it sees the next piece, so no CRLF is ever split between calls.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* Below this, releasing the GIL costs more than the copy it lets run beside. */
#define RELEASE_GIL_FROM (64 * 1024)

static Py_ssize_t
convert(const char *src, Py_ssize_t n, char *dst)
{
    const char *p = src;
    const char *end = src + n;
    char *d = dst;

    while (p < end) {
        const char *cr = memchr(p, '\r', (size_t)(end - p));
        if (cr == NULL) {
            memcpy(d, p, (size_t)(end - p));
            d += end - p;
            break;
        }
        /* The run up to the CR; the CR itself only when no LF follows it. */
        Py_ssize_t run = cr - p;
        int keep_cr = (cr + 1 == end || cr[1] != '\n');
        memcpy(d, p, (size_t)(run + keep_cr));
        d += run + keep_cr;
        p = cr + 1;
    }
    return d - dst;
}

static PyObject *
crlf_to_lf(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    PyObject *out;
    Py_ssize_t written;

    (void)module;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    /* Converting can only shrink: the input's length is enough, and the
       unused tail is cut off below. */
    out = PyBytes_FromStringAndSize(NULL, view.len);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    if (view.len >= RELEASE_GIL_FROM) {
        Py_BEGIN_ALLOW_THREADS
        written = convert(view.buf, view.len, PyBytes_AS_STRING(out));
        Py_END_ALLOW_THREADS
    }
    else {
        written = convert(view.buf, view.len, PyBytes_AS_STRING(out));
    }
    PyBuffer_Release(&view);
    if (written != PyBytes_GET_SIZE(out) && _PyBytes_Resize(&out, written) < 0)
        return NULL;
    return out;
}

static PyMethodDef newlines_methods[] = {
    {"crlf_to_lf", crlf_to_lf, METH_O,
     "crlf_to_lf(data, /)\n--\n\n"
     "A bytes copy of data (any contiguous buffer) with every CRLF turned into LF."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef newlines_module = {
    PyModuleDef_HEAD_INIT,
    "mirrord.store._newlines",
    "CRLF -> LF in C for mirrord.store.newlines (optional; a pure-Python fallback exists).",
    0,
    newlines_methods,
};

PyMODINIT_FUNC
PyInit__newlines(void)
{
    return PyModuleDef_Init(&newlines_module);
}
