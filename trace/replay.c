/* trace/replay.c — later calls of a scheduled function without its bytecode: the C interpreter of
 * its graph, the register program pydron/_replay.py lifts from the function's source (the module
 * docstring there says what a graph can hold; OPS there and enum rop here must agree, and a test
 * checks that they do).
 *
 * The interpreter reads values where the rewritten bytecode would (the same force kinds per
 * operation), sends every call through the same dispatcher, and submits a comprehension over one
 * functional callee as a map (graph/bulk.c). It never does anything the caller could see before
 * the call returns: what it builds is its own, in-place operators and appends touch only objects
 * it made, callees are functional, scheduled functions with a graph of their own, or known pure.
 * So when it meets something else (an unknown callee, an exception, an unbound name) it can give
 * up ("bail"): its tasks are dropped (graph_cancel_since) and the call is traced as if there were
 * no graph, which raises exactly what plain Python raises, with the traceback plain Python shows.
 *
 * Speculation: a branch whose condition reads a result that has not arrived is not waited for.
 * The interpreter guesses the outcome (the site's last one), keeps a checkpoint (the registers as
 * they were where the condition's computation began, the position in the program order, the
 * appends made since), and goes on along the guess. The guess is checked when the result is in:
 * at the next branch, on return, before giving up. A wrong guess drops the tasks submitted since
 * the checkpoint (softly: they run to their end, nothing is killed), undoes the appends, restores
 * the registers and takes the other way. A site whose guesses fail too often stops guessing.
 *
 * Thread and GIL model: GIL held throughout; the per-code state is shared by threads (counters
 * only), everything of one call is on its C stack. */
#include "trace/internal.h"
#include "jit/jit.h"

/* The instruction set: the order of OPS in pydron/_replay.py. */
enum rop {
    R_ARG, R_CONST, R_GLOBAL, R_MOVE, R_BINOP, R_INPLACE, R_UNARY, R_COMPARE, R_GETITEM,
    R_GETATTR, R_BUILD_LIST, R_BUILD_TUPLE, R_BUILD_DICT, R_BUILD_SLICE, R_APPEND, R_CALL,
    R_KWNAMES, R_ITER, R_FOR, R_JUMP, R_IF_FALSE, R_IF_TRUE, R_UNPACK, R_RETURN, R_MAP, R_NOT,
    R_BAIL, R_STORE_ITEM, R_BUILD_SET, R_SET_ADD, R_EXTEND, R_FORMAT, R_BUILD_STRING, R_DEREF,
    R_NOPS
};
static const char *const rop_names[R_NOPS] = {
    "ARG", "CONST", "GLOBAL", "MOVE", "BINOP", "INPLACE", "UNARY", "COMPARE", "GETITEM",
    "GETATTR", "BUILD_LIST", "BUILD_TUPLE", "BUILD_DICT", "BUILD_SLICE", "APPEND", "CALL",
    "KWNAMES", "ITER", "FOR", "JUMP", "IF_FALSE", "IF_TRUE", "UNPACK", "RETURN", "MAP", "NOT",
    "BAIL", "STORE_ITEM", "BUILD_SET", "SET_ADD", "EXTEND", "FORMAT", "BUILD_STRING", "DEREF",
};

typedef struct {
    int32_t op, a, b, c, d, line;
} rins;

typedef struct {
    uint32_t guesses, misses;
    int8_t last;               /* the last outcome: -1 none yet */
    uint8_t off;               /* guessed wrong too often: waits like the trace */
} rsite;

enum { REPLAY_UNTRIED, REPLAY_READY, REPLAY_REFUSED, REPLAY_DEAD, REPLAY_SLOWER };

/* Calls of each kind timed before deciding whether the graph is worth it: a graph of much
 * pure-Python glue and few tasks can cost the master more than CPython running the rewritten
 * bytecode does. The calls alternate between the graph and the trace, their master CPU time is
 * compared, and a graph slower than SLOWER_RATIO times its trace is set aside. */
#define COMPARE_CALLS 3
#define SLOWER_RATIO 1.25
#define SLOWER_SLACK_NS 2000
#define RECOMPARE_CALLS 64

/* A scheduled code object's graph and what became of it (trace_codeinfo.replay). */
struct trace_replay {
    int state;
    long traced;                 /* calls traced before the graph was lifted */
    int bails_in_a_row;
    PyObject *reason;            /* refused, dead: why (str); ready: the last bail's reason */
    PyObject *name, *filename, *consts, *names, *argnames;
    int nargs, nregs, ncode, nsites;
    rins *code;
    rsite *sites;
    uint64_t hits, bails, guesses, mispredicts;
    /* The comparison with the trace (COMPARE_CALLS of each; master CPU ns). */
    uint64_t replay_cpu[COMPARE_CALLS], trace_cpu[COMPARE_CALLS];
    int nreplay_cpu, ntrace_cpu;
    int timing_trace;              /* the call being traced now is one of the comparison's */
    int since_compare;             /* calls since the comparison began */
    uint64_t last_replay_ns, last_trace_ns;   /* the medians of the last comparison */
    jit_graph *jit;                /* the compiled tier's handle, once the graph was hot */
    uint64_t compiled_runs;        /* runs that went through the compiled function */
    /* The compiled function against the interpreter once it is ready (tier "on"): COMPARE_CALLS
     * runs of each, alternating, master CPU ns ([0] interpreted, [1] compiled); the verdict: 1
     * compiled is faster and stays, -1 it is not and the graph stays interpreted, 0 not yet. */
    uint64_t tier_cpu[2][COMPARE_CALLS];
    int ntier_cpu[2];
    int tier_verdict;
    uint64_t tier_ns[2];           /* the medians the verdict was drawn from */
};

/* Process-wide counters (pydron info). */
static struct {
    uint64_t hits, misses, lifts, refusals, bails, guesses, mispredicts, maps, disk_hits, slower;
} S;

/* Settings: mode 0 off, 1 the C interpreter, 2 the Python reference interpreter (tests);
 * after: calls traced before a function's graph is lifted and replayed. */
static int replay_compare = 1;       /* graphs are compared with their trace before they stay */
static int replay_mode = 1;
static long replay_after = 1;
/* Branches on pending results guess (1), wait (0), or guess even when the result is in (2:
 * tests, so that every guess and rollback path runs on the whole semantics corpus). */
static int replay_guess = 1;
/* The compiled tier (jit/): off (0); on (1): a graph replayed jit_after times is compiled on the
 * compile thread, later calls use it once it is ready; always (2): compiled at the first call,
 * which waits for it (tests). Programs over jit_max instructions stay interpreted. Off unless
 * asked for: it does not beat the interpreter (bench/replay_figures.py, README). */
static int jit_mode = 0;
static long jit_after = 32;
static long jit_max = 1 << 16;

#define MAX_CHECKPOINTS 64
#define BAILS_TO_GIVE_UP 3
#define GUESS_MIN_MISSES 4      /* a site stops guessing past this many misses ... */
#define GUESS_MAX_MISS_RATE 4   /* ... when more than 1 in this many guesses missed */

static PyObject *str_out;            /* "out": numpy's output argument writes into an array */
static PyObject *str_builtins;       /* "__builtins__" */
static PyObject *pure_callees;       /* set: callables known to have no effect but their result */
static PyObject *pure_methods;       /* {exact type: set of method names}: likewise */
static PyObject *new_objects;        /* set: callables and method names whose result is new */
static PyObject *lift_fn;            /* pydron._replay.lift_for_core */
static PyObject *reference_fn;       /* pydron._replay.run_reference */
static PyObject *pure_fn;            /* pydron._replay.pure_tables */
static PyObject *cached_fn;          /* pydron._replay.cached_for_core */

/* ---- the program ----------------------------------------------------------------------------- */

void
trace__replay_free(struct trace_replay *p)
{
    if (p == NULL)
        return;
    Py_XDECREF(p->reason);
    Py_XDECREF(p->name);
    Py_XDECREF(p->filename);
    Py_XDECREF(p->consts);
    Py_XDECREF(p->names);
    Py_XDECREF(p->argnames);
    jit_graph_release(p->jit);
    PyMem_Free(p->code);
    PyMem_Free(p->sites);
    PyMem_Free(p);
}

static int
in_range(int32_t v, int32_t n)
{
    return v >= 0 && v < n;
}

/* Check one instruction's operands against the program's sizes: a program comes from our own
 * lifter, but a malformed one must fail here, not read out of bounds later. */
static const char *
check_ins(const struct trace_replay *p, int pc, const rins *i)
{
    int R = p->nregs, N = p->ncode;
    Py_ssize_t C = PyTuple_GET_SIZE(p->consts), M = PyTuple_GET_SIZE(p->names);
    switch (i->op) {
    case R_ARG: return in_range(i->a, R) && in_range(i->b, p->nargs) ? NULL : "ARG operands";
    case R_CONST: return in_range(i->a, R) && i->b >= 0 && i->b < C ? NULL : "CONST operands";
    case R_GLOBAL:
        return in_range(i->a, R) && i->b >= 0 && i->b < M ? NULL : "GLOBAL operands";
    case R_MOVE: case R_NOT: case R_ITER:
        return in_range(i->a, R) && in_range(i->b, R) ? NULL : "operands";
    case R_BINOP: case R_INPLACE:
        return in_range(i->a, R) && in_range(i->b, R) && in_range(i->c, R) && in_range(i->d, 13)
               ? NULL : "binary operands";
    case R_UNARY:
        return in_range(i->a, R) && in_range(i->b, R) && in_range(i->c, 3) ? NULL : "UNARY";
    case R_COMPARE:
        return in_range(i->a, R) && in_range(i->b, R) && in_range(i->c, R) && in_range(i->d, 10)
               ? NULL : "COMPARE operands";
    case R_GETITEM:
        return in_range(i->a, R) && in_range(i->b, R) && in_range(i->c, R) ? NULL : "GETITEM";
    case R_GETATTR:
        return in_range(i->a, R) && in_range(i->b, R) && i->c >= 0 && i->c < M ? NULL : "GETATTR";
    case R_BAIL:
        return i->a >= 0 && i->a < C && PyUnicode_Check(PyTuple_GET_ITEM(p->consts, i->a))
               ? NULL : "BAIL operand";
    case R_STORE_ITEM:
        return in_range(i->a, R) && in_range(i->b, R) && in_range(i->c, R) ? NULL : "STORE_ITEM";
    case R_SET_ADD: case R_EXTEND:
        return in_range(i->a, R) && in_range(i->b, R) ? NULL : "operands";
    case R_FORMAT:
        return in_range(i->a, R) && in_range(i->b, R) && (i->d == -1 || in_range(i->d, R)) &&
               (i->c == -1 || i->c == 's' || i->c == 'r' || i->c == 'a') ? NULL : "FORMAT";
    case R_DEREF:
        return in_range(i->a, R) && i->b >= 0 ? NULL : "DEREF operands";
    case R_BUILD_LIST: case R_BUILD_TUPLE: case R_BUILD_SET: case R_BUILD_STRING:
        return in_range(i->a, R) && i->c >= 0 && (i->c == 0 || (in_range(i->b, R) &&
               i->b + i->c <= R)) ? NULL : "BUILD operands";
    case R_BUILD_DICT:
        return in_range(i->a, R) && i->c >= 0 && (i->c == 0 || (in_range(i->b, R) &&
               i->b + 2 * i->c <= R)) ? NULL : "BUILD_DICT operands";
    case R_BUILD_SLICE:
        return in_range(i->a, R) && (i->b == -1 || in_range(i->b, R)) &&
               (i->c == -1 || in_range(i->c, R)) && (i->d == -1 || in_range(i->d, R))
               ? NULL : "BUILD_SLICE operands";
    case R_APPEND: return in_range(i->a, R) && in_range(i->b, R) ? NULL : "APPEND operands";
    case R_CALL:
        if (!(in_range(i->a, R) && in_range(i->b, R) && i->d >= 0 && pc + 1 < N))
            return "CALL operands";
        return NULL;            /* the argument count is checked with KWNAMES */
    case R_KWNAMES: {
        if (pc == 0 || (i - 1)->op != R_CALL)
            return "KWNAMES not after a CALL";
        Py_ssize_t nkw = 0;
        if (i->a != -1) {
            if (i->a < 0 || i->a >= C || !PyTuple_Check(PyTuple_GET_ITEM(p->consts, i->a)))
                return "KWNAMES operand";
            nkw = PyTuple_GET_SIZE(PyTuple_GET_ITEM(p->consts, i->a));
        }
        const rins *call = i - 1;
        Py_ssize_t total = call->d + nkw;
        return total == 0 || (in_range(call->c, R) && call->c + total <= R) ? NULL
               : "CALL arguments";
    }
    case R_FOR:
        return in_range(i->a, R) && in_range(i->b, R) && in_range(i->c, N + 1) ? NULL : "FOR";
    case R_JUMP: return in_range(i->a, N) ? NULL : "JUMP target";
    case R_IF_FALSE: case R_IF_TRUE:
        return in_range(i->a, R) && in_range(i->b, N) && in_range(i->c, p->nsites) &&
               in_range(i->d, pc + 1) ? NULL : "branch operands";
    case R_UNPACK:
        return in_range(i->a, R) && in_range(i->b, R) && i->c >= 1 && i->a + i->c <= R
               ? NULL : "UNPACK operands";
    case R_RETURN: return in_range(i->a, R) ? NULL : "RETURN operand";
    case R_MAP: {
        if (!(in_range(i->a, R) && in_range(i->b, R) && in_range(i->c, R) && i->d >= 0 && i->d < C))
            return "MAP operands";
        PyObject *t = PyTuple_GET_ITEM(p->consts, i->d);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 2 || !PyLong_Check(PyTuple_GET_ITEM(t, 0))
            || !PyTuple_Check(PyTuple_GET_ITEM(t, 1)))
            return "MAP template";
        long ntarget = PyLong_AsLong(PyTuple_GET_ITEM(t, 0));
        PyObject *sources = PyTuple_GET_ITEM(t, 1);
        for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(sources); k++) {
            PyObject *s = PyTuple_GET_ITEM(sources, k);
            if (!PyTuple_Check(s) || PyTuple_GET_SIZE(s) < 1 ||
                !PyUnicode_Check(PyTuple_GET_ITEM(s, 0)))
                return "MAP source";
            const char *kind = PyUnicode_AsUTF8(PyTuple_GET_ITEM(s, 0));
            long v = PyTuple_GET_SIZE(s) == 2 ? PyLong_AsLong(PyTuple_GET_ITEM(s, 1)) : -1;
            if (kind == NULL) {
                PyErr_Clear();
                return "MAP source";
            }
            if (strcmp(kind, "elem") == 0 ? ntarget != 0
                : strcmp(kind, "item") == 0 ? !(v >= 0 && v < ntarget)
                : strcmp(kind, "reg") == 0 ? !in_range((int32_t)v, R)
                : strcmp(kind, "const") == 0 ? !(v >= 0 && v < C) : 1)
                return "MAP source";
        }
        return ntarget >= 0 ? NULL : "MAP template";
    }
    default: return "unknown operation";
    }
}

