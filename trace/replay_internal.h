/* trace/replay_internal.h — shared by the files of the graph interpreter (trace/replay*.c) only:
 * the register program's instruction set, a graph's per-code state, one call's state, the
 * settings and counters, and what the files call across each other. Functions and data one of
 * them gives the others are named replay__* (trace/'s own internals are trace__*, internal.h).
 *   replay_program.c  loading and checking a lifted program
 *   replay_run.c      one call's run loop, speculation (guesses, checkpoints, rollbacks)
 *   replay_ops.c      the operations, one function each, and the interpreter's step
 *   replay_calls.c    the calls a graph makes: callee kinds, tasks, maps, nested graphs
 *   replay_tier.c     the glue to the compiled tier (jit/)
 *   replay_disk.c     a graph read from the disk cache, the cache's key of a code object
 *   replay.c          entering a call (lifting, the comparison with the trace), _core functions
 *
 * Thread and GIL model: GIL held throughout; the per-code state is shared by threads (counters
 * only), everything of one call is on its C stack. */
#ifndef PYDRON_TRACE_REPLAY_INTERNAL_H
#define PYDRON_TRACE_REPLAY_INTERNAL_H

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
/* The operations' names, by number (replay_program.c). */
extern const char *const replay__rop_names[R_NOPS];

typedef struct {
    int32_t op, a, b, c, d, line;
} rins;

/* A branch site's speculation history (per code object: it lasts across calls). A guess counts
 * once it is checked (held or missed); a guess dropped unchecked because an earlier one missed
 * says nothing about the site. A site stops guessing when GUESS_OFF_MISSES of its last
 * GUESS_WINDOW checked guesses missed. While it waits, each outcome is compared with what it
 * would have guessed (the last outcome), and it guesses again once GUESS_WINDOW such would-be
 * guesses in a row held. */
