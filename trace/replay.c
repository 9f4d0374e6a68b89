/* trace/replay.c — later calls of a scheduled function without its bytecode: the C interpreter of
 * its graph, the register program pydron/_replay.py lifts from the function's source (the module
 * docstring there says what a graph can hold; OPS there and enum rop in replay_internal.h must
 * agree, and a test checks that they do). This file enters a call: whether it replays (lifted
 * yet, from the disk cache, compared with its trace), binding its arguments, running it and
 * counting what became of it; and it holds the module's _replay_* functions. The interpreter
 * itself is in the files replay_internal.h lists (program, run loop and speculation, operations,
 * calls, compiled tier).
 *
 * The interpreter reads values where the rewritten bytecode would (the same force kinds per
 * operation), sends every call through the same dispatcher, and submits a comprehension over one
 * functional callee as a map (graph/bulk.c). It never does anything the caller could see before
 * the call returns: what it builds is its own, in-place operators and appends touch only objects
 * it made, callees are functional, scheduled functions with a graph of their own, or known pure.
 * So when it meets something else (an unknown callee, an exception, an unbound name) it can give
 * up ("bail"): its tasks are dropped (graph_cancel_since) and the call is traced as if there were
 * no graph, which raises exactly what plain Python raises, with the traceback plain Python shows.
 * A branch on a result that has not arrived guesses rather than waits (replay_run.c).
 *
 * Thread and GIL model: GIL held throughout; the per-code state is shared by threads (counters
 * only), everything of one call is on its C stack. */
#include "trace/replay_internal.h"

/* Process-wide counters (pydron info). */
struct replay_counters replay__counters;

/* Settings (replay_internal.h says what they mean); and here only: whether graphs are compared
 * with their trace before they stay, and how many calls are traced before a function's graph is
 * lifted and replayed. */
static int replay_compare = 1;
int replay__mode = 1;
static long replay_after = 1;
int replay__guess_mode = 1;
int replay__jit_mode = 0;
long replay__jit_after = 32;
long replay__jit_max = 1 << 16;

#define BAILS_TO_GIVE_UP 3

PyObject *replay__str_out;
static PyObject *str_builtins;       /* "__builtins__" */
PyObject *replay__pure_callees, *replay__pure_methods, *replay__new_objects;
static PyObject *replay_module;      /* pydron._replay: lift_for_core, cached_for_core are looked
                                      * up at each (rare) use, as a test may replace them */
static PyObject *reference_fn;       /* pydron._replay.run_reference */
static PyObject *pure_fn;            /* pydron._replay.pure_tables */

/* ---- entering a call --------------------------------------------------------------------------- */

static int replay_load_helpers(void);
static PyObject *call_helper(const char *name, PyObject *arg);
static int refresh_pure_tables(void);
static int take_lifted(struct trace_replay *p, PyObject *t);

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

/* The first call of fn in this process: its graph from the disk cache (pydron/_graph_cache.py)
 * when a process before this one made it, so that this call replays at once. Read in C
 * (replay_disk.c) unless the file or the cache is out of the ordinary: then by the Python loader.
 * 0 (found or not), or -1 + exception. */
static int
replay_from_disk(PyObject *fn, trace_codeinfo *info)
{
    if (replay_load_helpers() < 0)
        return -1;
    PyObject *t;
    int found = replay__disk_load(fn, &t);
    if (found < 0)
        return -1;
    if (found == 0)
        return 0;
    if (found == 2 && (t = call_helper("cached_for_core", fn)) == NULL)
        return -1;
    if (t == Py_None) {
        Py_DECREF(t);
        return 0;
    }
    replay__counters.disk_hits++;
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
        replay__counters.refusals++;
        return 0;
    }
    int rc = replay__program_load(p, t);
    Py_DECREF(t);
    if (rc < 0) {
        /* Our own lifter made something the interpreter cannot trust: say so, trace on. */
        PyObject *exc = PyErr_GetRaisedException();
        p->state = REPLAY_REFUSED;
        Py_XSETREF(p->reason, PyObject_Str(exc));
        Py_XDECREF(exc);
        if (p->reason == NULL)
            PyErr_Clear();
        replay__counters.refusals++;
        return 0;
    }
    p->state = REPLAY_READY;
    return 0;
}