/* Build the program from the tuple _replay.Program.as_tuple() gives. 0, or -1 + exception. */
static int
program_load(struct trace_replay *p, PyObject *t)
{
    PyObject *code;
    if (!PyArg_ParseTuple(t, "UiiO!O!O!iO!U:replay program", &p->name, &p->nargs, &p->nregs,
                          &PyTuple_Type, &code, &PyTuple_Type, &p->consts, &PyTuple_Type,
                          &p->names, &p->nsites, &PyTuple_Type, &p->argnames, &p->filename))
        return -1;
    Py_INCREF(p->name);
    Py_INCREF(p->consts);
    Py_INCREF(p->names);
    Py_INCREF(p->argnames);
    Py_INCREF(p->filename);
    Py_ssize_t n = PyTuple_GET_SIZE(code);
    if (p->nargs < 0 || p->nregs < p->nargs || p->nregs > 1 << 20 || n < 1 || n > 1 << 24 ||
        p->nsites < 0 || PyTuple_GET_SIZE(p->argnames) != p->nargs) {
        PyErr_SetString(PyExc_ValueError, "pydron: malformed replay program (sizes)");
        return -1;
    }
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(p->names); k++)
        if (!PyUnicode_Check(PyTuple_GET_ITEM(p->names, k))) {
            PyErr_SetString(PyExc_ValueError, "pydron: malformed replay program (names)");
            return -1;
        }
    p->ncode = (int)n;
    p->code = PyMem_Calloc((size_t)n, sizeof(rins));
    p->sites = PyMem_Calloc((size_t)(p->nsites ? p->nsites : 1), sizeof(rsite));
    if (p->code == NULL || p->sites == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (int s = 0; s < p->nsites; s++)
        p->sites[s].last = -1;
    for (Py_ssize_t pc = 0; pc < n; pc++) {
        rins *i = &p->code[pc];
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(code, pc), "iiiiii:replay instruction", &i->op,
                              &i->a, &i->b, &i->c, &i->d, &i->line))
            return -1;
    }
    for (Py_ssize_t pc = 0; pc < n; pc++) {
        const char *bad = in_range(p->code[pc].op, R_NOPS) ? check_ins(p, (int)pc, &p->code[pc])
                                                           : "unknown operation";
        if (bad != NULL) {
            PyErr_Format(PyExc_ValueError, "pydron: malformed replay program: %s at %zd", bad, pc);
            return -1;
        }
    }
    if (p->code[n - 1].op != R_RETURN && p->code[n - 1].op != R_JUMP) {
        PyErr_SetString(PyExc_ValueError, "pydron: malformed replay program (falls off the end)");
        return -1;
    }
    return 0;
}

/* ---- one call ---------------------------------------------------------------------------------- */

/* A loop's iterator as the interpreter holds it: what it took from the underlying iterator
 * while guesses were open is kept, so that a wrong guess can put the loop back where it was
 * (an iterator cannot be rewound). */
typedef struct {
    PyObject_HEAD
    PyObject *it;                /* the underlying iterator */
    PyObject *kept;              /* list: items from position kept_from on */
    Py_ssize_t kept_from;        /* position of kept[0] */
    Py_ssize_t taken;            /* items taken from it so far */
    Py_ssize_t pos;              /* the loop's position (< taken after a rollback) */
} cursor;

static void
cursor_dealloc(PyObject *self)
{
    cursor *c = (cursor *)self;
    Py_XDECREF(c->it);
    Py_XDECREF(c->kept);
    Py_TYPE(self)->tp_free(self);
}

static PyTypeObject cursor_type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pydron._core.ReplayCursor",
    .tp_basicsize = sizeof(cursor),
    .tp_dealloc = cursor_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A replayed loop's iterator, rewindable while guesses are open.",
};

static PyObject *
cursor_new(PyObject *it)
{
    cursor *c = PyObject_New(cursor, &cursor_type);
    if (c == NULL) {
        Py_DECREF(it);
        return NULL;
    }
    c->it = it;
    c->kept = NULL;
    c->kept_from = c->taken = c->pos = 0;
    return (PyObject *)c;
}

/* The next item (new reference), or NULL: exhausted (no exception) or failed. keep: guesses are
 * open, so what is taken is kept. */
static PyObject *
cursor_next(cursor *c, int keep)
{
    if (c->pos < c->taken) {
        /* Going again over what a wrong guess had taken. */
        PyObject *v = PyList_GET_ITEM(c->kept, c->pos - c->kept_from);
        c->pos++;
        return Py_NewRef(v);
    }
    if (!keep && c->kept != NULL) {
        Py_CLEAR(c->kept);       /* no guess can go back any more */
    }
    PyObject *v = PyIter_Next(c->it);
    if (v == NULL)
        return NULL;
    if (keep) {
        if (c->kept == NULL) {
            if ((c->kept = PyList_New(0)) == NULL) {
                Py_DECREF(v);
                return NULL;
            }
            c->kept_from = c->taken;
        }
        if (PyList_Append(c->kept, v) < 0) {
            Py_DECREF(v);
            return NULL;
        }
    }
    c->taken++;
    c->pos++;
    return v;
}

/* What a register's value may be tied to outside this call: an in-place operation on it or
 * consuming it (an iterator) would be seen by the caller. */
enum { FRESH = 0, WRAPS = 1, OUTSIDE = 2 };

typedef struct {
    PyObject *list;
    Py_ssize_t len;
} undo_append;

typedef struct {
    int if_pc;
    int guess;                   /* the branch's condition was taken as true (1) or false (0) */
    PyObject *wait_on;           /* the pending value that was not waited for (strong) */
    PyObject **regs;             /* the registers where the condition's computation began */
    uint8_t *taint;
    Py_ssize_t *positions;       /* per register: a loop cursor's position then, or -1 */
    Py_ssize_t order_mark, moves_mark, undo_len, records_len;
} checkpoint;

typedef struct {
    struct trace_replay *p;
    jit_graph_fn compiled;       /* the graph's compiled function, or NULL: interpreted */
    PyObject *func, *globals, *builtins;
    PyObject **regs;
    uint8_t *taint;
    checkpoint cp[MAX_CHECKPOINTS];
    int ncp;
    undo_append *undo;
    Py_ssize_t nundo, undo_cap;
    int nospec_pc;               /* this branch is evaluated without a guess once (-1: none) */
    /* Reuse after a wrong guess: the functional calls made while guesses were open, as
     * (task, key, kept) tuples; the tasks a rollback took back, {key: (task, kept)}, for the
     * same calls made again (same function, same arguments); kept holds what the key names by
     * address. */
    PyObject *records;
    PyObject *pool;
    int bail_pc;
    PyObject *bail_reason;       /* str */
} run_state;

/* Give up: returns -2 with the reason noted (no exception set). */
static int
bail(run_state *st, int pc, const char *fmt, ...)
{
    va_list va;
    va_start(va, fmt);
    PyObject *exc = PyErr_GetRaisedException();
    PyObject *msg = PyUnicode_FromFormatV(fmt, va);
    va_end(va);
    if (msg == NULL)
        PyErr_Clear();
    if (exc != NULL && msg != NULL) {
        /* What was raised, for pydron.explain: the trace raises it again, in place. */
        PyObject *full = PyUnicode_FromFormat("%U (%s: %S)", msg, Py_TYPE(exc)->tp_name, exc);
        if (full == NULL)
            PyErr_Clear();
        else
            Py_SETREF(msg, full);
    }
    Py_XDECREF(exc);
    Py_XSETREF(st->bail_reason, msg);
    st->bail_pc = pc;
    return -2;
}

/* An exception stops the replay unless it is the user's interrupt or the interpreter's end,
 * which propagate (-1); any other is raised again by the trace (bail, -2). */
static int
failed(run_state *st, int pc, const char *what)
{
    PyObject *exc = PyErr_GetRaisedException();
    if (exc != NULL && !PyErr_GivenExceptionMatches(exc, PyExc_Exception)) {
        PyErr_SetRaisedException(exc);
        return -1;
    }
    PyErr_SetRaisedException(exc);
    return bail(st, pc, "%s raised", what);
}

static void
set_reg(run_state *st, int r, PyObject *v, uint8_t taint)
{
    Py_XSETREF(st->regs[r], v);
    st->taint[r] = taint;
}

static int
is_unfinished_task(PyObject *x)
{
    return graph_is_task(x) && !graph_task_finished((graph_task *)x);
}

/* Can the branch at if_pc guess now? */
static int
may_guess(run_state *st, int if_pc)
{
    if (st->nospec_pc == if_pc || replay_mode != 1 || !replay_guess)
        return 0;
    rsite *site = &st->p->sites[st->p->code[if_pc].c];
    return !site->off;
}

static int validate_oldest(run_state *st, int *pc);

/* A checkpoint for the branch at if_pc, the computation of whose condition began at
 * code[if_pc].d, not waiting for wait_on: then on along the guess. *pc is where to go on.
 * 0, or -1 + exception. */
static int
guess(run_state *st, int if_pc, PyObject *wait_on, int *pc)
{
    struct trace_replay *p = st->p;
    if (st->ncp == MAX_CHECKPOINTS) {
        /* Too many guesses open: settle the oldest first (waits). */
        int rc = validate_oldest(st, pc);
        if (rc != 0)
            return rc < 0 ? -1 : 0;       /* rolled back: *pc is where to go on */
    }
    const rins *br = &p->code[if_pc];
    rsite *site = &p->sites[br->c];
    checkpoint *c = &st->cp[st->ncp];
    c->regs = PyMem_Malloc((size_t)p->nregs * sizeof(PyObject *));
    c->taint = PyMem_Malloc((size_t)p->nregs);
    c->positions = PyMem_Malloc((size_t)p->nregs * sizeof(Py_ssize_t));
    if (c->regs == NULL || c->taint == NULL || c->positions == NULL) {
        PyMem_Free(c->regs);
        PyMem_Free(c->taint);
        PyMem_Free(c->positions);
        PyErr_NoMemory();
        return -1;
    }
    for (int r = 0; r < p->nregs; r++) {
        c->regs[r] = Py_XNewRef(st->regs[r]);
        c->positions[r] = st->regs[r] && Py_IS_TYPE(st->regs[r], &cursor_type)
                          ? ((cursor *)st->regs[r])->pos : -1;
    }
    memcpy(c->taint, st->taint, (size_t)p->nregs);
    c->if_pc = if_pc;
    c->guess = site->last < 0 ? 1 : site->last;
    c->wait_on = Py_NewRef(wait_on);
    c->order_mark = graph_mark();
    c->moves_mark = graph_moves_mark();
    c->undo_len = st->nundo;
    c->records_len = st->records ? PyList_GET_SIZE(st->records) : 0;
    st->ncp++;
    site->guesses++;
    p->guesses++;
    S.guesses++;
    /* Where the branch goes on the guess. */
    int jumps = br->op == R_IF_FALSE ? !c->guess : c->guess;
    *pc = jumps ? br->b : if_pc + 1;
    return 0;
}

static void
checkpoint_clear(checkpoint *c, int nregs)
{
    for (int r = 0; r < nregs; r++)
        Py_XDECREF(c->regs[r]);
    PyMem_Free(c->regs);
    PyMem_Free(c->taint);
    PyMem_Free(c->positions);
    Py_CLEAR(c->wait_on);
}

/* Read x (shallow or deep) at pc. Returns a new reference; or NULL + exception; or NULL without
 * exception and *pc moved when pc belongs to a branch's condition whose operand x has not
 * arrived, and the branch guessed. */
static PyObject *
operand(run_state *st, int *pc, PyObject *x, int deep, int slice_of)
{
    if (slice_of >= 0 && graph_is_task(x) && (replay_guess == 2 || is_unfinished_task(x)) &&
        may_guess(st, slice_of)) {
        if (replay_guess != 2 && graph_pump() < 0)
            return NULL;
        if (replay_guess == 2 || is_unfinished_task(x)) {
            if (guess(st, slice_of, x, pc) < 0)
                return NULL;
            return NULL;
        }
    }
    return deep ? trace__force_deep(x) : trace__force(x);
}

/* The branch whose condition the instruction at pc helps compute (pc in [d, branch) of a branch,
 * with only pure instructions between), or -1. */
static int
slice_owner(const struct trace_replay *p, int pc)
{
    for (int k = pc; k < p->ncode && k < pc + 64; k++) {
        const rins *i = &p->code[k];
        switch (i->op) {
        case R_IF_FALSE: case R_IF_TRUE:
            return i->d <= pc ? k : -1;
        case R_CONST: case R_GLOBAL: case R_MOVE: case R_BINOP: case R_UNARY: case R_COMPARE:
        case R_GETITEM: case R_GETATTR: case R_BUILD_LIST: case R_BUILD_TUPLE:
        case R_BUILD_SLICE: case R_NOT: case R_FORMAT: case R_BUILD_STRING: case R_DEREF:
            continue;
        default:
            return -1;
        }
    }
    return -1;
}

