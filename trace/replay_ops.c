/* trace/replay_ops.c — the operations of the register program, one function per operation (or
 * pair), the interpreter's step over them (replay__exec_one: a switch, so that the small ones
 * inline) and their table for the compiled tier (the same functions: the tiers cannot differ);
 * and a loop's rewindable iterator (the cursor), which only FOR and ITER make and read.
 *
 * Thread and GIL model: GIL held throughout; an operation touches only its call's run_state and
 * objects that call made (see replay.c). */
#include "trace/replay_internal.h"

static void
cursor_dealloc(PyObject *self)
{
    cursor *c = (cursor *)self;
    Py_XDECREF(c->it);
    Py_XDECREF(c->kept);
    Py_TYPE(self)->tp_free(self);
}

PyTypeObject replay__cursor_type = {
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
    cursor *c = PyObject_New(cursor, &replay__cursor_type);
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

/* One function per operation (or pair of operations), called by the interpreter's switch
 * (replay__exec_one) and by the compiled tier's code (jit/jit.c), so the two tiers cannot differ.
 * Each executes instruction i, which is at *pc, and moves *pc on. 0: go on; 1: returned (*pc is the
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
        dst = replay__operand(st, pc, R[r], deep, guessing ? SLICE() : -1);                    \
        if (dst == NULL) {                                                                     \
            if (PyErr_Occurred())                                                              \
                return replay__failed(st, here, replay__rop_names[i->op]);                     \
            return 0;                         /* guessed: *pc is the branch's way */           \
        }                                                                                      \
    } while (0)
#define NEED(r)                                                                              \
    do {                                                                                       \
        if (R[r] == NULL)                                                                      \
            return replay__bail(st, here, "line %d reads a name that has no value",          \
                                i->line);                                                    \
    } while (0)
/* READ of an operation's second operand; first, the value of its first, is released when the
 * operation returns here. what: the operation, in its failure's message. */
#define READ_SECOND(dst, r, deep, first, what)                                                 \
    do {                                                                                       \
        if (R[r] == NULL) {                                                                    \
            Py_DECREF(first);                                                                  \
            return replay__bail(st, here, "line %d reads a name that has no value", i->line);  \
        }                                                                                      \
        dst = replay__operand(st, pc, R[r], deep, guessing ? SLICE() : -1);                    \
        if (dst == NULL) {                                                                     \
            Py_DECREF(first);                                                                  \
            if (PyErr_Occurred())                                                              \
                return replay__failed(st, here, what);                                         \
            return 0;                         /* guessed: *pc is the branch's way */           \
        }                                                                                      \
    } while (0)
/* READ of what the operation iterates over. An iterator the call was handed cannot be consumed
 * here: the trace, taking over, would find it consumed. */
#define READ_ITERABLE(dst, r)                                                                  \
    do {                                                                                       \
        READ(dst, r, 0);                                                                       \
        if (replay__outside_iterator(st, r, dst)) {                                            \
            Py_DECREF(dst);                                                                    \
            return replay__bail(st, here, "line %d consumes an iterator it was handed",        \
                                i->line);                                                      \
        }                                                                                      \
    } while (0)

/* A change in place cannot be undone: with guesses open, they are checked first (waiting); the
 * operation runs again once all of them held, else the run goes on where the rollback put *pc.
 * What the operation returns. */
static int
settle_before_change(run_state *st, int *pc, int here)
{
    int rc = replay__settle_all(st, pc);
    if (rc < 0)
        return -1;
    if (rc == 0)
        *pc = here;           /* all held: do it again, without guesses open */
    return 0;
}

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
    replay__set_reg(st, i->a, Py_NewRef(PyTuple_GET_ITEM(p->consts, i->b)), OUTSIDE);
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
            return replay__failed(st, here, "a global lookup");
        return replay__bail(st, here, "line %d reads %U, which is not defined", i->line, name);
    }
    replay__set_reg(st, i->a, Py_NewRef(v), OUTSIDE);
    return 0;
}