typedef struct {
    uint32_t guesses, misses;  /* guesses made and found wrong, over the graph's life */
    uint32_t stops;            /* times it stopped guessing */
    uint16_t recent;           /* the last checks, newest in bit 0: 1 missed */
    uint8_t nrecent;           /* how many checks recent holds (<= GUESS_WINDOW) */
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
/* A graph whose replay costs at most 1/CLEAR_WIN_RATIO of its trace is compared again after
 * twice as many calls as last time, up to RECOMPARE_CALLS_MAX: a comparison traces
 * COMPARE_CALLS calls, each several times a replay, and a clear win is not worth re-checking
 * every 64 calls. A closer result goes back to RECOMPARE_CALLS. */
#define CLEAR_WIN_RATIO 3.0
#define RECOMPARE_CALLS_MAX 4096

/* A scheduled code object's graph and what became of it (trace_codeinfo.replay). */
struct trace_replay {
    int state;
    long traced;                 /* calls traced before the graph was lifted */
    int disk_tried;              /* the disk cache was read for it (at the first call) */
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
    int recompare_every;           /* calls between two comparisons (0: RECOMPARE_CALLS) */
    uint64_t last_replay_ns, last_trace_ns;   /* the medians of the last comparison */
    jit_graph *jit;                /* the compiled tier's handle, once the graph was hot */
    int jit_collected;             /* its compile's object was handed to the disk cache */
    uint64_t compiled_runs;        /* runs that went through the compiled function */
    /* The compiled function against the interpreter once it is ready (tier "on"): COMPARE_CALLS
     * runs of each, alternating, master CPU ns ([0] interpreted, [1] compiled); the verdict: 1
     * compiled is faster and stays, -1 it is not and the graph stays interpreted, 0 not yet. */
    uint64_t tier_cpu[2][COMPARE_CALLS];
    int ntier_cpu[2];
    int tier_verdict;
    uint64_t tier_ns[2];           /* the medians the verdict was drawn from */
};

/* Process-wide counters (pydron info; replay.c). */
struct replay_counters {
    uint64_t hits, misses, lifts, refusals, bails, guesses, mispredicts, maps, disk_hits, slower;
    /* Speculation's work: tasks submitted while a guess was open, tasks a rollback dropped, tasks
     * a rollback took back and the right path made again, sites that stopped guessing, and
     * sites that guessed again after waiting. */
    uint64_t speculative_tasks, dropped_tasks, reused_tasks, sites_stopped, sites_resumed;
};
extern struct replay_counters replay__counters;

/* Settings (replay.c, set by _replay_configure): mode 0 off, 1 the C interpreter, 2 the Python
 * reference interpreter (tests). */
extern int replay__mode;
/* Branches on pending results guess (1), wait (0), or guess even when the result is in (2:
 * tests, so that every guess and rollback path runs on the whole semantics corpus). */
extern int replay__guess_mode;
/* The compiled tier (jit/): off (0); on (1): a graph replayed jit_after times is compiled on the
 * compile thread, later calls use it once it is ready; always (2): compiled at the first call,
 * which waits for it (tests). Programs over jit_max instructions stay interpreted. Off unless
 * asked for: it does not beat the interpreter (bench/replay_figures.py, README). */
extern int replay__jit_mode;
extern long replay__jit_after;
extern long replay__jit_max;

#define MAX_CHECKPOINTS 64
#define GUESS_WINDOW 16         /* checks a site's history holds (the bits of rsite.recent) */
#define GUESS_OFF_MISSES 4      /* a site stops guessing at this many misses in its window */
/* Tables pydron._replay gives (replay.c): callables known to have no effect but their result
 * (set); {exact type: set of method names}, likewise; callables and method names whose result
 * is new (set). */
extern PyObject *replay__pure_callees, *replay__pure_methods, *replay__new_objects;
extern PyObject *replay__str_out;      /* "out": numpy's output argument writes into an array */

/* ---- one call's state ---- */

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
extern PyTypeObject replay__cursor_type;     /* replay_ops.c */

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

/* What kind of callee: how CALL and MAP treat it. */
enum { CALLEE_OTHER, CALLEE_FUNCTIONAL, CALLEE_SCHEDULED, CALLEE_PURE };

/* ---- replay_program.c ---- */

/* Build the program from the tuple _replay.Program.as_tuple() gives. 0, or -1 + exception. */
int replay__program_load(struct trace_replay *p, PyObject *t);

/* ---- replay_run.c ---- */

/* Give up: returns -2 with the reason noted (no exception set). */
int replay__bail(run_state *st, int pc, const char *fmt, ...);
/* An exception stops the replay unless it is the user's interrupt or the interpreter's end,
 * which propagate (-1); any other is raised again by the trace (bail, -2). */
int replay__failed(run_state *st, int pc, const char *what);
/* A checkpoint for the branch at if_pc, not waiting for wait_on: then on along the guess. *pc
 * is where to go on. 0, or -1 + exception. */
int replay__guess(run_state *st, int if_pc, PyObject *wait_on, int *pc);
/* A check of what site guessed, or (while it waits) would have guessed: wrong or not. Stops or
 * resumes the site's guessing (rsite says when). */
void replay__site_checked(rsite *site, int wrong);
/* Settle the checkpoints whose awaited value has arrived (without waiting): 0 when all held, 1
 * after a rollback (*pc is where to go on), -1 + exception. */
int replay__settle_arrived(run_state *st, int *pc);
/* Settle every checkpoint (waiting): 0 when all held, 1 after a rollback (*pc is where to go
 * on), -1 + exception. */
int replay__settle_all(run_state *st, int *pc);
/* Run the program: 1 returned (*result), -1 exception, -2 bail (st->bail_reason). */
int replay__run(run_state *st, PyObject **result);
/* Release everything of the call's state (tasks a rollback took back and nobody made again are
 * forgotten). */
void replay__state_clear(run_state *st);

/* ---- replay_ops.c ---- */

/* Execute the instruction at *pc, the interpreter's step: 0 go on, 1 returned, -1 exception,
 * -2 bail. */
int replay__exec_one(run_state *st, int *pc, int guessing);
typedef int (*replay_op_fn)(run_state *st, int *pc, const rins *i, int guessing);
/* The operations by number: what the compiled tier calls. */
extern const replay_op_fn replay__op_table[R_NOPS];

/* ---- replay_calls.c ---- */

int replay__callee_kind(PyObject *callable, trace_codeinfo **info_out);
/* Whether a pure callee's result is always a new object (the call may change it in place). */
int replay__makes_new_object(PyObject *callable);
/* For a bail's reason: the callee's name (new reference), or NULL without exception. */
PyObject *replay__callee_name(PyObject *callable);
/* A functional call, a task (reused after a rollback when the same call is made again). New
 * reference, or NULL + exception. */
PyObject *replay__functional_call(run_state *st, PyObject *callable, PyObject *const *args,
                                  Py_ssize_t nargs, PyObject *kwnames);
/* A MAP: the pending list (new reference) or NULL: exception, or bail (*bailed). */
PyObject *replay__run_map(run_state *st, int pc, const rins *i, int *bailed);
/* A nested scheduled call through its graph: 0 with *result, -2 bail, -1 exception. */
int replay__call_scheduled(run_state *st, int here, PyObject *callable, trace_codeinfo *info,
                           PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                           PyObject **result);

/* ---- replay_tier.c ---- */

/* The compiled function of p's graph, or NULL (interpreted); *timed: which tier this run is
 * timed for while the two are compared (0 interpreted, 1 compiled; else -1). */
jit_graph_fn replay__compiled_for(struct trace_replay *p, int *timed);
/* A timed run of the comparison between the tiers took ns. */
void replay__tier_timed(struct trace_replay *p, int timed, uint64_t ns);
/* Hand the operations to jit/. 0, or -1 + exception. */
int replay__tier_init(void);

/* ---- replay_disk.c ---- */

/* fn's graph from the disk cache, read in C: 1 found (*out: the program tuple or refusal str, a
 * new reference), 0 none, 2 the Python loader must look (the cache is off or not yet checked, or
 * the file is one to refuse), -1 + exception. */
int replay__disk_load(PyObject *fn, PyObject **out);
int replay__disk_init(PyObject *module);

/* ---- replay.c ---- */

/* Lift fn's graph (or take the disk cache's). 0, or -1 + exception. */
int replay__prepare(PyObject *fn, trace_codeinfo *info);
/* One call through fn's graph: as trace__replay_call. */
int replay__execute(PyObject *func, trace_codeinfo *info, PyObject *const *args,
                    Py_ssize_t nargs, PyObject *kwnames, PyObject **result);
/* This thread's CPU time (ns); the median of n <= COMPARE_CALLS values. */
uint64_t replay__thread_cpu_ns(void);
uint64_t replay__median3(const uint64_t *v, int n);

/* ---- small helpers of the hot paths (inline: the operations call them per instruction) ---- */

static inline void
replay__set_reg(run_state *st, int r, PyObject *v, uint8_t taint)
{
    Py_XSETREF(st->regs[r], v);
    st->taint[r] = taint;
}

static inline int
replay__is_unfinished_task(PyObject *x)
{
    return graph_is_task(x) && !graph_task_finished((graph_task *)x);
}

/* Can the branch at if_pc guess now? */
static inline int
replay__may_guess(run_state *st, int if_pc)
{
    if (st->nospec_pc == if_pc || replay__mode != 1 || !replay__guess_mode)
        return 0;
    rsite *site = &st->p->sites[st->p->code[if_pc].c];
    return !site->off;
}

/* Read x (shallow or deep) at pc. Returns a new reference; or NULL + exception; or NULL without
 * exception and *pc moved when pc belongs to a branch's condition whose operand x has not
 * arrived, and the branch guessed. */
static inline PyObject *
replay__operand(run_state *st, int *pc, PyObject *x, int deep, int slice_of)
{
    if (slice_of >= 0 && graph_is_task(x) &&
        (replay__guess_mode == 2 || replay__is_unfinished_task(x)) &&
        replay__may_guess(st, slice_of)) {
        if (replay__guess_mode != 2 && graph_pump() < 0)
            return NULL;
        if (replay__guess_mode == 2 || replay__is_unfinished_task(x)) {
            if (replay__guess(st, slice_of, x, pc) < 0)
                return NULL;
            return NULL;
        }
    }
    return deep ? trace__force_deep(x) : trace__force(x);
}

/* Note list's length before an append while guesses are open (a rollback undoes it). 0, or
 * -1 + exception. */
static inline int
replay__note_append(run_state *st, PyObject *list)
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
static inline int
replay__outside_iterator(run_state *st, int reg, PyObject *v)
{
    return st->taint[reg] == OUTSIDE && PyIter_Check(v);
}

static inline int
replay__immutable(PyObject *v)
{
    return v == Py_None || PyLong_CheckExact(v) || PyFloat_CheckExact(v) ||
           PyComplex_CheckExact(v) || PyUnicode_CheckExact(v) || PyBytes_CheckExact(v) ||
           PyTuple_CheckExact(v) || PyBool_Check(v) || PyFrozenSet_CheckExact(v);
}

#endif