static PyObject *binop_fn(int op, PyObject *x, PyObject *y, int inplace);
static PyObject *compare(int op, PyObject *x, PyObject *y);
static int exec_one(run_state *st, int *pc, int guessing);

/* Undo the appends made since checkpoint k, restore its registers, drop the tasks submitted
 * since, and forget it and every later one. */
static void
roll_back(run_state *st, int k)
{
    checkpoint *c = &st->cp[k];
    for (Py_ssize_t u = st->nundo - 1; u >= c->undo_len; u--) {
        undo_append *a = &st->undo[u];
        if (PyList_GET_SIZE(a->list) > a->len &&
            PyList_SetSlice(a->list, a->len, PyList_GET_SIZE(a->list), NULL) < 0)
            PyErr_Clear();
        Py_DECREF(a->list);
    }
    st->nundo = c->undo_len;
    /* The calls made since the checkpoint may be made again on the right path: their tasks wait
     * in the pool; every other task since is dropped. */
    PyObject *detached = graph_detach_since(c->order_mark);
    if (detached == NULL)
        PyErr_Clear();
    Py_ssize_t nrec = st->records ? PyList_GET_SIZE(st->records) : 0;
    for (Py_ssize_t k2 = c->records_len; k2 < nrec && detached; k2++) {
        PyObject *rec = PyList_GET_ITEM(st->records, k2);
        PyObject *entry = PyTuple_Pack(2, PyTuple_GET_ITEM(rec, 0), PyTuple_GET_ITEM(rec, 2));
        if (entry == NULL || (st->pool == NULL && (st->pool = PyDict_New()) == NULL) ||
            PyDict_SetItem(st->pool, PyTuple_GET_ITEM(rec, 1), entry) < 0)
            PyErr_Clear();
        Py_XDECREF(entry);
    }
    if (st->records && PyList_SetSlice(st->records, c->records_len, nrec, NULL) < 0)
        PyErr_Clear();
    if (detached != NULL) {
        PyObject *drop = PyList_New(0);
        for (Py_ssize_t k2 = 0; drop && k2 < PyList_GET_SIZE(detached); k2++) {
            PyObject *t = PyList_GET_ITEM(detached, k2);
            int pooled = 0;
            PyObject *key, *entry;
            Py_ssize_t pos = 0;
            while (!pooled && st->pool && PyDict_Next(st->pool, &pos, &key, &entry))
                pooled = PyTuple_GET_ITEM(entry, 0) == t;
            if (!pooled && PyList_Append(drop, t) < 0)
                Py_CLEAR(drop);
        }
        if (drop != NULL) {
            graph_forget_tasks(drop);
            Py_DECREF(drop);
        }
        else
            PyErr_Clear();
        Py_DECREF(detached);
    }
    graph_moves_truncate(c->moves_mark);
    for (int r = 0; r < st->p->nregs; r++) {
        Py_XSETREF(st->regs[r], Py_XNewRef(c->regs[r]));
        if (c->positions[r] >= 0)
            ((cursor *)c->regs[r])->pos = c->positions[r];
    }
    memcpy(st->taint, c->taint, (size_t)st->p->nregs);
    for (int j = st->ncp - 1; j >= k; j--)
        checkpoint_clear(&st->cp[j], st->p->nregs);
    st->ncp = k;
}

/* Drop the oldest checkpoint: its guess held. */
static void
settle_oldest(run_state *st)
{
    checkpoint_clear(&st->cp[0], st->p->nregs);
    memmove(&st->cp[0], &st->cp[1], (size_t)(st->ncp - 1) * sizeof(checkpoint));
    st->ncp--;
    if (st->ncp == 0) {
        for (Py_ssize_t u = 0; u < st->nundo; u++)
            Py_DECREF(st->undo[u].list);
        st->nundo = 0;
    }
}

/* Compute the condition of the oldest checkpoint's branch, waiting, from its registers; compare
 * with the guess. Held: the checkpoint goes, 0. Wrong: roll back to it and go on the other way
 * (*pc), 1. The condition raised: roll back to it and evaluate the branch without guessing (the
 * error comes again there, in order), 1. -1 + exception: interrupted. */
static int
validate_oldest(run_state *st, int *pc)
{
    struct trace_replay *p = st->p;
    checkpoint *c = &st->cp[0];
    const rins *br = &p->code[c->if_pc];
    /* Evaluate the condition's instructions on a copy of the checkpoint's registers. */
    PyObject **saved_regs = st->regs;
    uint8_t *saved_taint = st->taint;
    PyObject **regs = PyMem_Malloc((size_t)p->nregs * sizeof(PyObject *));
    uint8_t *taint = PyMem_Malloc((size_t)p->nregs);
    if (regs == NULL || taint == NULL) {
        PyMem_Free(regs);
        PyMem_Free(taint);
        PyErr_NoMemory();
        return -1;
    }
    for (int r = 0; r < p->nregs; r++)
        regs[r] = Py_XNewRef(c->regs[r]);
    memcpy(taint, c->taint, (size_t)p->nregs);
    st->regs = regs;
    st->taint = taint;
    int at = br->d, rc = 0, truth = -1;
    while (at < c->if_pc && rc == 0)
        rc = exec_one(st, &at, 0);
    if (rc == 0 && at == c->if_pc) {
        PyObject *v = trace__force(regs[br->a]);
        truth = v ? PyObject_IsTrue(v) : -1;
        Py_XDECREF(v);
        if (truth < 0)
            rc = PyErr_GivenExceptionMatches(PyErr_Occurred(), PyExc_Exception) ? -2 : -1;
    }
    for (int r = 0; r < p->nregs; r++)
        Py_XDECREF(regs[r]);
    PyMem_Free(regs);
    PyMem_Free(taint);
    st->regs = saved_regs;
    st->taint = saved_taint;
    if (rc == -1)
        return -1;
    rsite *site = &p->sites[br->c];
    if (rc == -2 || truth < 0) {
        /* The condition raised: the trace will say what, where. */
        PyErr_Clear();
        int if_pc = c->if_pc, start = br->d;
        roll_back(st, 0);
        st->nospec_pc = if_pc;
        *pc = start;
        return 1;
    }
    site->last = (int8_t)truth;
    if (truth == c->guess) {
        settle_oldest(st);
        return 0;
    }
    site->misses++;
    p->mispredicts++;
    S.mispredicts++;
    if (site->misses >= GUESS_MIN_MISSES && site->misses * GUESS_MAX_MISS_RATE > site->guesses)
        site->off = 1;
    int if_pc = c->if_pc;
    roll_back(st, 0);
    int jumps = br->op == R_IF_FALSE ? !truth : truth;
    *pc = jumps ? br->b : if_pc + 1;
    return 1;
}