static int
op_move(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    NEED(i->b);
    replay__set_reg(st, i->a, Py_NewRef(R[i->b]), st->taint[i->b]);
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
        READ_SECOND(y, i->c, 1, x, replay__rop_names[i->op]);
    }
    if (inplace && !replay__immutable(x) && st->taint[i->b] != FRESH) {
        Py_DECREF(x);
        Py_DECREF(y);
        return replay__bail(st, here, "line %d changes in place an object the call did not make",
                            i->line);
    }
    if (inplace && !replay__immutable(x) && !concat && st->ncp > 0) {
        Py_DECREF(x);
        Py_DECREF(y);
        return settle_before_change(st, pc, here);
    }
    PyObject *r = binop_fn(i->d, x, y, inplace);
    /* A new object, unless the operator handed back an operand. */
    uint8_t taint = r == x ? st->taint[i->b] : r == y ? st->taint[i->c] : FRESH;
    Py_DECREF(x);
    Py_DECREF(y);
    if (r == NULL)
        return replay__failed(st, here, "an operator");
    replay__set_reg(st, i->a, r, taint);
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
        return replay__failed(st, here, "an operator");
    replay__set_reg(st, i->a, r, FRESH);
    return 0;
}

static int
op_compare(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    int identity = i->d == 6 || i->d == 7;
    PyObject *x, *y;
    READ(x, i->b, !identity);
    READ_SECOND(y, i->c, !identity, x, "a comparison");
    PyObject *r = compare(i->d, x, y);
    Py_DECREF(x);
    Py_DECREF(y);
    if (r == NULL)
        return replay__failed(st, here, "a comparison");
    replay__set_reg(st, i->a, r, FRESH);
    return 0;
}

static int
op_getitem(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    PyObject *c, *k;
    READ(c, i->b, 0);
    READ_SECOND(k, i->c, 1, c, "a subscript");
    PyObject *r = PyObject_GetItem(c, k);
    Py_DECREF(c);
    Py_DECREF(k);
    if (r == NULL)
        return replay__failed(st, here, "a subscript");
    replay__set_reg(st, i->a, r, OUTSIDE);
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
        return replay__failed(st, here, "an attribute lookup");
    replay__set_reg(st, i->a, r, OUTSIDE);
    return 0;
}

static int
op_build_sequence(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    PyObject *r = i->op == R_BUILD_LIST ? PyList_New(i->c) : PyTuple_New(i->c);
    if (r == NULL)
        return replay__failed(st, here, "building a container");
    for (int k = 0; k < i->c; k++) {
        PyObject *v = R[i->b + k];
        if (v == NULL) {
            Py_DECREF(r);
            return replay__bail(st, here, "line %d reads a name that has no value", i->line);
        }
        if (i->op == R_BUILD_LIST)
            PyList_SET_ITEM(r, k, Py_NewRef(v));
        else
            PyTuple_SET_ITEM(r, k, Py_NewRef(v));
    }
    replay__set_reg(st, i->a, r, FRESH);
    return 0;
}

static int
op_build_dict(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    PyObject *r = PyDict_New();
    if (r == NULL)
        return replay__failed(st, here, "building a dict");
    for (int k = 0; k < i->c; k++) {
        PyObject *kv = R[i->b + 2 * k], *vv = R[i->b + 2 * k + 1];
        if (kv == NULL || vv == NULL) {
            Py_DECREF(r);
            return replay__bail(st, here, "line %d reads a name that has no value", i->line);
        }
        PyObject *key = trace__force_deep(kv);
        if (key == NULL || PyDict_SetItem(r, key, vv) < 0) {
            Py_XDECREF(key);
            Py_DECREF(r);
            return replay__failed(st, here, "building a dict");
        }
        Py_DECREF(key);
    }
    replay__set_reg(st, i->a, r, FRESH);
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
                return replay__bail(st, here, "line %d reads a name that has no value", i->line);
            return replay__failed(st, here, "a slice");
        }
    }
    PyObject *r = PySlice_New(part[0], part[1], part[2]);
    for (int k = 0; k < 3; k++)
        Py_XDECREF(part[k]);
    if (r == NULL)
        return replay__failed(st, here, "a slice");
    replay__set_reg(st, i->a, r, FRESH);
    return 0;
}

