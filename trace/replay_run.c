/* trace/replay_run.c — one call of a graph: the run loop (interpreted, or compiled code that
 * hands back to the interpreter's step when it must), giving up ("bail"), and speculation. A branch
 * whose condition reads a result that has not arrived guesses (the site's last outcome) and
 * keeps a checkpoint: the registers where the condition's computation began, the position in
 * the program order, the appends made since. The guess is checked when the result is in: at the
 * next branch, on return, before giving up. A wrong guess drops the tasks submitted since the
 * checkpoint (softly), undoes the appends, restores the registers and loop positions, takes the
 * other way, and keeps the calls it made for reuse when the same call is made again. A site whose
 * recent guesses failed too often stops guessing, and guesses again once what it would have
 * guessed held long enough (rsite in replay_internal.h).
 *
 * Thread and GIL model: GIL held throughout; everything of one call is on its C stack (run_state);
 * the per-site guess counters in the shared per-code state are only counted. */
#include "trace/replay_internal.h"

/* Give up: returns -2 with the reason noted (no exception set). */
int
replay__bail(run_state *st, int pc, const char *fmt, ...)
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
int
replay__failed(run_state *st, int pc, const char *what)
{
    PyObject *exc = PyErr_GetRaisedException();
    if (exc != NULL && !PyErr_GivenExceptionMatches(exc, PyExc_Exception)) {
        PyErr_SetRaisedException(exc);
        return -1;
    }
    PyErr_SetRaisedException(exc);
    return replay__bail(st, pc, "%s raised", what);
}

static int validate_oldest(run_state *st, int *pc);

/* A checkpoint for the branch at if_pc, the computation of whose condition began at
 * code[if_pc].d, not waiting for wait_on: then on along the guess. *pc is where to go on.
 * 0, or -1 + exception. */
int
replay__guess(run_state *st, int if_pc, PyObject *wait_on, int *pc)
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
        c->positions[r] = st->regs[r] && Py_IS_TYPE(st->regs[r], &replay__cursor_type)
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
    replay__counters.guesses++;
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
            replay__counters.dropped_tasks += (uint64_t)PyList_GET_SIZE(drop);
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
        rc = replay__exec_one(st, &at, 0);
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
    replay__site_checked(site, truth != c->guess);
    if (truth == c->guess) {
        settle_oldest(st);
        return 0;
    }
    site->misses++;
    p->mispredicts++;
    replay__counters.mispredicts++;
    int if_pc = c->if_pc;
    roll_back(st, 0);
    int jumps = br->op == R_IF_FALSE ? !truth : truth;
    *pc = jumps ? br->b : if_pc + 1;
    return 1;
}

_Static_assert(GUESS_WINDOW == 8 * sizeof(((rsite *)0)->recent),
               "a site's window is the bits of rsite.recent");

void
replay__site_checked(rsite *site, int wrong)
{
    site->recent = (uint16_t)((site->recent << 1) | (wrong != 0));
    if (site->nrecent < GUESS_WINDOW)
        site->nrecent++;
    if (!site->off && __builtin_popcount(site->recent) >= GUESS_OFF_MISSES) {
        site->off = 1;
        site->stops++;
        replay__counters.sites_stopped++;
    }
    else if (site->off && site->nrecent == GUESS_WINDOW && site->recent == 0) {
        site->off = 0;
        replay__counters.sites_resumed++;
    }
    else
        return;
    /* A new window for the new way: what the site did before says nothing about it. */
    site->recent = 0;
    site->nrecent = 0;
}

/* Settle the checkpoints whose awaited value has arrived (without waiting): as settle_all. */
int
replay__settle_arrived(run_state *st, int *pc)
{
    if (graph_pump() < 0)
        return -1;
    while (st->ncp > 0 && !replay__is_unfinished_task(st->cp[0].wait_on)) {
        int rc = validate_oldest(st, pc);
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* Settle every checkpoint (waiting): 0 when all held, 1 after a rollback (*pc is where to go
 * on), -1 + exception. */
int
replay__settle_all(run_state *st, int *pc)
{
    while (st->ncp > 0) {
        int rc = validate_oldest(st, pc);
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* Run the program: 1 returned (*result), -1 exception, -2 bail (st->bail_reason). */
int
replay__run(run_state *st, PyObject **result)
{
    int pc = 0, rc = 0;
    for (;;) {
        if (st->compiled != NULL) {
            /* Runs on until an operation says otherwise, as the loop below would. */
            rc = st->compiled(st, &pc, st->p->code, jit_operations());
            if (rc == JIT_UNKNOWN_PC)
                rc = replay__exec_one(st, &pc, 1);
        }
        else
            rc = replay__exec_one(st, &pc, 1);
        if (rc == 0)
            continue;
        if (rc == 1) {
            if (st->ncp == 0) {
                *result = Py_NewRef(st->regs[st->p->code[pc].a]);
                return 1;
            }
            /* Every guess is checked before the call returns. */
            int settled = replay__settle_all(st, &pc);
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
            int settled = replay__settle_all(st, &pc);
            if (settled < 0)
                return -1;
            if (settled > 0)
                continue;
        }
        return rc;
    }
}

void
replay__state_clear(run_state *st)
{
    if (st->pool != NULL) {
        /* Taken back by a rollback and not made again: not wanted. */
        PyObject *drop = PyList_New(0), *key, *entry;
        Py_ssize_t pos = 0;
        while (drop && PyDict_Next(st->pool, &pos, &key, &entry))
            if (PyList_Append(drop, PyTuple_GET_ITEM(entry, 0)) < 0)
                Py_CLEAR(drop);
        if (drop != NULL) {
            replay__counters.dropped_tasks += (uint64_t)PyList_GET_SIZE(drop);
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