static int
replay_load_helpers(void)
{
    if (replay_module != NULL)
        return 0;
    PyObject *mod = PyImport_ImportModule("pydron._replay");
    reference_fn = mod ? PyObject_GetAttrString(mod, "run_reference") : NULL;
    pure_fn = mod ? PyObject_GetAttrString(mod, "pure_tables") : NULL;
    if (reference_fn == NULL || pure_fn == NULL) {
        Py_XDECREF(mod);
        Py_CLEAR(reference_fn);
        Py_CLEAR(pure_fn);
        return -1;
    }
    replay_module = mod;
    return 0;
}

/* pydron._replay.<name>(arg): a new reference, or NULL + exception. */
static PyObject *
call_helper(const char *name, PyObject *arg)
{
    PyObject *f = PyObject_GetAttrString(replay_module, name);
    PyObject *r = f ? PyObject_CallOneArg(f, arg) : NULL;
    Py_XDECREF(f);
    return r;
}

/* Lift fn's graph if it is time. 0, or -1 + exception (an internal error, not a refusal). */
int
replay__prepare(PyObject *fn, trace_codeinfo *info)
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
    replay__counters.lifts++;
    PyObject *t = call_helper("lift_for_core", fn);
    if (t == NULL)
        return -1;
    return take_lifted(p, t);
}

/* What the tables of known-pure callees depend on (as pure_tables() in pydron/_replay.py): the
 * numpy module and whether numpy.linalg and numpy.fft are imported. */
static PyObject *tables_numpy;      /* borrowed, compared only */
static int tables_linalg = -1, tables_fft = -1;

/* The modules the tables depend on, imported now: 1 the tables were taken under them, else 0. */
static int
pure_tables_current(PyObject **np, int *linalg, int *fft)
{
    PyObject *modules = PyImport_GetModuleDict();
    if (!PyDict_Check(modules))
        return 0;
    *np = PyDict_GetItemString(modules, "numpy");
    *linalg = PyDict_GetItemString(modules, "numpy.linalg") != NULL;
    *fft = PyDict_GetItemString(modules, "numpy.fft") != NULL;
    return replay__pure_callees != NULL && *np == tables_numpy && *linalg == tables_linalg &&
           *fft == tables_fft;
}

/* The tables of known-pure callees, again at every lift and load: numpy may have been imported
 * since (asked of pydron._replay only then). 0, or -1 + exception. */