/* Settle the checkpoints whose awaited value has arrived (without waiting): as settle_all. */
static int
settle_arrived(run_state *st, int *pc)
{
    if (graph_pump() < 0)
        return -1;
    while (st->ncp > 0 && !is_unfinished_task(st->cp[0].wait_on)) {
        int rc = validate_oldest(st, pc);
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* Settle every checkpoint (waiting): 0 when all held, 1 after a rollback (*pc is where to go
 * on), -1 + exception. */
static int
settle_all(run_state *st, int *pc)
{
    while (st->ncp > 0) {
        int rc = validate_oldest(st, pc);
        if (rc != 0)
            return rc;
    }
    return 0;
}

static int
note_append(run_state *st, PyObject *list)
{
    if (st->ncp == 0)
        return 0;
    if (st->nundo == st->undo_cap) {
        Py_ssize_t cap = st->undo_cap ? 2 * st->undo_cap : 64;
        undo_append *u = PyMem_Realloc(st->undo, (size_t)cap * sizeof(undo_append));
        if (u == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        st->undo = u;
        st->undo_cap = cap;
    }
    st->undo[st->nundo].list = Py_NewRef(list);
    st->undo[st->nundo].len = PyList_GET_SIZE(list);
    st->nundo++;
    return 0;
}

/* An iterator the caller handed in (or reached through what it handed in): iterating it would
 * consume it, which the caller would see. */
static int
outside_iterator(run_state *st, int reg, PyObject *v)
{
    return st->taint[reg] == OUTSIDE && PyIter_Check(v);
}

static int
immutable(PyObject *v)
{
    return v == Py_None || PyLong_CheckExact(v) || PyFloat_CheckExact(v) ||
           PyComplex_CheckExact(v) || PyUnicode_CheckExact(v) || PyBytes_CheckExact(v) ||
           PyTuple_CheckExact(v) || PyBool_Check(v) || PyFrozenSet_CheckExact(v);
}

/* What kind of callee: how CALL and MAP treat it. */
enum { CALLEE_OTHER, CALLEE_FUNCTIONAL, CALLEE_SCHEDULED, CALLEE_PURE };

static int replay_prepare(PyObject *fn, trace_codeinfo *info);

/* A builtin method bound to an object (not a module function): its name (new reference), or
 * NULL without exception. */
static PyObject *
builtin_method_name(PyObject *callable)
{
    if (pure_methods == NULL || !PyCFunction_Check(callable))
        return NULL;
    PyObject *self = PyCFunction_GET_SELF(callable);
    if (self == NULL || PyModule_Check(self))
        return NULL;
    PyObject *name = PyUnicode_FromString(((PyCFunctionObject *)callable)->m_ml->ml_name);
    if (name == NULL)
        PyErr_Clear();
    return name;
}

static int
callee_kind(PyObject *callable, trace_codeinfo **info_out)
{
    PyObject *fn = PyMethod_Check(callable) ? PyMethod_GET_FUNCTION(callable) : callable;
    if (trace__is_function(fn)) {
        trace_codeinfo *info = trace__codeinfo_get(PyFunction_GET_CODE(fn));
        if (info_out)
            *info_out = info;
        if (info && info->kind == TRACE_FUNCTIONAL)
            return CALLEE_FUNCTIONAL;
        if (info && info->kind == TRACE_SCHEDULED && !info->refused) {
            /* A scheduled callee runs nested: fine when its own graph says it may. */
            if (replay_prepare(fn, info) < 0) {
                PyErr_Clear();
                return CALLEE_OTHER;
            }
            return info->replay && (info->replay->state == REPLAY_READY ||
                                    info->replay->state == REPLAY_SLOWER)
                   ? CALLEE_SCHEDULED : CALLEE_OTHER;
        }
    }
    if (pure_callees != NULL) {
        int found = PySet_Contains(pure_callees, callable);
        if (found < 0) {
            PyErr_Clear();        /* unhashable */
            return CALLEE_OTHER;
        }
        if (found)
            return CALLEE_PURE;
    }
    PyObject *name = builtin_method_name(callable);
    if (name != NULL) {
        PyObject *names = PyDict_GetItemWithError(
            pure_methods, (PyObject *)Py_TYPE(PyCFunction_GET_SELF(callable)));
        int found = names ? PySet_Contains(names, name) : 0;
        Py_DECREF(name);
        if (found < 0 || PyErr_Occurred())
            PyErr_Clear();
        if (found > 0)
            return CALLEE_PURE;
    }
    return CALLEE_OTHER;
}

/* Whether a pure callee's result is always a new object (the call may change it in place). */
static int
makes_new_object(PyObject *callable)
{
    int found = PySet_Contains(new_objects, callable);
    if (found < 0) {
        PyErr_Clear();
        found = 0;
    }
    if (!found) {
        PyObject *name = builtin_method_name(callable);
        if (name != NULL) {
            found = PySet_Contains(new_objects, name) > 0;
            Py_DECREF(name);
        }
        PyErr_Clear();
    }
    return found;
}

static PyObject *
callee_name(PyObject *callable)
{
    PyObject *n = PyObject_GetAttrString(callable, "__qualname__");
    if (n == NULL) {
        PyErr_Clear();
        n = PyUnicode_FromString(Py_TYPE(callable)->tp_name);
    }
    return n;
}

/* The identity of a functional call for reuse after a wrong guess: (callable's address, then
 * per argument its value when it is a plain scalar, else its address when it is a pending value
 * or an immutable tuple of such), or NULL (no exception) when the call cannot be recognised
 * safely. *kept gets the objects named by address, which the pool keeps alive. */
static PyObject *
call_key(PyObject *callable, PyObject *const *args, Py_ssize_t n, PyObject **kept)
{
    PyObject *key = PyTuple_New(n + 1), *objs = PyTuple_New(n + 1);
    if (key == NULL || objs == NULL)
        goto fail;
    PyTuple_SET_ITEM(key, 0, PyLong_FromVoidPtr(callable));
    PyTuple_SET_ITEM(objs, 0, Py_NewRef(callable));
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *v = args[k], *part;
        if (v == Py_None || PyBool_Check(v) || PyLong_CheckExact(v) || PyUnicode_CheckExact(v) ||
            PyBytes_CheckExact(v) || (PyFloat_CheckExact(v) && PyFloat_AS_DOUBLE(v) ==
                                      PyFloat_AS_DOUBLE(v)))
            part = PyTuple_Pack(2, (PyObject *)Py_TYPE(v), v);
        else if (graph_is_task(v))
            part = PyLong_FromVoidPtr(v);
        else
            goto fail;
        if (part == NULL)
            goto fail;
        PyTuple_SET_ITEM(key, k + 1, part);
        PyTuple_SET_ITEM(objs, k + 1, Py_NewRef(v));
    }
    for (Py_ssize_t k = 0; k <= n; k++)
        if (PyTuple_GET_ITEM(key, k) == NULL)
            goto fail;
    *kept = objs;
    return key;
fail:
    Py_XDECREF(key);
    Py_XDECREF(objs);
    PyErr_Clear();
    return NULL;
}

/* A functional call: the pool's task for the same call if a rollback left one, else a new one;
 * noted for reuse while guesses are open. New reference, or NULL + exception. */
static PyObject *
functional_call(run_state *st, PyObject *callable, PyObject *const *args, Py_ssize_t nargs,
                PyObject *kwnames)
{
    PyObject *kept = NULL, *key = NULL, *task = NULL;
    if (kwnames == NULL && (st->ncp > 0 || (st->pool && PyDict_GET_SIZE(st->pool))))
        key = call_key(callable, args, nargs, &kept);
    if (key != NULL && st->pool != NULL) {
        PyObject *entry = PyDict_GetItemWithError(st->pool, key);
        if (entry != NULL) {
            PyObject *t = Py_NewRef(PyTuple_GET_ITEM(entry, 0));
            if (PyDict_DelItem(st->pool, key) < 0) {
                Py_DECREF(t);
                goto error;
            }
            int rc = graph_order_readd(t);
            if (rc < 0) {
                Py_DECREF(t);
                goto error;
            }
            if (rc > 0)
                task = t;
            else {
                PyObject *one = PyList_New(1);
                if (one != NULL) {
                    PyList_SET_ITEM(one, 0, t);
                    graph_forget_tasks(one);
                    Py_DECREF(one);
                }
                else
                    Py_DECREF(t);
            }
        }
        else if (PyErr_Occurred())
            goto error;
    }
    if (task == NULL)
        task = trace__dispatch(callable, args, nargs, kwnames);
    if (task != NULL && key != NULL && st->ncp > 0 && graph_is_task(task)) {
        PyObject *rec = PyTuple_Pack(3, task, key, kept);
        if (rec == NULL || (st->records == NULL && (st->records = PyList_New(0)) == NULL) ||
            PyList_Append(st->records, rec) < 0)
            PyErr_Clear();       /* only the reuse is lost */
        Py_XDECREF(rec);
    }
    Py_XDECREF(key);
    Py_XDECREF(kept);
    return task;
error:
    Py_XDECREF(key);
    Py_XDECREF(kept);
    return NULL;
}

/* A MAP: fn(args from template) for each element of seq. Returns the pending list (new ref) or
 * NULL: exception, or bail (*bailed). */
static PyObject *
run_map(run_state *st, int pc, const rins *i, int *bailed)
{
    struct trace_replay *p = st->p;
    PyObject *callable = st->regs[i->b], *seqv = st->regs[i->c];
    if (callable == NULL || seqv == NULL) {
        *bailed = bail(st, pc, "line %d reads a name that has no value", i->line);
        return NULL;
    }
    PyObject *fn = trace__force(callable);
    if (fn == NULL)
        return NULL;
    trace_codeinfo *info = NULL;
    int kind = callee_kind(fn, &info);
    if (kind == CALLEE_OTHER || kind == CALLEE_SCHEDULED) {
        /* A scheduled callee would run nested, traced when its graph gives up: not here. */
        PyObject *n = callee_name(fn);
        *bailed = bail(st, pc, "line %d calls %S, which is neither functional nor known to be "
                       "pure", i->line, n ? n : Py_None);
        Py_XDECREF(n);
        Py_DECREF(fn);
        return NULL;
    }
    PyObject *seq = trace__force(seqv), *it = NULL, *calls = NULL, *result = NULL;
    if (seq == NULL)
        goto done;
    if (outside_iterator(st, i->c, seq)) {
        *bailed = bail(st, pc, "line %d consumes an iterator it was handed", i->line);
        goto done;
    }
    PyObject *tmpl = PyTuple_GET_ITEM(p->consts, i->d);
    Py_ssize_t ntarget = PyLong_AsSsize_t(PyTuple_GET_ITEM(tmpl, 0));
    PyObject *sources = PyTuple_GET_ITEM(tmpl, 1);
    Py_ssize_t nsrc = PyTuple_GET_SIZE(sources);
    it = PyObject_GetIter(seq);
    calls = PyList_New(0);
    if (it == NULL || calls == NULL)
        goto done;
    PyObject *elem;
    while ((elem = PyIter_Next(it)) != NULL) {
        PyObject *items = NULL;
        if (ntarget > 0) {
            PyObject *e = trace__force(elem);
            items = e ? PySequence_Tuple(e) : NULL;
            Py_XDECREF(e);
            if (items != NULL && PyTuple_GET_SIZE(items) != ntarget) {
                Py_DECREF(items);
                Py_DECREF(elem);
                *bailed = bail(st, pc, "line %d unpacks an element of the wrong length",
                               i->line);
                goto done;
            }
            if (items == NULL) {
                Py_DECREF(elem);
                goto done;
            }
        }
        PyObject *args = PyTuple_New(nsrc);
        for (Py_ssize_t k = 0; args && k < nsrc; k++) {
            PyObject *s = PyTuple_GET_ITEM(sources, k);
            const char *what = PyUnicode_AsUTF8(PyTuple_GET_ITEM(s, 0));
            PyObject *v;
            if (what[0] == 'e')
                v = elem;
            else if (what[0] == 'i')
                v = PyTuple_GET_ITEM(items, PyLong_AsSsize_t(PyTuple_GET_ITEM(s, 1)));
            else if (what[0] == 'r')
                v = st->regs[PyLong_AsSsize_t(PyTuple_GET_ITEM(s, 1))];
            else
                v = PyTuple_GET_ITEM(p->consts, PyLong_AsSsize_t(PyTuple_GET_ITEM(s, 1)));
            if (v == NULL) {
                Py_CLEAR(args);
                Py_XDECREF(items);
                Py_DECREF(elem);
                *bailed = bail(st, pc, "line %d reads a name that has no value", i->line);
                goto done;
            }
            PyTuple_SET_ITEM(args, k, Py_NewRef(v));
        }
        Py_XDECREF(items);
        Py_DECREF(elem);
        if (args == NULL || PyList_Append(calls, args) < 0) {
            Py_XDECREF(args);
            goto done;
        }
        Py_DECREF(args);
    }
    if (PyErr_Occurred())
        goto done;
    S.maps++;
    if (kind == CALLEE_FUNCTIONAL && trace__is_function(fn) && !info->options.threads &&
        PyList_GET_SIZE(calls) > 1) {
        result = graph_submit_map(fn, calls, &info->options);
        goto done;
    }
    /* One call at a time through the dispatcher. */
    result = PyList_New(0);
    for (Py_ssize_t k = 0; result && k < PyList_GET_SIZE(calls); k++) {
        PyObject *args = PyList_GET_ITEM(calls, k);
        PyObject *r = trace__dispatch(fn, &PyTuple_GET_ITEM(args, 0), PyTuple_GET_SIZE(args),
                                      NULL);
        if (r == NULL || PyList_Append(result, r) < 0)
            Py_CLEAR(result);
        Py_XDECREF(r);
    }
done:
    Py_DECREF(fn);
    Py_XDECREF(seq);
    Py_XDECREF(it);
    Py_XDECREF(calls);
    return result;
}

static int replay_execute(PyObject *func, trace_codeinfo *info, PyObject *const *args,
                          Py_ssize_t nargs, PyObject *kwnames, PyObject **result);

/* A nested scheduled call through its graph (self first for a bound method): 0 with *result,
 * -2 bail (it would have traced), -1 exception. */
static int
call_scheduled(run_state *st, int here, PyObject *callable, trace_codeinfo *info,
               PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject **result)
{
    PyObject *fn = callable, *self = NULL;
    if (PyMethod_Check(callable)) {
        fn = PyMethod_GET_FUNCTION(callable);
        self = PyMethod_GET_SELF(callable);
    }
    Py_ssize_t ntotal = nargs + (kwnames ? PyTuple_GET_SIZE(kwnames) : 0);
    PyObject *small[9], **argv = (PyObject **)args;
    if (self != NULL) {
        argv = ntotal < 9 ? small : PyMem_Malloc((ntotal + 1) * sizeof(PyObject *));
        if (argv == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        argv[0] = self;
        memcpy(argv + 1, args, ntotal * sizeof(PyObject *));
    }
    int rc = replay_mode == 0 ? 0
             : replay_execute(fn, info, argv, nargs + (self != NULL), kwnames, result);
    if (argv != args && argv != small)
        PyMem_Free(argv);
    if (rc == 1)
        return 0;
    if (rc < 0)
        return failed(st, here, "a scheduled call");
    PyObject *reason = info->replay ? info->replay->reason : NULL;
    return bail(st, here, "line %d calls scheduled %U, whose graph gave up (%S)",
                st->p->code[here].line, ((PyFunctionObject *)fn)->func_qualname,
                reason ? reason : Py_None);
}

/* ---- the operations ------------------------------------------------------------------------ */

/* One function per operation (or pair of operations), called by the interpreter's switch
 * (exec_one) and by the compiled tier's code (jit/jit.c), so the two tiers cannot differ. Each
 * executes instruction i, which is at *pc, and moves *pc on. 0: go on; 1: returned (*pc is the
 * RETURN); -1: exception to propagate; -2: bail. With guessing 0 no branch guesses (a condition
 * being checked). */

/* What every operation begins with: its registers, its position, the location its tasks are
 * reported at; *pc moves past it (a jump moves it again). */
#define OP_BEGIN()                                                                             \
    struct trace_replay *p = st->p;                                                            \
    PyObject **R = st->regs;                                                                   \
    int here = *pc;                                                                            \
    int slice_of = guessing ? -2 : -1;             /* -2: computed on demand */                \
    (void)p, (void)R, (void)slice_of;                                                          \
    graph_set_location(p->filename, i->line);                                                  \
    *pc = here + 1
#define SLICE() (slice_of == -2 ? (slice_of = slice_owner(p, here)) : slice_of)
#define READ(dst, r, deep)                                                                     \
    do {                                                                                       \
        NEED(r);                                                                               \
        dst = operand(st, pc, R[r], deep, guessing ? SLICE() : -1);                            \
        if (dst == NULL) {                                                                     \
            if (PyErr_Occurred())                                                              \
                return failed(st, here, rop_names[i->op]);                                     \
            return 0;                         /* guessed: *pc is the branch's way */           \
        }                                                                                      \
    } while (0)
#define NEED(r)                                                                              \
    do {                                                                                       \
        if (R[r] == NULL)                                                                      \
            return bail(st, here, "line %d reads a name that has no value", i->line);         \
    } while (0)

static int
op_arg(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    return 0;                             /* bound before the run */
}

static int
op_const(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    set_reg(st, i->a, Py_NewRef(PyTuple_GET_ITEM(p->consts, i->b)), OUTSIDE);
    return 0;
}

static int
op_global(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    PyObject *name = PyTuple_GET_ITEM(p->names, i->b);
    PyObject *v = PyDict_GetItemWithError(st->globals, name);
    if (v == NULL && !PyErr_Occurred()) {
        if (PyDict_Check(st->builtins))
            v = PyDict_GetItemWithError(st->builtins, name);
        else {
            v = PyObject_GetItem(st->builtins, name);
            if (v == NULL && PyErr_ExceptionMatches(PyExc_KeyError))
                PyErr_Clear();
            Py_XDECREF(v);        /* the builtins module's dict keeps it */
        }
    }
    if (v == NULL) {
        if (PyErr_Occurred())
            return failed(st, here, "a global lookup");
        return bail(st, here, "line %d reads %U, which is not defined", i->line, name);
    }
    set_reg(st, i->a, Py_NewRef(v), OUTSIDE);
    return 0;
}

static int
op_move(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    NEED(i->b);
    set_reg(st, i->a, Py_NewRef(R[i->b]), st->taint[i->b]);
    return 0;
}

static int
op_binop(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    NEED(i->b);
    NEED(i->c);
    PyObject *x, *y;
    int inplace = i->op == R_INPLACE;
    /* list + list, tuple + tuple, list += iterable: moves (the items stay pending). */
    int concat = i->d == 0 && ((PyList_CheckExact(R[i->b]) &&
                                (inplace || PyList_CheckExact(R[i->c]))) ||
                               (PyTuple_CheckExact(R[i->b]) && PyTuple_CheckExact(R[i->c])));
    if (concat) {
        x = Py_NewRef(R[i->b]);
        if (inplace && PyList_CheckExact(x))
            READ(y, i->c, 0);
        else
            y = Py_NewRef(R[i->c]);
    }
    else {
        READ(x, i->b, 1);
        PyObject *yy = operand(st, pc, R[i->c], 1, guessing ? SLICE() : -1);
        if (yy == NULL) {
            Py_DECREF(x);
            if (PyErr_Occurred())
                return failed(st, here, rop_names[i->op]);
            return 0;
        }
        y = yy;
    }
    if (inplace && !immutable(x) && st->taint[i->b] != FRESH) {
        Py_DECREF(x);
        Py_DECREF(y);
        return bail(st, here, "line %d changes in place an object the call did not make",
                    i->line);
    }
    if (inplace && !immutable(x) && !concat && st->ncp > 0) {
        /* A change in place cannot be undone: the guesses are checked first. */
        Py_DECREF(x);
        Py_DECREF(y);
        int rc = settle_all(st, pc);
        if (rc < 0)
            return -1;
        if (rc == 0)
            *pc = here;           /* all held: do it again, without guesses open */
        return 0;
    }
    PyObject *r = binop_fn(i->d, x, y, inplace);
    /* A new object, unless the operator handed back an operand. */
    uint8_t taint = r == x ? st->taint[i->b] : r == y ? st->taint[i->c] : FRESH;
    Py_DECREF(x);
    Py_DECREF(y);
    if (r == NULL)
        return failed(st, here, "an operator");
    set_reg(st, i->a, r, taint);
    return 0;
}

static int
op_unary(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    PyObject *x;
    READ(x, i->b, i->op == R_UNARY);
    PyObject *r;
    if (i->op == R_NOT) {
        int t = PyObject_Not(x);
        r = t < 0 ? NULL : Py_NewRef(t ? Py_True : Py_False);
    }
    else
        r = i->c == 0 ? PyNumber_Negative(x) : i->c == 1 ? PyNumber_Positive(x)
                                                         : PyNumber_Invert(x);
    Py_DECREF(x);
    if (r == NULL)
        return failed(st, here, "an operator");
    set_reg(st, i->a, r, FRESH);
    return 0;
}

static int
op_compare(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    int identity = i->d == 6 || i->d == 7;
    PyObject *x, *y;
    READ(x, i->b, !identity);
    NEED(i->c);
    y = operand(st, pc, R[i->c], !identity, guessing ? SLICE() : -1);
    if (y == NULL) {
        Py_DECREF(x);
        if (PyErr_Occurred())
            return failed(st, here, "a comparison");
        return 0;
    }
    PyObject *r = compare(i->d, x, y);
    Py_DECREF(x);
    Py_DECREF(y);
    if (r == NULL)
        return failed(st, here, "a comparison");
    set_reg(st, i->a, r, FRESH);
    return 0;
}

static int
op_getitem(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    PyObject *c, *k;
    READ(c, i->b, 0);
    NEED(i->c);
    k = operand(st, pc, R[i->c], 1, guessing ? SLICE() : -1);
    if (k == NULL) {
        Py_DECREF(c);
        if (PyErr_Occurred())
            return failed(st, here, "a subscript");
        return 0;
    }
    PyObject *r = PyObject_GetItem(c, k);
    Py_DECREF(c);
    Py_DECREF(k);
    if (r == NULL)
        return failed(st, here, "a subscript");
    set_reg(st, i->a, r, OUTSIDE);
    return 0;
}

static int
op_getattr(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    PyObject *o;
    READ(o, i->b, 0);
    PyObject *r = PyObject_GetAttr(o, PyTuple_GET_ITEM(p->names, i->c));
    Py_DECREF(o);
    if (r == NULL)
        return failed(st, here, "an attribute lookup");
    set_reg(st, i->a, r, OUTSIDE);
    return 0;
}

static int
op_build_sequence(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    PyObject *r = i->op == R_BUILD_LIST ? PyList_New(i->c) : PyTuple_New(i->c);
    if (r == NULL)
        return failed(st, here, "building a container");
    for (int k = 0; k < i->c; k++) {
        PyObject *v = R[i->b + k];
        if (v == NULL) {
            Py_DECREF(r);
            return bail(st, here, "line %d reads a name that has no value", i->line);
        }
        if (i->op == R_BUILD_LIST)
            PyList_SET_ITEM(r, k, Py_NewRef(v));
        else
            PyTuple_SET_ITEM(r, k, Py_NewRef(v));
    }
    set_reg(st, i->a, r, FRESH);
    return 0;
}

static int
op_build_dict(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    PyObject *r = PyDict_New();
    if (r == NULL)
        return failed(st, here, "building a dict");
    for (int k = 0; k < i->c; k++) {
        PyObject *kv = R[i->b + 2 * k], *vv = R[i->b + 2 * k + 1];
        if (kv == NULL || vv == NULL) {
            Py_DECREF(r);
            return bail(st, here, "line %d reads a name that has no value", i->line);
        }
        PyObject *key = trace__force_deep(kv);
        if (key == NULL || PyDict_SetItem(r, key, vv) < 0) {
            Py_XDECREF(key);
            Py_DECREF(r);
            return failed(st, here, "building a dict");
        }
        Py_DECREF(key);
    }
    set_reg(st, i->a, r, FRESH);
    return 0;
}

static int
op_build_slice(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    PyObject *part[3] = {NULL, NULL, NULL};
    int regs[3] = {i->b, i->c, i->d};
    for (int k = 0; k < 3; k++) {
        if (regs[k] < 0)
            continue;
        if (R[regs[k]] == NULL || (part[k] = trace__force_deep(R[regs[k]])) == NULL) {
            for (int j = 0; j < k; j++)
                Py_XDECREF(part[j]);
            if (R[regs[k]] == NULL)
                return bail(st, here, "line %d reads a name that has no value", i->line);
            return failed(st, here, "a slice");
        }
    }
    PyObject *r = PySlice_New(part[0], part[1], part[2]);
    for (int k = 0; k < 3; k++)
        Py_XDECREF(part[k]);
    if (r == NULL)
        return failed(st, here, "a slice");
    set_reg(st, i->a, r, FRESH);
    return 0;
}

static int
op_append(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    NEED(i->a);
    NEED(i->b);
    if (!PyList_CheckExact(R[i->a]) || st->taint[i->a] != FRESH)
        return bail(st, here, "line %d appends to something else than a list it made",
                    i->line);
    if (note_append(st, R[i->a]) < 0 || PyList_Append(R[i->a], R[i->b]) < 0)
        return failed(st, here, "an append");
    return 0;
}

static int
op_call(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    NEED(i->b);
    const rins *kw = &p->code[here + 1];
    PyObject *kwnames = kw->a >= 0 ? PyTuple_GET_ITEM(p->consts, kw->a) : NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0, total = i->d + nkw;
    *pc = here + 2;
    for (Py_ssize_t k = 0; k < total; k++)
        NEED(i->c + k);
    PyObject *callable = trace__force(R[i->b]);
    if (callable == NULL)
        return failed(st, here, "a call");
    trace_codeinfo *info = NULL;
    int kind = callee_kind(callable, &info);
    if (kind == CALLEE_OTHER) {
        PyObject *n = callee_name(callable);
        int rc = bail(st, here, "line %d calls %S, which is neither functional nor known to "
                      "be pure", i->line, n ? n : Py_None);
        Py_XDECREF(n);
        Py_DECREF(callable);
        return rc;
    }
    PyObject *r = NULL;
    uint8_t taint = FRESH;
    if (kind == CALLEE_FUNCTIONAL) {
        r = functional_call(st, callable, &R[i->c], i->d, kwnames);
        /* A thread task may hand back what it was given. */
        taint = info && info->options.threads ? OUTSIDE : FRESH;
    }
    else if (kind == CALLEE_SCHEDULED) {
        /* Nested, through its own graph: it must replay too (its trace would run under no
         * frame of ours), else this call gives up. */
        int rc = call_scheduled(st, here, callable, info, &R[i->c], i->d, kwnames, &r);
        Py_DECREF(callable);
        if (rc != 0)
            return rc;
        set_reg(st, i->a, r, OUTSIDE);
        return 0;
    }
    else {
        for (Py_ssize_t k = 0; k < total; k++)
            if (outside_iterator(st, i->c + k, R[i->c + k])) {
                Py_DECREF(callable);
                return bail(st, here, "line %d hands on an iterator it was handed", i->line);
            }
        if (nkw) {
            int has_out = PySequence_Contains(kwnames, str_out);
            if (has_out != 0) {
                Py_DECREF(callable);
                if (has_out < 0)
                    return failed(st, here, "a call");
                return bail(st, here, "line %d passes out=: the callee writes into it",
                            i->line);
            }
        }
        r = trace__dispatch(callable, &R[i->c], i->d, kwnames);
        if (r != NULL) {
            taint = makes_new_object(callable) ? FRESH : OUTSIDE;
            if (PyIter_Check(r))
                taint = WRAPS;     /* zip(), enumerate(), ...: made here, over no iterator
                                    * of the caller's (checked above) */
            for (Py_ssize_t k = 0; k < total; k++)
                if (r == R[i->c + k])
                    taint = st->taint[i->c + k];
        }
    }
    Py_DECREF(callable);
    if (r == NULL)
        return failed(st, here, "a call");
    set_reg(st, i->a, r, taint);
    return 0;
}

static int
op_kwnames(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    return 0;
}

static int
op_iter(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    PyObject *x;
    READ(x, i->b, 0);
    if (outside_iterator(st, i->b, x)) {
        Py_DECREF(x);
        return bail(st, here, "line %d consumes an iterator it was handed", i->line);
    }
    PyObject *it = PyObject_GetIter(x);
    Py_DECREF(x);
    PyObject *r = it ? cursor_new(it) : NULL;
    if (r == NULL)
        return failed(st, here, "iter()");
    set_reg(st, i->a, r, st->taint[i->b] == FRESH ? FRESH : WRAPS);
    return 0;
}

static int
op_for(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    NEED(i->b);
    PyObject *v = Py_IS_TYPE(R[i->b], &cursor_type)
                  ? cursor_next((cursor *)R[i->b], st->ncp > 0) : PyIter_Next(R[i->b]);
    if (v == NULL) {
        if (PyErr_Occurred())
            return failed(st, here, "a loop step");
        *pc = i->c;
        return 0;
    }
    set_reg(st, i->a, v, OUTSIDE);
    return 0;
}

static int
op_jump(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    *pc = i->a;
    return 0;
}

static int
op_branch(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    NEED(i->a);
    if (guessing && st->ncp > 0) {
        int rc = settle_arrived(st, pc);
        if (rc != 0)
            return rc < 0 ? -1 : 0;       /* a wrong guess was found: *pc moved */
    }
    PyObject *x;
    int own = guessing && may_guess(st, here) ? here : -1;
    x = operand(st, pc, R[i->a], 0, own);
    if (x == NULL) {
        if (PyErr_Occurred())
            return failed(st, here, "a truth test");
        return 0;
    }
    if (st->nospec_pc == here)
        st->nospec_pc = -1;
    int t = PyObject_IsTrue(x);
    Py_DECREF(x);
    if (t < 0)
        return failed(st, here, "a truth test");
    p->sites[i->c].last = (int8_t)t;
    if ((i->op == R_IF_FALSE) != t)
        *pc = i->b;
    return 0;
}

static int
op_unpack(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    PyObject *x;
    READ(x, i->b, 0);
    if (outside_iterator(st, i->b, x)) {
        Py_DECREF(x);
        return bail(st, here, "line %d consumes an iterator it was handed", i->line);
    }
    PyObject *t = PySequence_Tuple(x);
    Py_DECREF(x);
    if (t == NULL)
        return failed(st, here, "unpacking");
    if (PyTuple_GET_SIZE(t) != i->c) {
        Py_DECREF(t);
        return bail(st, here, "line %d unpacks the wrong number of values", i->line);
    }
    for (int k = 0; k < i->c; k++)
        set_reg(st, i->a + k, Py_NewRef(PyTuple_GET_ITEM(t, k)), OUTSIDE);
    Py_DECREF(t);
    return 0;
}

static int
op_return(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    NEED(i->a);
    *pc = here;
    return 1;
}

static int
op_bail(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    return bail(st, here, "%U: the trace raises what plain Python raises",
                PyTuple_GET_ITEM(p->consts, i->a));
}

static int
op_store(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    /* Into a list, dict or set the call made: it cannot be undone, so guesses are checked
     * first. */
    NEED(i->a);
    NEED(i->b);
    if (i->op == R_STORE_ITEM)
        NEED(i->c);
    if (st->taint[i->a] != FRESH)
        return bail(st, here, "line %d changes a container the call did not make", i->line);
    if (st->ncp > 0) {
        int rc = settle_all(st, pc);
        if (rc < 0)
            return -1;
        if (rc == 0)
            *pc = here;
        return 0;
    }
    PyObject *c = trace__force(R[i->a]);
    if (c == NULL)
        return failed(st, here, "a store");
    int rc;
    if (i->op == R_SET_ADD) {
        PyObject *v = PyAnySet_Check(c) ? trace__force_deep(R[i->b]) : NULL;
        if (v == NULL && !PyErr_Occurred()) {
            Py_DECREF(c);
            return bail(st, here, "line %d adds to something else than a set it made",
                        i->line);
        }
        rc = v ? PySet_Add(c, v) : -1;
        Py_XDECREF(v);
    }
    else {
        PyObject *k = trace__force_deep(R[i->b]);
        /* Into an exact list or dict a pending value is moved; elsewhere it is read. */
        PyObject *v = !k ? NULL : (PyList_CheckExact(c) || PyDict_CheckExact(c))
                                  ? Py_NewRef(R[i->c]) : trace__force_deep(R[i->c]);
        rc = k && v ? PyObject_SetItem(c, k, v) : -1;
        Py_XDECREF(k);
        Py_XDECREF(v);
    }
    Py_DECREF(c);
    return rc < 0 ? failed(st, here, "a store") : 0;
}

static int
op_extend(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    NEED(i->a);
    NEED(i->b);
    if (!PyList_CheckExact(R[i->a]) || st->taint[i->a] != FRESH)
        return bail(st, here, "line %d extends something else than a list it made",
                    i->line);
    PyObject *items = trace__force(R[i->b]);
    if (items == NULL)
        return failed(st, here, "extend()");
    if (outside_iterator(st, i->b, items)) {
        Py_DECREF(items);
        return bail(st, here, "line %d consumes an iterator it was handed", i->line);
    }
    int rc = note_append(st, R[i->a]);
    PyObject *r = rc < 0 ? NULL : PySequence_InPlaceConcat(R[i->a], items);
    Py_DECREF(items);
    if (r == NULL)
        return failed(st, here, "extend()");
    Py_DECREF(r);
    return 0;
}

static int
op_build_set(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    PyObject *r = PySet_New(NULL);
    if (r == NULL)
        return failed(st, here, "building a set");
    for (int k = 0; k < i->c; k++) {
        if (R[i->b + k] == NULL) {
            Py_DECREF(r);
            return bail(st, here, "line %d reads a name that has no value", i->line);
        }
        PyObject *v = trace__force_deep(R[i->b + k]);
        if (v == NULL || PySet_Add(r, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(r);
            return failed(st, here, "building a set");
        }
        Py_DECREF(v);
    }
    set_reg(st, i->a, r, FRESH);
    return 0;
}

static int
op_format(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    PyObject *v, *spec = NULL;
    READ(v, i->b, 1);
    if (i->d >= 0) {
        NEED(i->d);
        spec = trace__force_deep(R[i->d]);
        if (spec == NULL) {
            Py_DECREF(v);
            return failed(st, here, "a format");
        }
    }
    PyObject *conv = i->c == 's' ? PyObject_Str(v) : i->c == 'r' ? PyObject_Repr(v)
                     : i->c == 'a' ? PyObject_ASCII(v) : Py_NewRef(v);
    Py_DECREF(v);
    PyObject *r = conv ? PyObject_Format(conv, spec) : NULL;
    Py_XDECREF(conv);
    Py_XDECREF(spec);
    if (r == NULL)
        return failed(st, here, "a format");
    set_reg(st, i->a, r, FRESH);
    return 0;
}

static int
op_build_string(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    PyObject *parts = PyTuple_New(i->c);
    if (parts == NULL)
        return failed(st, here, "an f-string");
    for (int k = 0; k < i->c; k++) {
        PyObject *v = R[i->b + k];
        if (v == NULL || !PyUnicode_Check(v)) {
            Py_DECREF(parts);
            return bail(st, here, "line %d joins something that is not a str", i->line);
        }
        PyTuple_SET_ITEM(parts, k, Py_NewRef(v));
    }
    PyObject *empty = PyUnicode_New(0, 0);
    PyObject *r = empty ? PyUnicode_Join(empty, parts) : NULL;
    Py_XDECREF(empty);
    Py_DECREF(parts);
    if (r == NULL)
        return failed(st, here, "an f-string");
    set_reg(st, i->a, r, FRESH);
    return 0;
}

static int
op_deref(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    PyObject *closure = PyFunction_GET_CLOSURE(st->func);
    if (closure == NULL || i->b >= PyTuple_GET_SIZE(closure))
        return bail(st, here, "line %d reads a free variable the function does not have",
                    i->line);
    PyObject *v = PyCell_GET(PyTuple_GET_ITEM(closure, i->b));
    if (v == NULL)
        return bail(st, here, "line %d reads a free variable that has no value", i->line);
    set_reg(st, i->a, Py_NewRef(v), OUTSIDE);
    return 0;
}

static int
op_map(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    int bailed = 0;
    PyObject *r = run_map(st, here, i, &bailed);
    if (r == NULL)
        return bailed ? bailed : failed(st, here, "a map");
    set_reg(st, i->a, r, FRESH);
    return 0;
}

#undef READ
#undef NEED
#undef SLICE
#undef OP_BEGIN

typedef int (*op_fn)(run_state *st, int *pc, const rins *i, int guessing);

/* The operations by number: what the compiled tier calls (rop_names gives their names). */
static const op_fn op_table[R_NOPS] = {
    [R_ARG] = op_arg,
    [R_CONST] = op_const,
    [R_GLOBAL] = op_global,
    [R_MOVE] = op_move,
    [R_BINOP] = op_binop,
    [R_INPLACE] = op_binop,
    [R_UNARY] = op_unary,
    [R_NOT] = op_unary,
    [R_COMPARE] = op_compare,
    [R_GETITEM] = op_getitem,
    [R_GETATTR] = op_getattr,
    [R_BUILD_LIST] = op_build_sequence,
    [R_BUILD_TUPLE] = op_build_sequence,
    [R_BUILD_DICT] = op_build_dict,
    [R_BUILD_SLICE] = op_build_slice,
    [R_APPEND] = op_append,
    [R_CALL] = op_call,
    [R_KWNAMES] = op_kwnames,
    [R_ITER] = op_iter,
    [R_FOR] = op_for,
    [R_JUMP] = op_jump,
    [R_IF_FALSE] = op_branch,
    [R_IF_TRUE] = op_branch,
    [R_UNPACK] = op_unpack,
    [R_RETURN] = op_return,
    [R_BAIL] = op_bail,
    [R_STORE_ITEM] = op_store,
    [R_SET_ADD] = op_store,
    [R_EXTEND] = op_extend,
    [R_BUILD_SET] = op_build_set,
    [R_FORMAT] = op_format,
    [R_BUILD_STRING] = op_build_string,
    [R_DEREF] = op_deref,
    [R_MAP] = op_map,
};

/* ---- the compiled tier ------------------------------------------------------------------------ */

static uint64_t thread_cpu_ns(void);
static uint64_t median3(const uint64_t *v, int n);

/* p's program as jit/ takes it: per instruction its operation, its address, and where control
 * goes when nothing unusual happens (a guess, a rollback or a check goes through the compiled
 * function's switch instead). NULL + exception, or the handle. */
static jit_graph *
jit_submit(struct trace_replay *p, int wait)
{
    jit_step *steps = PyMem_Malloc((size_t)p->ncode * sizeof(jit_step));
    if (steps == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (int pc = 0; pc < p->ncode; pc++) {
        const rins *i = &p->code[pc];
        jit_step *s = &steps[pc];
        s->op = i->op;
        s->ins = i;
        s->next = pc + 1;
        s->alt = -1;
        switch (i->op) {
        case R_CALL: s->next = pc + 2; break;             /* over its KWNAMES */
        case R_JUMP: s->next = i->a; break;
        case R_IF_FALSE: case R_IF_TRUE: s->alt = i->b; break;
        case R_FOR: s->alt = i->c; break;
        case R_RETURN: case R_BAIL: s->next = -1; break;  /* they end the run */
        }
    }
    jit_graph *g = jit_graph_submit(steps, p->ncode, wait);
    PyMem_Free(steps);
    return g;
}

/* The compiled function of p's graph when it is ready and not slower than the interpreter, else
 * NULL (interpreted). A graph that has become hot is handed to the compile thread here; the call
 * does not wait for it (unless the tier is "always"). While the two tiers are compared, *timed
 * says which one this call's run is timed for (0 interpreted, 1 compiled; else -1). */
static jit_graph_fn
compiled_for(struct trace_replay *p, int *timed)
{
    *timed = -1;
    if (jit_mode == 0)
        return NULL;
    if (p->jit == NULL) {
        if ((jit_mode == 1 && p->hits < (uint64_t)jit_after) || p->ncode > jit_max)
            return NULL;
        if ((p->jit = jit_submit(p, jit_mode == 2)) == NULL) {
            PyErr_Clear();              /* out of memory: interpreted, and tried again later */
            return NULL;
        }
    }
    jit_graph_fn fn = jit_graph_ready(p->jit);
    if (fn == NULL || jit_mode == 2 || p->tier_verdict > 0)
        return fn;
    if (p->tier_verdict < 0)
        return NULL;
    *timed = p->ntier_cpu[0] <= p->ntier_cpu[1] ? 0 : 1;
    return *timed ? fn : NULL;
}

/* A timed run of the comparison between the tiers (see compiled_for) took ns. */
static void
tier_timed(struct trace_replay *p, int timed, uint64_t ns)
{
    if (p->ntier_cpu[timed] < COMPARE_CALLS)
        p->tier_cpu[timed][p->ntier_cpu[timed]++] = ns;
    if (p->ntier_cpu[0] < COMPARE_CALLS || p->ntier_cpu[1] < COMPARE_CALLS)
        return;
    p->tier_ns[0] = median3(p->tier_cpu[0], COMPARE_CALLS);
    p->tier_ns[1] = median3(p->tier_cpu[1], COMPARE_CALLS);
    p->tier_verdict = p->tier_ns[1] < p->tier_ns[0] ? 1 : -1;
}

/* The operations for the compiled tier, by number, as jit/ calls them (the pointer types differ
 * only in naming the state and instruction types; jit/ never calls them from C). */
static jit_op_fn jit_ops[R_NOPS];

/* Execute the instruction at *pc (the interpreter's step; as the operations above). */
static int
exec_one(run_state *st, int *pc, int guessing)
{
    const rins *i = &st->p->code[*pc];
    switch (i->op) {
    case R_ARG: return op_arg(st, pc, i, guessing);
    case R_CONST: return op_const(st, pc, i, guessing);
    case R_GLOBAL: return op_global(st, pc, i, guessing);
    case R_MOVE: return op_move(st, pc, i, guessing);
    case R_BINOP: return op_binop(st, pc, i, guessing);
    case R_INPLACE: return op_binop(st, pc, i, guessing);
    case R_UNARY: return op_unary(st, pc, i, guessing);
    case R_NOT: return op_unary(st, pc, i, guessing);
    case R_COMPARE: return op_compare(st, pc, i, guessing);
    case R_GETITEM: return op_getitem(st, pc, i, guessing);
    case R_GETATTR: return op_getattr(st, pc, i, guessing);
    case R_BUILD_LIST: return op_build_sequence(st, pc, i, guessing);
    case R_BUILD_TUPLE: return op_build_sequence(st, pc, i, guessing);
    case R_BUILD_DICT: return op_build_dict(st, pc, i, guessing);
    case R_BUILD_SLICE: return op_build_slice(st, pc, i, guessing);
    case R_APPEND: return op_append(st, pc, i, guessing);
    case R_CALL: return op_call(st, pc, i, guessing);
    case R_KWNAMES: return op_kwnames(st, pc, i, guessing);
    case R_ITER: return op_iter(st, pc, i, guessing);
    case R_FOR: return op_for(st, pc, i, guessing);
    case R_JUMP: return op_jump(st, pc, i, guessing);
    case R_IF_FALSE: return op_branch(st, pc, i, guessing);
    case R_IF_TRUE: return op_branch(st, pc, i, guessing);
    case R_UNPACK: return op_unpack(st, pc, i, guessing);
    case R_RETURN: return op_return(st, pc, i, guessing);
    case R_BAIL: return op_bail(st, pc, i, guessing);
    case R_STORE_ITEM: return op_store(st, pc, i, guessing);
    case R_SET_ADD: return op_store(st, pc, i, guessing);
    case R_EXTEND: return op_extend(st, pc, i, guessing);
    case R_BUILD_SET: return op_build_set(st, pc, i, guessing);
    case R_FORMAT: return op_format(st, pc, i, guessing);
    case R_BUILD_STRING: return op_build_string(st, pc, i, guessing);
    case R_DEREF: return op_deref(st, pc, i, guessing);
    case R_MAP: return op_map(st, pc, i, guessing);
    }
    graph_set_location(st->p->filename, i->line);
    return bail(st, *pc, "unknown operation %d", i->op);
}

static PyObject *
binop_fn(int op, PyObject *x, PyObject *y, int inplace)
{
    switch (op) {
    case 0: return inplace ? PyNumber_InPlaceAdd(x, y) : PyNumber_Add(x, y);
    case 1: return inplace ? PyNumber_InPlaceSubtract(x, y) : PyNumber_Subtract(x, y);
    case 2: return inplace ? PyNumber_InPlaceMultiply(x, y) : PyNumber_Multiply(x, y);
    case 3: return inplace ? PyNumber_InPlaceTrueDivide(x, y) : PyNumber_TrueDivide(x, y);
    case 4: return inplace ? PyNumber_InPlaceFloorDivide(x, y) : PyNumber_FloorDivide(x, y);
    case 5: return inplace ? PyNumber_InPlaceRemainder(x, y) : PyNumber_Remainder(x, y);
    case 6: return inplace ? PyNumber_InPlacePower(x, y, Py_None) : PyNumber_Power(x, y, Py_None);
    case 7: return inplace ? PyNumber_InPlaceLshift(x, y) : PyNumber_Lshift(x, y);
    case 8: return inplace ? PyNumber_InPlaceRshift(x, y) : PyNumber_Rshift(x, y);
    case 9: return inplace ? PyNumber_InPlaceOr(x, y) : PyNumber_Or(x, y);
    case 10: return inplace ? PyNumber_InPlaceXor(x, y) : PyNumber_Xor(x, y);
    case 11: return inplace ? PyNumber_InPlaceAnd(x, y) : PyNumber_And(x, y);
    case 12: return inplace ? PyNumber_InPlaceMatrixMultiply(x, y) : PyNumber_MatrixMultiply(x, y);
    }
    PyErr_SetString(PyExc_SystemError, "pydron: unknown binary operator");
    return NULL;
}

static PyObject *
compare(int op, PyObject *x, PyObject *y)
{
    static const int rich[6] = {Py_LT, Py_LE, Py_EQ, Py_NE, Py_GT, Py_GE};
    if (op < 6)
        return PyObject_RichCompare(x, y, rich[op]);
    if (op == 6 || op == 7)
        return Py_NewRef((x == y) == (op == 6) ? Py_True : Py_False);
    int in = PySequence_Contains(y, x);
    if (in < 0)
        return NULL;
    return Py_NewRef((in != 0) == (op == 8) ? Py_True : Py_False);
}

/* Bind the call's arguments to the parameters: positionals, keywords by name, defaults.
 * 1 bound; 0 not a call the graph takes (the trace raises the TypeError). */
static int
bind(struct trace_replay *p, PyObject *func, PyObject *const *args, Py_ssize_t nargs,
     PyObject *kwnames, PyObject **bound)
{
    if (nargs > p->nargs)
        return 0;
    for (int k = 0; k < p->nargs; k++)
        bound[k] = k < nargs ? args[k] : NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, k);
        int at = -1;
        for (int j = 0; j < p->nargs && at < 0; j++) {
            int eq = PyUnicode_Compare(name, PyTuple_GET_ITEM(p->argnames, j));
            if (eq == -1 && PyErr_Occurred()) {
                PyErr_Clear();
                return 0;
            }
            if (eq == 0)
                at = j;
        }
        if (at < 0 || bound[at] != NULL)
            return 0;
        bound[at] = args[nargs + k];
    }
    PyObject *defaults = PyFunction_GET_DEFAULTS(func);
    Py_ssize_t ndef = defaults ? PyTuple_GET_SIZE(defaults) : 0;
    for (int k = 0; k < p->nargs; k++) {
        if (bound[k] != NULL)
            continue;
        Py_ssize_t d = k - (p->nargs - ndef);
        if (d < 0)
            return 0;
        bound[k] = PyTuple_GET_ITEM(defaults, d);
    }
    return 1;
}

/* Run the program: 1 returned (*result), -1 exception, -2 bail (st->bail_reason). */
static int
run(run_state *st, PyObject **result)
{
    int pc = 0, rc = 0;
    for (;;) {
        if (st->compiled != NULL) {
            /* Runs on until an operation says otherwise, as the loop below would. */
            rc = st->compiled(st, &pc);
            if (rc == JIT_UNKNOWN_PC)
                rc = exec_one(st, &pc, 1);
        }
        else
            rc = exec_one(st, &pc, 1);
        if (rc == 0)
            continue;
        if (rc == 1) {
            if (st->ncp == 0) {
                *result = Py_NewRef(st->regs[st->p->code[pc].a]);
                return 1;
            }
            /* Every guess is checked before the call returns. */
            int settled = settle_all(st, &pc);
            if (settled < 0)
                return -1;
            if (settled == 0) {
                *result = Py_NewRef(st->regs[st->p->code[pc].a]);
                return 1;
            }
            continue;
        }
        if (rc == -2 && st->ncp > 0) {
            /* A bail on a path taken by a guess may be the guess's fault. */
            int settled = settle_all(st, &pc);
            if (settled < 0)
                return -1;
            if (settled > 0)
                continue;
        }
        return rc;
    }
}

static void
state_clear(run_state *st)
{
    if (st->pool != NULL) {
        /* Taken back by a rollback and not made again: not wanted. */
        PyObject *drop = PyList_New(0), *key, *entry;
        Py_ssize_t pos = 0;
        while (drop && PyDict_Next(st->pool, &pos, &key, &entry))
            if (PyList_Append(drop, PyTuple_GET_ITEM(entry, 0)) < 0)
                Py_CLEAR(drop);
        if (drop != NULL) {
            graph_forget_tasks(drop);
            Py_DECREF(drop);
        }
        PyErr_Clear();
        Py_CLEAR(st->pool);
    }
    Py_CLEAR(st->records);
    while (st->ncp > 0)
        checkpoint_clear(&st->cp[--st->ncp], st->p->nregs);
    for (Py_ssize_t u = 0; u < st->nundo; u++)
        Py_DECREF(st->undo[u].list);
    PyMem_Free(st->undo);
    for (int r = 0; r < st->p->nregs; r++)
        Py_XDECREF(st->regs[r]);
    PyMem_Free(st->regs);
    PyMem_Free(st->taint);
    Py_XDECREF(st->bail_reason);
}

/* ---- entering a call --------------------------------------------------------------------------- */

static int replay_load_helpers(void);
static int refresh_pure_tables(void);
static int take_lifted(struct trace_replay *p, PyObject *t);

/* The first call of fn in this process: its graph from the disk cache (pydron/_graph_cache.py)
 * when a process before this one made it, so that this call replays at once. 0 (found or not),
 * or -1 + exception. */
static int
replay_from_disk(PyObject *fn, trace_codeinfo *info)
{
    if (replay_load_helpers() < 0)
        return -1;
    PyObject *t = PyObject_CallOneArg(cached_fn, fn);
    if (t == NULL)
        return -1;
    if (t == Py_None) {
        Py_DECREF(t);
        return 0;
    }
    S.disk_hits++;
    if (refresh_pure_tables() < 0) {
        Py_DECREF(t);
        return -1;
    }
    return take_lifted(info->replay, t);
}

/* What lift_for_core (or the disk cache) gave: a program, or a str saying why there is none.
 * Steals t. 0, or -1 + exception. */
static int
take_lifted(struct trace_replay *p, PyObject *t)
{
    if (PyUnicode_Check(t)) {
        p->state = REPLAY_REFUSED;
        Py_XSETREF(p->reason, t);
        S.refusals++;
        return 0;
    }
    int rc = program_load(p, t);
    Py_DECREF(t);
    if (rc < 0) {
        /* Our own lifter made something the interpreter cannot trust: say so, trace on. */
        PyObject *exc = PyErr_GetRaisedException();
        p->state = REPLAY_REFUSED;
        Py_XSETREF(p->reason, PyObject_Str(exc));
        Py_XDECREF(exc);
        if (p->reason == NULL)
            PyErr_Clear();
        S.refusals++;
        return 0;
    }
    p->state = REPLAY_READY;
    return 0;
}

static int
replay_load_helpers(void)
{
    if (lift_fn != NULL)
        return 0;
    PyObject *mod = PyImport_ImportModule("pydron._replay");
    lift_fn = mod ? PyObject_GetAttrString(mod, "lift_for_core") : NULL;
    reference_fn = mod ? PyObject_GetAttrString(mod, "run_reference") : NULL;
    pure_fn = mod ? PyObject_GetAttrString(mod, "pure_tables") : NULL;
    cached_fn = mod ? PyObject_GetAttrString(mod, "cached_for_core") : NULL;
    Py_XDECREF(mod);
    if (lift_fn == NULL || reference_fn == NULL || pure_fn == NULL || cached_fn == NULL) {
        Py_CLEAR(lift_fn);
        Py_CLEAR(reference_fn);
        Py_CLEAR(pure_fn);
        Py_CLEAR(cached_fn);
        return -1;
    }
    return 0;
}

/* Lift fn's graph if it is time. 0, or -1 + exception (an internal error, not a refusal). */
static int
replay_prepare(PyObject *fn, trace_codeinfo *info)
{
    struct trace_replay *p = info->replay;
    if (p == NULL) {
        p = info->replay = PyMem_Calloc(1, sizeof(*p));
        if (p == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    if (p->state != REPLAY_UNTRIED)
        return 0;
    if (refresh_pure_tables() < 0)
        return -1;
    S.lifts++;
    PyObject *t = PyObject_CallOneArg(lift_fn, fn);
    if (t == NULL)
        return -1;
    return take_lifted(p, t);
}

/* The tables of known-pure callees, again at every lift: numpy may have been imported since.
 * 0, or -1 + exception. */
static int
refresh_pure_tables(void)
{
    if (replay_load_helpers() < 0)
        return -1;
    PyObject *tables = PyObject_CallNoArgs(pure_fn);
    if (tables == NULL)
        return -1;
    if (!PyTuple_Check(tables) || PyTuple_GET_SIZE(tables) != 3 ||
        !PySet_Check(PyTuple_GET_ITEM(tables, 0)) || !PyDict_Check(PyTuple_GET_ITEM(tables, 1)) ||
        !PySet_Check(PyTuple_GET_ITEM(tables, 2))) {
        Py_DECREF(tables);
        PyErr_SetString(PyExc_TypeError, "pydron: pure_tables() must return (set, dict, set)");
        return -1;
    }
    Py_XSETREF(pure_callees, Py_NewRef(PyTuple_GET_ITEM(tables, 0)));
    Py_XSETREF(pure_methods, Py_NewRef(PyTuple_GET_ITEM(tables, 1)));
    Py_XSETREF(new_objects, Py_NewRef(PyTuple_GET_ITEM(tables, 2)));
    Py_DECREF(tables);
    return 0;
}

/* The reference interpreter (pydron/_replay.py run_reference) in place of the C one: 1 returned,
 * -1 exception, -2 bail. */
static int
run_reference(struct trace_replay *p, PyObject *func, PyObject **bound, PyObject **result)
{
    PyObject *args = PyTuple_New(p->nargs);
    if (args == NULL)
        return -1;
    for (int k = 0; k < p->nargs; k++)
        PyTuple_SET_ITEM(args, k, Py_NewRef(bound[k]));
    PyObject *r = PyObject_CallFunctionObjArgs(reference_fn, func, args, NULL);
    Py_DECREF(args);
    if (r == NULL)
        return -1;
    if (!PyTuple_Check(r) || PyTuple_GET_SIZE(r) != 2) {
        Py_DECREF(r);
        PyErr_SetString(PyExc_TypeError, "pydron: run_reference returned a malformed outcome");
        return -1;
    }
    int ok = PyObject_IsTrue(PyTuple_GET_ITEM(r, 0));
    if (ok) {
        *result = Py_NewRef(PyTuple_GET_ITEM(r, 1));
        Py_DECREF(r);
        return 1;
    }
    Py_XSETREF(p->reason, Py_NewRef(PyTuple_GET_ITEM(r, 1)));
    Py_DECREF(r);
    return -2;
}

static uint64_t
thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t
median3(const uint64_t *v, int n)
{
    uint64_t s[COMPARE_CALLS];
    memcpy(s, v, (size_t)n * sizeof(uint64_t));
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && s[j - 1] > s[j]; j--) {
            uint64_t t = s[j];
            s[j] = s[j - 1];
            s[j - 1] = t;
        }
    return s[n / 2];
}

/* Once both kinds are timed: keep the graph, or set it aside as slower than its trace. */
static void
compare_with_trace(struct trace_replay *p)
{
    if (p->nreplay_cpu < COMPARE_CALLS || p->ntrace_cpu < COMPARE_CALLS)
        return;
    uint64_t r = median3(p->replay_cpu, COMPARE_CALLS), t = median3(p->trace_cpu, COMPARE_CALLS);
    p->last_replay_ns = r;
    p->last_trace_ns = t;
    if ((double)r <= SLOWER_RATIO * (double)t + SLOWER_SLACK_NS) {
        p->state = REPLAY_READY;
        return;
    }
    if (p->state != REPLAY_SLOWER) {
        p->state = REPLAY_SLOWER;
        Py_XSETREF(p->reason, PyUnicode_FromFormat(
            "slower than its trace: %llu %s of the master's time per call replayed, %llu %s "
            "traced (median of %d each)", (unsigned long long)(r / 1000), "\u00b5s",
            (unsigned long long)(t / 1000), "\u00b5s", COMPARE_CALLS));
        if (p->reason == NULL)
            PyErr_Clear();
        S.slower++;
    }
}

int
trace__replay_timing(trace_codeinfo *info)
{
    return info->replay != NULL && info->replay->timing_trace ? 1 : 0;
}

uint64_t
trace__replay_clock(void)
{
    return thread_cpu_ns();
}

void
trace__replay_traced(trace_codeinfo *info, uint64_t started)
{
    struct trace_replay *p = info->replay;
    if (p == NULL || !p->timing_trace)
        return;
    p->timing_trace = 0;
    if (p->ntrace_cpu < COMPARE_CALLS) {
        p->trace_cpu[p->ntrace_cpu++] = thread_cpu_ns() - started;
        compare_with_trace(p);
    }
}

int
trace__replay_call(PyObject *func, trace_codeinfo *info, PyObject *const *args, Py_ssize_t nargs,
                   PyObject *kwnames, PyObject **result)
{
    if (replay_mode == 0)
        return 0;
    struct trace_replay *p = info->replay;
    if (p == NULL && (p = info->replay = PyMem_Calloc(1, sizeof(*p))) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (p->state == REPLAY_UNTRIED) {
        if (p->traced == 0 && replay_from_disk(func, info) < 0)
            PyErr_Clear();            /* the disk cache is only ever a shortcut */
        if (p->state != REPLAY_UNTRIED)
            goto ready;
        if (p->traced < replay_after) {
            p->traced++;
            S.misses++;
            return 0;
        }
        if (replay_prepare(func, info) < 0) {
            /* Lifting itself failed: never a reason to fail the call. */
            PyObject *exc = PyErr_GetRaisedException();
            p->state = REPLAY_REFUSED;
            Py_XSETREF(p->reason, exc ? PyObject_Str(exc) : NULL);
            Py_XDECREF(exc);
            PyErr_Clear();
        }
    }
ready:
    if (p->state != REPLAY_READY && p->state != REPLAY_SLOWER) {
        S.misses++;
        return 0;
    }
    /* The comparison with the trace: at first, then again every RECOMPARE_CALLS calls (the
     * arguments, hence the costs, may change). */
    if (replay_compare && replay_mode == 1 && ++p->since_compare >= RECOMPARE_CALLS) {
        p->since_compare = 0;
        p->nreplay_cpu = p->ntrace_cpu = 0;
    }
    int timing = replay_compare && replay_mode == 1 &&
                 p->nreplay_cpu + p->ntrace_cpu < 2 * COMPARE_CALLS;
    if ((timing && p->ntrace_cpu < p->nreplay_cpu) || (!timing && p->state == REPLAY_SLOWER)) {
        /* The trace's turn (timed by the caller: trace__replay_traced), or the graph is set
         * aside as slower than the trace. */
        p->timing_trace = timing;
        S.misses++;
        return 0;
    }
    uint64_t cpu0 = timing ? thread_cpu_ns() : 0;
    int rc = replay_execute(func, info, args, nargs, kwnames, result);
    if (rc == 1 && timing && p->nreplay_cpu < COMPARE_CALLS) {
        p->replay_cpu[p->nreplay_cpu++] = thread_cpu_ns() - cpu0;
        compare_with_trace(p);
    }
    return rc;
}

/* One call through fn's graph (READY or set aside as SLOWER: nested calls of an outer graph
 * replay whatever the comparison said), bound, run, counted: as trace__replay_call. */
static int
replay_execute(PyObject *func, trace_codeinfo *info, PyObject *const *args, Py_ssize_t nargs,
               PyObject *kwnames, PyObject **result)
{
    struct trace_replay *p = info->replay;
    PyObject *small[8], **bound = p->nargs <= 8 ? small
                                                : PyMem_Malloc(p->nargs * sizeof(PyObject *));
    if (bound == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    int rc = 0, compiled = 0;
    if (!bind(p, func, args, nargs, kwnames, bound)) {
        S.misses++;
        goto done;
    }
    Py_ssize_t order_mark = graph_mark(), moves_mark = graph_moves_mark();
    if (replay_mode == 2) {
        rc = run_reference(p, func, bound, result);
    }
    else {
        run_state st = {0};
        st.p = p;
        st.func = func;
        st.globals = PyFunction_GET_GLOBALS(func);
        st.builtins = PyDict_GetItemWithError(st.globals, str_builtins);
        if (st.builtins == NULL) {
            if (PyErr_Occurred()) {
                rc = -1;
                goto done;
            }
            st.builtins = PyEval_GetBuiltins();
        }
        if (PyModule_Check(st.builtins))
            st.builtins = PyModule_GetDict(st.builtins);
        st.nospec_pc = -1;
        int timed;
        st.compiled = compiled_for(p, &timed);
        compiled = st.compiled != NULL;
        st.regs = PyMem_Calloc((size_t)p->nregs, sizeof(PyObject *));
        st.taint = PyMem_Calloc((size_t)p->nregs, 1);
        if (st.regs == NULL || st.taint == NULL) {
            PyMem_Free(st.regs);
            PyMem_Free(st.taint);
            PyErr_NoMemory();
            rc = -1;
            goto done;
        }
        for (int pc = 0; pc < p->ncode; pc++) {
            const rins *i = &p->code[pc];
            if (i->op == R_ARG) {
                Py_XSETREF(st.regs[i->a], Py_NewRef(bound[i->b]));
                st.taint[i->a] = OUTSIDE;
            }
        }
        PyObject *outer_file;
        int outer_line;
        graph_get_location(&outer_file, &outer_line);
        uint64_t cpu0 = timed >= 0 ? thread_cpu_ns() : 0;
        rc = run(&st, result);
        if (rc == 1 && timed >= 0)
            tier_timed(p, timed, thread_cpu_ns() - cpu0);
        graph_set_location(outer_file, outer_line);
        if (rc == -2) {
            Py_XSETREF(p->reason, Py_XNewRef(st.bail_reason));
        }
        state_clear(&st);
    }
    if (rc == 1) {
        p->hits++;
        p->compiled_runs += compiled;
        p->bails_in_a_row = 0;
        S.hits++;
    }
    else if (rc == -2) {
        /* Nothing it did can be seen: drop its tasks and trace the call instead. */
        graph_cancel_since(order_mark);
        graph_moves_truncate(moves_mark);
        p->bails++;
        S.bails++;
        if (++p->bails_in_a_row >= BAILS_TO_GIVE_UP)
            p->state = REPLAY_DEAD;
        rc = 0;
    }
done:
    if (bound != small)
        PyMem_Free(bound);
    return rc;
}

/* ---- the module's functions ---------------------------------------------------------------------- */

static PyObject *
core_replay_configure(PyObject *module, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"mode", "after", "guess", "compare", "jit", "jit_after", "jit_max",
                             NULL};
    static const char *const jit_names[] = {"off", "on", "always"};
    const char *mode = NULL, *jit = NULL;
    long after = -1, after_jit = -1, max_jit = -1;
    int guess = -1, compare = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|zliizll:_replay_configure", kwlist, &mode,
                                     &after, &guess, &compare, &jit, &after_jit, &max_jit))
        return NULL;
    if (jit != NULL) {
        int m = -1;
        for (int k = 0; k < 3; k++)
            if (strcmp(jit, jit_names[k]) == 0)
                m = k;
        if (m < 0) {
            PyErr_Format(PyExc_ValueError, "pydron: jit must be off, on or always, not %s", jit);
            return NULL;
        }
        jit_mode = m;
    }
    if (after_jit >= 0)
        jit_after = after_jit;
    if (max_jit >= 0)
        jit_max = max_jit;
    if (compare >= 0)
        replay_compare = compare != 0;
    if (guess >= 0)
        replay_guess = guess > 2 ? 1 : guess;
    if (mode != NULL) {
        if (strcmp(mode, "off") == 0)
            replay_mode = 0;
        else if (strcmp(mode, "on") == 0)
            replay_mode = 1;
        else if (strcmp(mode, "reference") == 0)
            replay_mode = 2;
        else {
            PyErr_Format(PyExc_ValueError, "pydron: replay must be on, off or reference, not %s",
                         mode);
            return NULL;
        }
    }
    if (after >= 0)
        replay_after = after;
    static const char *const names[] = {"off", "on", "reference"};
    return Py_BuildValue("{ssslsisissslsl}", "mode", names[replay_mode], "after", replay_after,
                         "guess", replay_guess, "compare", replay_compare, "jit",
                         jit_names[jit_mode], "jit_after", jit_after, "jit_max", jit_max);
}

static PyObject *
core_replay_stats(PyObject *module, PyObject *noargs)
{
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsK}", "slower", (unsigned long long)S.slower,
                         "disk_hits", (unsigned long long)S.disk_hits,
                         "hits", (unsigned long long)S.hits, "misses",
                         (unsigned long long)S.misses, "lifts", (unsigned long long)S.lifts,
                         "refusals", (unsigned long long)S.refusals, "bails",
                         (unsigned long long)S.bails, "guesses", (unsigned long long)S.guesses,
                         "mispredicts", (unsigned long long)S.mispredicts, "maps",
                         (unsigned long long)S.maps);
}

/* The compiled tier's part of _replay_state: "jit" (not yet, too large, queued, ready, slower
 * than the interpreter, failed: why), "compiled" (later calls run compiled code), "compile_ms",
 * "compiled_runs", and once the tiers were compared "tiers_cpu" (their medians, µs).
 * 0, or -1 + exception. */
static int
add_jit_state(PyObject *d, struct trace_replay *p)
{
    double ms = 0.0;
    const char *error = NULL;
    int status = p->jit ? jit_graph_status(p->jit, &ms, &error) : -1;
    PyObject *what;
    if (status == JIT_FAILED)
        what = PyUnicode_FromFormat("failed: %s", error);
    else
        what = PyUnicode_FromString(
            status == JIT_READY ? (p->tier_verdict < 0 ? "slower than the interpreter" : "ready")
            : status == JIT_QUEUED ? "queued" : p->ncode > jit_max ? "too large" : "not yet");
    int used = status == JIT_READY && (jit_mode == 2 || (jit_mode == 1 && p->tier_verdict >= 0));
    PyObject *v = Py_BuildValue("{sNsOsOsK}", "jit", what, "compiled", used ? Py_True : Py_False,
                                "compile_ms", status == JIT_READY ? PyFloat_FromDouble(ms)
                                                                  : Py_NewRef(Py_None),
                                "compiled_runs", (unsigned long long)p->compiled_runs);
    if (v != NULL && p->tier_verdict != 0) {
        PyObject *cmp = Py_BuildValue("{sdsd}", "interpreted_us", p->tier_ns[0] / 1e3,
                                      "compiled_us", p->tier_ns[1] / 1e3);
        if (cmp == NULL || PyDict_SetItemString(v, "tiers_cpu", cmp) < 0)
            Py_CLEAR(v);
        Py_XDECREF(cmp);
    }
    if (v == NULL || PyDict_Update(d, v) < 0) {
        Py_XDECREF(v);
        return -1;
    }
    Py_DECREF(v);
    return 0;
}

/* _replay_state(fn) -> dict: what became of fn's graph (pydron.explain, tests). */
static PyObject *
core_replay_state(PyObject *module, PyObject *fn)
{
    if (PyMethod_Check(fn))
        fn = PyMethod_GET_FUNCTION(fn);
    if (!trace__is_function(fn)) {
        PyErr_SetString(PyExc_TypeError, "pydron: _replay_state expects a function");
        return NULL;
    }
    trace_codeinfo *info = trace__codeinfo_get(PyFunction_GET_CODE(fn));
    struct trace_replay *p = info ? info->replay : NULL;
    static const char *const states[] = {"untried", "ready", "refused", "given up",
                                         "slower than its trace"};
    if (p == NULL)
        return Py_BuildValue("{sssl}", "state", "untried", "traced", 0L);
    PyObject *sites = PyList_New(p->state == REPLAY_READY ? p->nsites : 0);
    for (int s = 0; sites && s < PyList_GET_SIZE(sites); s++) {
        rsite *x = &p->sites[s];
        PyObject *d = Py_BuildValue("{sIsIsisO}", "guesses", x->guesses, "misses", x->misses,
                                    "last", (int)x->last, "guessing", x->off ? Py_False : Py_True);
        if (d == NULL)
            Py_CLEAR(sites);
        else
            PyList_SET_ITEM(sites, s, d);
    }
    if (sites == NULL)
        return NULL;
    PyObject *d = Py_BuildValue("{sssOslsKsKsKsKsisN}", "state", states[p->state], "reason",
                         p->reason ? p->reason : Py_None, "traced", p->traced, "hits",
                         (unsigned long long)p->hits, "bails", (unsigned long long)p->bails,
                         "guesses", (unsigned long long)p->guesses, "mispredicts",
                         (unsigned long long)p->mispredicts, "instructions", p->ncode, "sites",
                         sites);
    if (d != NULL && add_jit_state(d, p) < 0)
        Py_CLEAR(d);
    if (d != NULL && p->last_trace_ns) {
        PyObject *cmp = Py_BuildValue("{sdsd}", "replay_us", p->last_replay_ns / 1e3,
                                      "trace_us", p->last_trace_ns / 1e3);
        if (cmp == NULL || PyDict_SetItemString(d, "master_cpu", cmp) < 0)
            Py_CLEAR(d);
        Py_XDECREF(cmp);
    }
    return d;
}

/* _replay_forget(fn): drop fn's graph (tests; the next call counts as a first call). */
static PyObject *
core_replay_forget(PyObject *module, PyObject *fn)
{
    if (PyMethod_Check(fn))
        fn = PyMethod_GET_FUNCTION(fn);
    if (!trace__is_function(fn)) {
        PyErr_SetString(PyExc_TypeError, "pydron: _replay_forget expects a function");
        return NULL;
    }
    trace_codeinfo *info = trace__codeinfo_get(PyFunction_GET_CODE(fn));
    if (info && info->replay) {
        trace__replay_free(info->replay);
        info->replay = NULL;
    }
    Py_RETURN_NONE;
}

/* _replay_call(callable, args, kwnames=None) -> (True, result) | (False, why): a nested scheduled
 * call through its graph only (the reference interpreter's CALL of a scheduled callee). */
static PyObject *
core_replay_call(PyObject *module, PyObject *args)
{
    PyObject *callable, *argv, *kwnames = Py_None, *result = NULL;
    if (!PyArg_ParseTuple(args, "OO!|O:_replay_call", &callable, &PyTuple_Type, &argv, &kwnames))
        return NULL;
    if (kwnames == Py_None || (PyTuple_Check(kwnames) && PyTuple_GET_SIZE(kwnames) == 0))
        kwnames = NULL;
    else if (!PyTuple_Check(kwnames)) {
        PyErr_SetString(PyExc_TypeError, "pydron: _replay_call's kwnames must be a tuple");
        return NULL;
    }
    trace_codeinfo *info = NULL;
    if (callee_kind(callable, &info) != CALLEE_SCHEDULED)
        return Py_BuildValue("(Os)", Py_False, "not a scheduled function with a graph");
    PyObject *fn = callable, *self = NULL;
    if (PyMethod_Check(callable)) {
        fn = PyMethod_GET_FUNCTION(callable);
        self = PyMethod_GET_SELF(callable);
    }
    Py_ssize_t n = PyTuple_GET_SIZE(argv), nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    PyObject **stack = PyMem_Malloc((size_t)(n + 1) * sizeof(PyObject *));
    if (stack == NULL)
        return PyErr_NoMemory();
    Py_ssize_t j = 0;
    if (self)
        stack[j++] = self;
    for (Py_ssize_t k = 0; k < n; k++)
        stack[j++] = PyTuple_GET_ITEM(argv, k);
    /* As the C interpreter's nested calls: through the graph whatever the comparison with
     * the trace said (call_scheduled). */
    int rc = replay_mode == 0 ? 0
             : replay_execute(fn, info, stack, n - nkw + (self != NULL), kwnames, &result);
    PyMem_Free(stack);
    if (rc < 0)
        return NULL;
    if (rc == 0) {
        PyObject *reason = info->replay && info->replay->reason ? info->replay->reason : Py_None;
        return Py_BuildValue("(OO)", Py_False, reason);
    }
    return Py_BuildValue("(ON)", Py_True, result);
}

static PyObject *
core_replay_ops(PyObject *module, PyObject *noargs)
{
    PyObject *t = PyTuple_New(R_NOPS);
    for (int k = 0; t && k < R_NOPS; k++) {
        PyObject *s = PyUnicode_FromString(rop_names[k]);
        if (s == NULL)
            Py_CLEAR(t);
        else
            PyTuple_SET_ITEM(t, k, s);
    }
    return t;
}

static PyMethodDef replay_methods[] = {
    {"_replay_configure", (PyCFunction)(void (*)(void))core_replay_configure,
     METH_VARARGS | METH_KEYWORDS,
     "_replay_configure(mode=None, after=-1, guess=-1): 'on', 'off' or 'reference'; calls "
     "traced first; whether branches on pending results guess."},
    {"_replay_stats", core_replay_stats, METH_NOARGS, "Replay counters of this process."},
    {"_replay_state", core_replay_state, METH_O, "What became of fn's graph."},
    {"_replay_forget", core_replay_forget, METH_O, "Drop fn's graph."},
    {"_replay_ops", core_replay_ops, METH_NOARGS, "The interpreter's operation names, in order."},
    {"_replay_call", core_replay_call, METH_VARARGS,
     "_replay_call(fn, args, kwnames=None): a nested scheduled call through its graph only."},
    {NULL},
};

int
trace__replay_init(PyObject *module)
{
    if (PyType_Ready(&cursor_type) < 0)
        return -1;
    str_out = PyUnicode_InternFromString("out");
    str_builtins = PyUnicode_InternFromString("__builtins__");
    if (str_out == NULL || str_builtins == NULL)
        return -1;
    for (int k = 0; k < R_NOPS; k++)
        jit_ops[k] = (jit_op_fn)(void (*)(void))op_table[k];
    if (jit_set_ops(jit_ops, R_NOPS) < 0)
        return -1;
    return PyModule_AddFunctions(module, replay_methods);
}
