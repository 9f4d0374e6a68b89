/* trace/replay_program.c — a scheduled function's graph as the interpreter holds it: the register
 * program pydron/_replay.py lifts (Program.as_tuple()), loaded and checked instruction by
 * instruction so that a malformed one fails here, never reads out of bounds later; and the
 * operations' names (OPS in pydron/_replay.py and enum rop must agree, a test checks it).
 *
 * Thread and GIL model: GIL held throughout; a program is read-only once loaded. */
#include "trace/replay_internal.h"

const char *const replay__rop_names[R_NOPS] = {
    "ARG", "CONST", "GLOBAL", "MOVE", "BINOP", "INPLACE", "UNARY", "COMPARE", "GETITEM",
    "GETATTR", "BUILD_LIST", "BUILD_TUPLE", "BUILD_DICT", "BUILD_SLICE", "APPEND", "CALL",
    "KWNAMES", "ITER", "FOR", "JUMP", "IF_FALSE", "IF_TRUE", "UNPACK", "RETURN", "MAP", "NOT",
    "BAIL", "STORE_ITEM", "BUILD_SET", "SET_ADD", "EXTEND", "FORMAT", "BUILD_STRING", "DEREF",
};

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
int
replay__program_load(struct trace_replay *p, PyObject *t)
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