static int
refresh_pure_tables(void)
{
    if (replay_load_helpers() < 0)
        return -1;
    PyObject *np = NULL;
    int linalg = -1, fft = -1;
    if (pure_tables_current(&np, &linalg, &fft))
        return 0;
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
    Py_XSETREF(replay__pure_callees, Py_NewRef(PyTuple_GET_ITEM(tables, 0)));
    Py_XSETREF(replay__pure_methods, Py_NewRef(PyTuple_GET_ITEM(tables, 1)));
    Py_XSETREF(replay__new_objects, Py_NewRef(PyTuple_GET_ITEM(tables, 2)));
    Py_DECREF(tables);
    tables_numpy = np;
    tables_linalg = linalg;
    tables_fft = fft;
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

/* Once both kinds are timed: keep the graph, or set it aside as slower than its trace. */
static void
compare_with_trace(struct trace_replay *p)
{
    if (p->nreplay_cpu < COMPARE_CALLS || p->ntrace_cpu < COMPARE_CALLS)
        return;
    uint64_t r = replay__median3(p->replay_cpu, COMPARE_CALLS);
    uint64_t t = replay__median3(p->trace_cpu, COMPARE_CALLS);
    p->last_replay_ns = r;
    p->last_trace_ns = t;
    if ((double)r <= SLOWER_RATIO * (double)t + SLOWER_SLACK_NS) {
        p->state = REPLAY_READY;
        int every = p->recompare_every ? p->recompare_every : RECOMPARE_CALLS;
        if ((double)r * CLEAR_WIN_RATIO <= (double)t)
            p->recompare_every = every * 2 < RECOMPARE_CALLS_MAX ? every * 2 : RECOMPARE_CALLS_MAX;
        else
            p->recompare_every = RECOMPARE_CALLS;
        return;
    }
    p->recompare_every = RECOMPARE_CALLS;
    if (p->state != REPLAY_SLOWER) {
        p->state = REPLAY_SLOWER;
        Py_XSETREF(p->reason, PyUnicode_FromFormat(
            "slower than its trace: %llu %s of the master's time per call replayed, %llu %s "
            "traced (median of %d each)", (unsigned long long)(r / 1000), "\u00b5s",
            (unsigned long long)(t / 1000), "\u00b5s", COMPARE_CALLS));
        if (p->reason == NULL)
            PyErr_Clear();
        replay__counters.slower++;
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
    return replay__thread_cpu_ns();
}

void
trace__replay_traced(trace_codeinfo *info, uint64_t started)
{
    struct trace_replay *p = info->replay;
    if (p == NULL || !p->timing_trace)
        return;
    p->timing_trace = 0;
    if (p->ntrace_cpu < COMPARE_CALLS) {
        p->trace_cpu[p->ntrace_cpu++] = replay__thread_cpu_ns() - started;
        compare_with_trace(p);
    }
}

/* fn's replay state, made at its first call, when the graph is read from the disk cache: a
 * graph, or NULL + exception (memory, or an interrupt while reading it: the user's). */
static struct trace_replay *
replay_state_at_call(PyObject *func, trace_codeinfo *info)
{
    struct trace_replay *p = info->replay;
    if (p == NULL && (p = info->replay = PyMem_Calloc(1, sizeof(*p))) == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    if (p->state == REPLAY_UNTRIED && p->traced == 0 && !p->disk_tried) {
        p->disk_tried = 1;
        if (replay_from_disk(func, info) < 0) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) {
                p->disk_tried = 0;    /* the next call reads it again */
                return NULL;          /* Ctrl-C or an exit while reading it: the user's */
            }
            PyErr_Clear();            /* the disk cache is only ever a shortcut */
        }
    }
    return p;
}

int
trace__replay_ready(PyObject *func, trace_codeinfo *info)
{
    if (replay__mode == 0)
        return 0;
    struct trace_replay *p = replay_state_at_call(func, info);
    if (p == NULL)
        return -1;
    return p->state == REPLAY_READY || p->state == REPLAY_SLOWER;
}

int
trace__replay_call(PyObject *func, trace_codeinfo *info, PyObject *const *args, Py_ssize_t nargs,
                   PyObject *kwnames, PyObject **result)
{
    if (replay__mode == 0)
        return 0;
    struct trace_replay *p = replay_state_at_call(func, info);
    if (p == NULL)
        return -1;
    if (p->state == REPLAY_UNTRIED) {
        if (p->traced < replay_after) {
            p->traced++;
            replay__counters.misses++;
            return 0;
        }
        if (replay__prepare(func, info) < 0) {
            /* Ctrl-C or an exit while lifting (Python code, where signals land): raised as the
             * call's, and the next call lifts again. */
            if (!PyErr_ExceptionMatches(PyExc_Exception))
                return -1;
            /* Lifting itself failed: never a reason to fail the call. */
            PyObject *exc = PyErr_GetRaisedException();
            p->state = REPLAY_REFUSED;
            Py_XSETREF(p->reason, exc ? PyObject_Str(exc) : NULL);
            Py_XDECREF(exc);
            PyErr_Clear();
        }
    }

    if (p->state != REPLAY_READY && p->state != REPLAY_SLOWER) {
        replay__counters.misses++;
        return 0;
    }
    /* The comparison with the trace: at first, then again every RECOMPARE_CALLS calls (the
     * arguments, hence the costs, may change), less often after clear wins. */
    if (replay_compare && replay__mode == 1 &&
        ++p->since_compare >= (p->recompare_every ? p->recompare_every : RECOMPARE_CALLS)) {
        p->since_compare = 0;
        p->nreplay_cpu = p->ntrace_cpu = 0;
    }
    int timing = replay_compare && replay__mode == 1 &&
                 p->nreplay_cpu + p->ntrace_cpu < 2 * COMPARE_CALLS;
    if ((timing && p->ntrace_cpu < p->nreplay_cpu) || (!timing && p->state == REPLAY_SLOWER)) {
        /* The trace's turn (timed by the caller: trace__replay_traced), or the graph is set
         * aside as slower than the trace. */
        p->timing_trace = timing;
        replay__counters.misses++;
        return 0;
    }
    uint64_t cpu0 = timing ? replay__thread_cpu_ns() : 0;
    int rc = replay__execute(func, info, args, nargs, kwnames, result);
    if (rc == 1 && timing && p->nreplay_cpu < COMPARE_CALLS) {
        p->replay_cpu[p->nreplay_cpu++] = replay__thread_cpu_ns() - cpu0;
        compare_with_trace(p);
    }
    return rc;
}

/* One call through fn's graph (READY or set aside as SLOWER: nested calls of an outer graph
 * replay whatever the comparison said), bound, run, counted: as trace__replay_call. */
int
replay__execute(PyObject *func, trace_codeinfo *info, PyObject *const *args, Py_ssize_t nargs,
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
        replay__counters.misses++;
        goto done;
    }
    Py_ssize_t order_mark = graph_mark(), moves_mark = graph_moves_mark();
    if (replay__mode == 2) {
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
        st.compiled = replay__compiled_for(p, &timed);
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
        uint64_t cpu0 = timed >= 0 ? replay__thread_cpu_ns() : 0;
        rc = replay__run(&st, result);
        if (rc == 1 && timed >= 0)
            replay__tier_timed(p, timed, replay__thread_cpu_ns() - cpu0);
        graph_set_location(outer_file, outer_line);
        if (rc == -2) {
            Py_XSETREF(p->reason, Py_XNewRef(st.bail_reason));
        }
        replay__state_clear(&st);
    }
    if (rc == 1) {
        p->hits++;
        p->compiled_runs += compiled;
        p->bails_in_a_row = 0;
        replay__counters.hits++;
    }
    else if (rc == -2) {
        /* Nothing it did can be seen: drop its tasks and trace the call instead. */
        graph_cancel_since(order_mark);
        graph_moves_truncate(moves_mark);
        p->bails++;
        replay__counters.bails++;
        if (++p->bails_in_a_row >= BAILS_TO_GIVE_UP)
            p->state = REPLAY_DEAD;
        rc = 0;
    }
done:
    if (bound != small)
        PyMem_Free(bound);
    return rc;
}