static int
op_append(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    NEED(i->a);
    NEED(i->b);
    if (!PyList_CheckExact(R[i->a]) || st->taint[i->a] != FRESH)
        return replay__bail(st, here, "line %d appends to something else than a list it made",
                            i->line);
    if (replay__note_append(st, R[i->a]) < 0 || PyList_Append(R[i->a], R[i->b]) < 0)
        return replay__failed(st, here, "an append");
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
        return replay__failed(st, here, "a call");
    trace_codeinfo *info = NULL;
    int kind = replay__callee_kind(callable, &info);
    if (kind == CALLEE_OTHER) {
        PyObject *n = replay__callee_name(callable);
        int rc = replay__bail(st, here, "line %d calls %S, which is neither functional nor "
                              "known to be pure", i->line, n ? n : Py_None);
        Py_XDECREF(n);
        Py_DECREF(callable);
        return rc;
    }
    PyObject *r = NULL;
    uint8_t taint = FRESH;
    if (kind == CALLEE_FUNCTIONAL) {
        r = replay__functional_call(st, callable, &R[i->c], i->d, kwnames);
        /* A thread task may hand back what it was given. */
        taint = info && info->options.threads ? OUTSIDE : FRESH;
    }
    else if (kind == CALLEE_SCHEDULED) {
        /* Nested, through its own graph: it must replay too (its trace would run under no
         * frame of ours), else this call gives up. */
        int rc = replay__call_scheduled(st, here, callable, info, &R[i->c], i->d, kwnames, &r);
        Py_DECREF(callable);
        if (rc != 0)
            return rc;
        replay__set_reg(st, i->a, r, OUTSIDE);
        return 0;
    }
    else {
        for (Py_ssize_t k = 0; k < total; k++)
            if (replay__outside_iterator(st, i->c + k, R[i->c + k])) {
                Py_DECREF(callable);
                return replay__bail(st, here, "line %d hands on an iterator it was handed",
                                    i->line);
            }
        if (nkw) {
            int has_out = PySequence_Contains(kwnames, replay__str_out);
            if (has_out != 0) {
                Py_DECREF(callable);
                if (has_out < 0)
                    return replay__failed(st, here, "a call");
                return replay__bail(st, here, "line %d passes out=: the callee writes into it",
                                    i->line);
            }
        }
        r = trace__dispatch(callable, &R[i->c], i->d, kwnames);
        if (r != NULL) {
            taint = replay__makes_new_object(callable) ? FRESH : OUTSIDE;
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
        return replay__failed(st, here, "a call");
    replay__set_reg(st, i->a, r, taint);
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
    READ_ITERABLE(x, i->b);
    PyObject *it = PyObject_GetIter(x);
    Py_DECREF(x);
    PyObject *r = it ? cursor_new(it) : NULL;
    if (r == NULL)
        return replay__failed(st, here, "iter()");
    replay__set_reg(st, i->a, r, st->taint[i->b] == FRESH ? FRESH : WRAPS);
    return 0;
}

static int
op_for(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    NEED(i->b);
    PyObject *v = Py_IS_TYPE(R[i->b], &replay__cursor_type)
                  ? cursor_next((cursor *)R[i->b], st->ncp > 0) : PyIter_Next(R[i->b]);
    if (v == NULL) {
        if (PyErr_Occurred())
            return replay__failed(st, here, "a loop step");
        *pc = i->c;
        return 0;
    }
    replay__set_reg(st, i->a, v, OUTSIDE);
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
        int rc = replay__settle_arrived(st, pc);
        if (rc != 0)
            return rc < 0 ? -1 : 0;       /* a wrong guess was found: *pc moved */
    }
    PyObject *x;
    int own = guessing && replay__may_guess(st, here) ? here : -1;
    x = replay__operand(st, pc, R[i->a], 0, own);
    if (x == NULL) {
        if (PyErr_Occurred())
            return replay__failed(st, here, "a truth test");
        return 0;
    }
    if (st->nospec_pc == here)
        st->nospec_pc = -1;
    int t = PyObject_IsTrue(x);
    Py_DECREF(x);
    if (t < 0)
        return replay__failed(st, here, "a truth test");
    rsite *site = &p->sites[i->c];
    if (guessing && site->off && site->last >= 0)
        replay__site_checked(site, site->last != t);   /* what it would have guessed */
    site->last = (int8_t)t;
    if ((i->op == R_IF_FALSE) != t)
        *pc = i->b;
    return 0;
}

static int
op_unpack(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    PyObject *x;
    READ_ITERABLE(x, i->b);
    PyObject *t = PySequence_Tuple(x);
    Py_DECREF(x);
    if (t == NULL)
        return replay__failed(st, here, "unpacking");
    if (PyTuple_GET_SIZE(t) != i->c) {
        Py_DECREF(t);
        return replay__bail(st, here, "line %d unpacks the wrong number of values", i->line);
    }
    for (int k = 0; k < i->c; k++)
        replay__set_reg(st, i->a + k, Py_NewRef(PyTuple_GET_ITEM(t, k)), OUTSIDE);
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
    return replay__bail(st, here, "%U: the trace raises what plain Python raises",
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
        return replay__bail(st, here, "line %d changes a container the call did not make", i->line);
    if (st->ncp > 0)
        return settle_before_change(st, pc, here);
    PyObject *c = trace__force(R[i->a]);
    if (c == NULL)
        return replay__failed(st, here, "a store");
    int rc;
    if (i->op == R_SET_ADD) {
        PyObject *v = PyAnySet_Check(c) ? trace__force_deep(R[i->b]) : NULL;
        if (v == NULL && !PyErr_Occurred()) {
            Py_DECREF(c);
            return replay__bail(st, here, "line %d adds to something else than a set it made",
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
    return rc < 0 ? replay__failed(st, here, "a store") : 0;
}

static int
op_extend(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    NEED(i->a);
    NEED(i->b);
    if (!PyList_CheckExact(R[i->a]) || st->taint[i->a] != FRESH)
        return replay__bail(st, here, "line %d extends something else than a list it made",
                            i->line);
    PyObject *items = trace__force(R[i->b]);
    if (items == NULL)
        return replay__failed(st, here, "extend()");
    if (replay__outside_iterator(st, i->b, items)) {
        Py_DECREF(items);
        return replay__bail(st, here, "line %d consumes an iterator it was handed", i->line);
    }
    int rc = replay__note_append(st, R[i->a]);
    PyObject *r = rc < 0 ? NULL : PySequence_InPlaceConcat(R[i->a], items);
    Py_DECREF(items);
    if (r == NULL)
        return replay__failed(st, here, "extend()");
    Py_DECREF(r);
    return 0;
}

static int
op_build_set(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    PyObject *r = PySet_New(NULL);
    if (r == NULL)
        return replay__failed(st, here, "building a set");
    for (int k = 0; k < i->c; k++) {
        if (R[i->b + k] == NULL) {
            Py_DECREF(r);
            return replay__bail(st, here, "line %d reads a name that has no value", i->line);
        }
        PyObject *v = trace__force_deep(R[i->b + k]);
        if (v == NULL || PySet_Add(r, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(r);
            return replay__failed(st, here, "building a set");
        }
        Py_DECREF(v);
    }
    replay__set_reg(st, i->a, r, FRESH);
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
            return replay__failed(st, here, "a format");
        }
    }
    PyObject *conv = i->c == 's' ? PyObject_Str(v) : i->c == 'r' ? PyObject_Repr(v)
                     : i->c == 'a' ? PyObject_ASCII(v) : Py_NewRef(v);
    Py_DECREF(v);
    PyObject *r = conv ? PyObject_Format(conv, spec) : NULL;
    Py_XDECREF(conv);
    Py_XDECREF(spec);
    if (r == NULL)
        return replay__failed(st, here, "a format");
    replay__set_reg(st, i->a, r, FRESH);
    return 0;
}

static int
op_build_string(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    PyObject *parts = PyTuple_New(i->c);
    if (parts == NULL)
        return replay__failed(st, here, "an f-string");
    for (int k = 0; k < i->c; k++) {
        PyObject *v = R[i->b + k];
        if (v == NULL || !PyUnicode_Check(v)) {
            Py_DECREF(parts);
            return replay__bail(st, here, "line %d joins something that is not a str", i->line);
        }
        PyTuple_SET_ITEM(parts, k, Py_NewRef(v));
    }
    PyObject *empty = PyUnicode_New(0, 0);
    PyObject *r = empty ? PyUnicode_Join(empty, parts) : NULL;
    Py_XDECREF(empty);
    Py_DECREF(parts);
    if (r == NULL)
        return replay__failed(st, here, "an f-string");
    replay__set_reg(st, i->a, r, FRESH);
    return 0;
}

static int
op_deref(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    PyObject *closure = PyFunction_GET_CLOSURE(st->func);
    if (closure == NULL || i->b >= PyTuple_GET_SIZE(closure))
        return replay__bail(st, here, "line %d reads a free variable the function does not have",
                            i->line);
    PyObject *v = PyCell_GET(PyTuple_GET_ITEM(closure, i->b));
    if (v == NULL)
        return replay__bail(st, here, "line %d reads a free variable that has no value", i->line);
    replay__set_reg(st, i->a, Py_NewRef(v), OUTSIDE);
    return 0;
}

static int
op_map(run_state *st, int *pc, const rins *i, int guessing)
{
    OP_BEGIN();
    int bailed = 0;
    PyObject *r = replay__run_map(st, here, i, &bailed);
    if (r == NULL)
        return bailed ? bailed : replay__failed(st, here, "a map");
    replay__set_reg(st, i->a, r, FRESH);
    return 0;
}

#undef READ_ITERABLE
#undef READ_SECOND
#undef READ
#undef NEED
#undef SLICE
#undef OP_BEGIN

/* Each operation's number and function, in one list: the compiled tier's table and the
 * interpreter's switch below are both made from it. */
#define OPERATIONS(X)                                                                          \
    X(R_ARG, op_arg)                                                                           \
    X(R_CONST, op_const)                                                                       \
    X(R_GLOBAL, op_global)                                                                     \
    X(R_MOVE, op_move)                                                                         \
    X(R_BINOP, op_binop)                                                                       \
    X(R_INPLACE, op_binop)                                                                     \
    X(R_UNARY, op_unary)                                                                       \
    X(R_NOT, op_unary)                                                                         \
    X(R_COMPARE, op_compare)                                                                   \
    X(R_GETITEM, op_getitem)                                                                   \
    X(R_GETATTR, op_getattr)                                                                   \
    X(R_BUILD_LIST, op_build_sequence)                                                         \
    X(R_BUILD_TUPLE, op_build_sequence)                                                        \
    X(R_BUILD_DICT, op_build_dict)                                                             \
    X(R_BUILD_SLICE, op_build_slice)                                                           \
    X(R_APPEND, op_append)                                                                     \
    X(R_CALL, op_call)                                                                         \
    X(R_KWNAMES, op_kwnames)                                                                   \
    X(R_ITER, op_iter)                                                                         \
    X(R_FOR, op_for)                                                                           \
    X(R_JUMP, op_jump)                                                                         \
    X(R_IF_FALSE, op_branch)                                                                   \
    X(R_IF_TRUE, op_branch)                                                                    \
    X(R_UNPACK, op_unpack)                                                                     \
    X(R_RETURN, op_return)                                                                     \
    X(R_BAIL, op_bail)                                                                         \
    X(R_STORE_ITEM, op_store)                                                                  \
    X(R_SET_ADD, op_store)                                                                     \
    X(R_EXTEND, op_extend)                                                                     \
    X(R_BUILD_SET, op_build_set)                                                               \
    X(R_FORMAT, op_format)                                                                     \
    X(R_BUILD_STRING, op_build_string)                                                         \
    X(R_DEREF, op_deref)                                                                       \
    X(R_MAP, op_map)

/* The operations by number: what the compiled tier calls (replay__rop_names gives their names). */
#define TABLE_ENTRY(op, fn) [op] = fn,
const replay_op_fn replay__op_table[R_NOPS] = {OPERATIONS(TABLE_ENTRY)};
#undef TABLE_ENTRY

/* Execute the instruction at *pc (the interpreter's step; as the operations above). */
int
replay__exec_one(run_state *st, int *pc, int guessing)
{
    const rins *i = &st->p->code[*pc];
    switch (i->op) {
#define CASE(op, fn) case op: return fn(st, pc, i, guessing);
    OPERATIONS(CASE)
#undef CASE
    }
    graph_set_location(st->p->filename, i->line);
    return replay__bail(st, *pc, "unknown operation %d", i->op);
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
