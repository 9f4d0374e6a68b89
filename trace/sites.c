/* trace/sites.c — where functional calls were made, so that a task's failure shows the line of
 * the call in the scheduled function's frame, as plain Python's traceback does, and not the line
 * where its result was first read (where the exception surfaced).
 *
 * A site is the innermost frames at the submission (up to SITE_FRAMES: a comprehension's frame
 * and the function's around it, on 3.11), as (code, instruction offset) pairs. Sites are kept in
 * a table, deduplicated through a small direct-mapped cache on the innermost pair (a loop making
 * a million calls from one line has one site), and named by their index: a task holds 4 bytes.
 * The table is bounded: past SITE_MAX sites, new ones are not recorded (id 0).
 *
 * Thread and GIL model: GIL held. Frame layouts differ by version: like hook.c, this file reads
 * CPython's internal frame structures. */
#define Py_BUILD_CORE
#include "trace/internal.h"
#include <internal/pycore_frame.h>
#undef Py_BUILD_CORE

#define SITE_FRAMES 2
#define SITE_MAX 65536
#define CACHE_SIZE 256

typedef struct {
    PyObject *code[SITE_FRAMES];     /* strong; NULL past the last frame */
    int lasti[SITE_FRAMES];          /* instruction index (code units) */
} site;

static site *sites;                  /* sites[0] is "unknown" */
static uint32_t nsites = 1, cap;
static struct {
    PyObject *code;
    int lasti;
    uint32_t id;
} cache[CACHE_SIZE];

#if PY_VERSION_HEX >= 0x030D0000
#define CURRENT_FRAME(ts) ((ts)->current_frame)
#define FRAME_CODE(f) ((PyObject *)(f)->f_executable)
#define FRAME_LASTI(f) ((int)((f)->instr_ptr - _PyCode_CODE((PyCodeObject *)(f)->f_executable)))
#else
#define CURRENT_FRAME(ts) ((ts)->cframe->current_frame)
#define FRAME_CODE(f) ((PyObject *)(f)->f_code)
#define FRAME_LASTI(f) _PyInterpreterFrame_LASTI(f)
#endif

/* The Python frames of the running thread, innermost first, skipping the interpreter's own
 * (C-stack shims, frames not started). Returns how many were filled. */
static int
frames_here(PyObject **codes, int *lastis)
{
    PyThreadState *ts = PyThreadState_Get();
    _PyInterpreterFrame *f = CURRENT_FRAME(ts);
    int n = 0;
    for (; f != NULL && n < SITE_FRAMES; f = f->previous) {
#if PY_VERSION_HEX >= 0x030C0000
        if (f->owner == FRAME_OWNED_BY_CSTACK || _PyFrame_IsIncomplete(f))
            continue;
#else
        if (_PyFrame_IsIncomplete(f))
            continue;
#endif
        PyObject *code = FRAME_CODE(f);
        if (code == NULL || !PyCode_Check(code))
            continue;
        codes[n] = code;
        lastis[n] = FRAME_LASTI(f);
        n++;
    }
    return n;
}

uint32_t
trace__site_here(void)
{
    PyObject *codes[SITE_FRAMES] = {NULL};
    int lastis[SITE_FRAMES] = {0};
    int n = frames_here(codes, lastis);
    if (n == 0)
        return 0;
    size_t slot = (((uintptr_t)codes[0] >> 4) ^ (uintptr_t)lastis[0] * 2654435761u) % CACHE_SIZE;
    if (cache[slot].code == codes[0] && cache[slot].lasti == lastis[0]) {
        /* The outer frames of a cached site may differ (a comprehension reached from two
         * places); the innermost line is what matters most, so the cache keeps one. */
        uint32_t id = cache[slot].id;
        const site *s = &sites[id];
        int same = 1;
        for (int k = 1; k < SITE_FRAMES; k++)
            same &= s->code[k] == codes[k] && (codes[k] == NULL || s->lasti[k] == lastis[k]);
        if (same)
            return id;
    }
    if (nsites >= SITE_MAX)
        return 0;
    if (nsites >= cap) {
        uint32_t ncap = cap ? 2 * cap : 64;
        site *grown = PyMem_Realloc(sites, ncap * sizeof(site));
        if (grown == NULL)
            return 0;               /* only the line of a future traceback is lost */
        sites = grown;
        cap = ncap;
        if (nsites == 1)
            memset(&sites[0], 0, sizeof(site));
    }
    site *s = &sites[nsites];
    for (int k = 0; k < SITE_FRAMES; k++) {
        s->code[k] = Py_XNewRef(codes[k]);
        s->lasti[k] = lastis[k];
    }
    cache[slot].code = codes[0];      /* kept alive by the site */
    cache[slot].lasti = lastis[0];
    cache[slot].id = nsites;
    return nsites++;
}

/* The call was made in a frame that has finished since (a comprehension's on 3.11): after
 * entry t, an entry for it at the call, as plain Python shows it (a stub frame with its file,
 * name, line and columns: pydron/_exec_helpers.py site_entry). */
static void
insert_finished_frame(PyTracebackObject *t, PyObject *code, int lasti)
{
    if (t->tb_next != NULL) {
        PyCodeObject *next = PyFrame_GetCode(t->tb_next->tb_frame);
        int there = (PyObject *)next == code;
        Py_DECREF(next);
        if (there)
            return;
    }
    PyObject *helpers = PyImport_ImportModule("pydron._exec_helpers");
    PyObject *entry = helpers ? PyObject_CallMethod(helpers, "site_entry", "Oi", code, lasti)
                              : NULL;
    Py_XDECREF(helpers);
    if (entry == NULL || !PyTraceBack_Check(entry)) {
        PyErr_Clear();             /* the entry is only missing, as it was */
        Py_XDECREF(entry);
        return;
    }
    PyTracebackObject *e = (PyTracebackObject *)entry;
    Py_XSETREF(e->tb_next, t->tb_next);     /* steals t's reference to its next */
    t->tb_next = e;                          /* steals entry */
}

void
trace__site_fix_traceback(PyObject *exc, uint32_t id)
{
    if (id == 0 || id >= nsites || exc == NULL || !PyExceptionInstance_Check(exc))
        return;
    const site *s = &sites[id];
    PyObject *tb = PyException_GetTraceback(exc);
    for (PyTracebackObject *t = (PyTracebackObject *)tb; t != NULL; t = t->tb_next) {
        PyCodeObject *code = PyFrame_GetCode(t->tb_frame);
        for (int k = 0; k < SITE_FRAMES; k++) {
            if (s->code[k] != (PyObject *)code)
                continue;
            /* This frame's entry is where the result was read: make it the call. */
            t->tb_lasti = s->lasti[k] * (int)sizeof(_Py_CODEUNIT);
            t->tb_lineno = PyCode_Addr2Line(code, t->tb_lasti);
            if (k > 0 && s->code[k - 1] != NULL)
                insert_finished_frame(t, s->code[k - 1], s->lasti[k - 1]);
            break;
        }
        Py_DECREF(code);
    }
    Py_XDECREF(tb);
}