uint64_t
replay__thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t
replay__median3(const uint64_t *v, int n)
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
        replay__jit_mode = m;
    }
    if (after_jit >= 0)
        replay__jit_after = after_jit;
    if (max_jit >= 0)
        replay__jit_max = max_jit;
    if (compare >= 0)
        replay_compare = compare != 0;
    if (guess >= 0)
        replay__guess_mode = guess > 2 ? 1 : guess;
    if (mode != NULL) {
        if (strcmp(mode, "off") == 0)
            replay__mode = 0;
        else if (strcmp(mode, "on") == 0)
            replay__mode = 1;
        else if (strcmp(mode, "reference") == 0)
            replay__mode = 2;
        else {
            PyErr_Format(PyExc_ValueError, "pydron: replay must be on, off or reference, not %s",
                         mode);
            return NULL;
        }
    }
    if (after >= 0)
        replay_after = after;
    static const char *const names[] = {"off", "on", "reference"};
    return Py_BuildValue("{ssslsisissslsl}", "mode", names[replay__mode], "after", replay_after,
                         "guess", replay__guess_mode, "compare", replay_compare, "jit",
                         jit_names[replay__jit_mode], "jit_after", replay__jit_after, "jit_max",
                         replay__jit_max);
}

static PyObject *
core_replay_stats(PyObject *module, PyObject *noargs)
{
    const struct replay_counters *c = &replay__counters;
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsKsKsKsKsKsK}", "slower",
                         (unsigned long long)c->slower,
                         "disk_hits", (unsigned long long)c->disk_hits,
                         "hits", (unsigned long long)c->hits, "misses",
                         (unsigned long long)c->misses, "lifts", (unsigned long long)c->lifts,
                         "refusals", (unsigned long long)c->refusals, "bails",
                         (unsigned long long)c->bails, "guesses", (unsigned long long)c->guesses,
                         "mispredicts", (unsigned long long)c->mispredicts, "maps",
                         (unsigned long long)c->maps, "speculative_tasks",
                         (unsigned long long)c->speculative_tasks, "dropped_tasks",
                         (unsigned long long)c->dropped_tasks, "reused_tasks",
                         (unsigned long long)c->reused_tasks, "sites_stopped",
                         (unsigned long long)c->sites_stopped, "sites_resumed",
                         (unsigned long long)c->sites_resumed);
}

/* The compiled tier's part of _replay_state: "jit" (not yet, too large, queued, ready, slower
 * than the interpreter, failed: why), "compiled" (later calls run compiled code), "compile_ms"
 * (compiling or linking its object file), "from_object" (its code was linked from an object file
 * of the disk cache), "compiled_runs", and once the tiers were compared "tiers_cpu" (their
 * medians, µs). 0, or -1 + exception. */
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
            : status == JIT_QUEUED ? "queued"
            : p->ncode > replay__jit_max ? "too large" : "not yet");
    int used = status == JIT_READY &&
               (replay__jit_mode == 2 || (replay__jit_mode == 1 && p->tier_verdict >= 0));
    PyObject *v = Py_BuildValue("{sNsOsOsKsO}", "jit", what, "compiled", used ? Py_True : Py_False,
                                "compile_ms", status == JIT_READY ? PyFloat_FromDouble(ms)
                                                                  : Py_NewRef(Py_None),
                                "compiled_runs", (unsigned long long)p->compiled_runs,
                                "from_object", p->jit && jit_graph_loaded(p->jit) ? Py_True
                                                                                  : Py_False);
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
        PyObject *d = Py_BuildValue("{sIsIsisOsIsisi}", "guesses", x->guesses, "misses",
                                    x->misses, "last", (int)x->last, "guessing",
                                    x->off ? Py_False : Py_True, "stops", x->stops,
                                    "recent_misses", __builtin_popcount(x->recent),
                                    "recent_checks", (int)x->nrecent);
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
        PyObject *cmp = Py_BuildValue("{sdsdsi}", "replay_us", p->last_replay_ns / 1e3,
                                      "trace_us", p->last_trace_ns / 1e3, "recompare_every",
                                      p->recompare_every);
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
    if (replay__callee_kind(callable, &info) != CALLEE_SCHEDULED)
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
    int rc = replay__mode == 0 ? 0
             : replay__execute(fn, info, stack, n - nkw + (self != NULL), kwnames, &result);
    PyMem_Free(stack);
    if (rc < 0)
        return NULL;
    if (rc == 0) {
        PyObject *reason = info->replay && info->replay->reason ? info->replay->reason : Py_None;
        return Py_BuildValue("(OO)", Py_False, reason);
    }
    return Py_BuildValue("(ON)", Py_True, result);
}

/* _replay_warm(): what the first call that replays needs from Python, made now (enable()): the
 * helpers of pydron._replay (imported) and the tables of pure callees. */
static PyObject *
core_replay_warm(PyObject *module, PyObject *noargs)
{
    if (refresh_pure_tables() < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
core_replay_ops(PyObject *module, PyObject *noargs)
{
    PyObject *t = PyTuple_New(R_NOPS);
    for (int k = 0; t && k < R_NOPS; k++) {
        PyObject *s = PyUnicode_FromString(replay__rop_names[k]);
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
    {"_replay_warm", core_replay_warm, METH_NOARGS,
     "Import the interpreter's Python helpers and make its tables now, not at the first call."},
    {"_replay_call", core_replay_call, METH_VARARGS,
     "_replay_call(fn, args, kwnames=None): a nested scheduled call through its graph only."},
    {NULL},
};

int
trace__replay_init(PyObject *module)
{
    if (PyType_Ready(&replay__cursor_type) < 0)
        return -1;
    replay__str_out = PyUnicode_InternFromString("out");
    str_builtins = PyUnicode_InternFromString("__builtins__");
    if (replay__str_out == NULL || str_builtins == NULL)
        return -1;
    if (replay__tier_init() < 0 || replay__disk_init(module) < 0)
        return -1;
    return PyModule_AddFunctions(module, replay_methods);
}
