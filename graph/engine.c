/* graph/engine.c — the dependency engine of engine.h: a table of nodes with free-slot reuse,
 * dependents lists (two inline, more on the heap), readiness counts, failure propagation with an
 * explicit stack (chains of a million tasks must not overflow the C stack). */
#include "graph/engine.h"

#include <stdlib.h>
#include <string.h>

#define INLINE_DEPENDENTS 2
#define NO_SLOT UINT32_MAX
#define GEN_MASK ((1u << 30) - 1)      /* handles stay below 2^62 */

typedef struct {
    void *owner;
    uint32_t gen;                      /* of the current occupant; bumped at each reuse */
    uint8_t state;
    uint8_t live;
    uint32_t nwaiting;                 /* unfinished dependencies */
    uint32_t ndependents, cap;         /* cap > INLINE_DEPENDENTS: on the heap */
    union {
        engine_handle inl[INLINE_DEPENDENTS];
        engine_handle *heap;
    } dependents;
    uint32_t next_free;
} node;

struct engine {
    node *nodes;
    uint32_t count, cap;               /* slots in use or freed; slots allocated */
    uint32_t free_head;
    size_t live;
    engine_handle *stack;              /* for failure propagation */
    size_t stack_cap;
};

static inline uint32_t
slot_of(engine_handle h)
{
    return (uint32_t)h;
}

static inline engine_handle
handle_of(uint32_t slot, uint32_t gen)
{
    return ((engine_handle)gen << 32) | slot;
}

/* The live node h names, or NULL. */
static node *
lookup(const engine *e, engine_handle h)
{
    uint32_t s = slot_of(h);
    if (s >= e->count)
        return NULL;
    node *n = &e->nodes[s];
    return n->live && n->gen == (uint32_t)(h >> 32) ? n : NULL;
}

static engine_handle *
dependents_of(node *n)
{
    return n->cap > INLINE_DEPENDENTS ? n->dependents.heap : n->dependents.inl;
}

engine *
engine_new(void)
{
    engine *e = calloc(1, sizeof(engine));
    if (e)
        e->free_head = NO_SLOT;
    return e;
}

void
engine_free(engine *e)
{
    if (e == NULL)
        return;
    for (uint32_t i = 0; i < e->count; i++)
        if (e->nodes[i].cap > INLINE_DEPENDENTS)
            free(e->nodes[i].dependents.heap);
    free(e->nodes);
    free(e->stack);
    free(e);
}

int
engine_add(engine *e, void *owner, engine_handle *h)
{
    uint32_t s;
    if (e->free_head != NO_SLOT) {
        s = e->free_head;
        e->free_head = e->nodes[s].next_free;
    }
    else {
        if (e->count == e->cap) {
            uint32_t cap = e->cap ? e->cap * 2 : 1024;
            if (cap <= e->cap)
                return -1;
            node *nodes = realloc(e->nodes, (size_t)cap * sizeof(node));
            if (nodes == NULL)
                return -1;
            e->nodes = nodes;
            e->cap = cap;
        }
        s = e->count++;
        e->nodes[s].gen = 0;
    }
    node *n = &e->nodes[s];
    uint32_t gen = (n->gen + 1) & GEN_MASK;
    memset(n, 0, sizeof(*n));
    n->gen = gen ? gen : 1;            /* never 0: a handle is never 0 */
    n->owner = owner;
    n->live = 1;
    n->state = ENGINE_WAITING;
    n->cap = INLINE_DEPENDENTS;
    e->live++;
    *h = handle_of(s, n->gen);
    return 0;
}

static int
push_dependent(node *n, engine_handle h)
{
    if (n->ndependents == n->cap) {
        uint32_t cap = n->cap * 2;
        engine_handle *d;
        if (n->cap > INLINE_DEPENDENTS) {
            d = realloc(n->dependents.heap, (size_t)cap * sizeof(engine_handle));
            if (d == NULL)
                return -1;
        }
        else {
            d = malloc((size_t)cap * sizeof(engine_handle));
            if (d == NULL)
                return -1;
            memcpy(d, n->dependents.inl, sizeof(n->dependents.inl));
        }
        n->dependents.heap = d;
        n->cap = cap;
    }
    dependents_of(n)[n->ndependents++] = h;
    return 0;
}

int
engine_depend(engine *e, engine_handle h, engine_handle on)
{
    node *n = lookup(e, h), *d = lookup(e, on);
    if (n == NULL || d == NULL)
        return -1;
    if (d->state == ENGINE_DONE)
        return 0;
    if (d->state == ENGINE_FAILED)
        return 2;
    if (push_dependent(d, h) < 0)
        return -1;
    n->nwaiting++;
    return 1;
}

int
engine_seal(engine *e, engine_handle h)
{
    node *n = lookup(e, h);
    if (n == NULL || n->state != ENGINE_WAITING || n->nwaiting)
        return 0;
    n->state = ENGINE_READY;
    return 1;
}

void
engine_set_running(engine *e, engine_handle h)
{
    node *n = lookup(e, h);
    if (n && n->state == ENGINE_READY)
        n->state = ENGINE_RUNNING;
}

static int
grow(engine_handle **a, size_t *cap, size_t need, engine_handle **b)
{
    if (need <= *cap)
        return 0;
    size_t c = *cap ? *cap * 2 : 64;
    while (c < need)
        c *= 2;
    engine_handle *na = realloc(*a, c * sizeof(engine_handle));
    if (na == NULL)
        return -1;
    *a = na;
    if (b) {
        engine_handle *nb = realloc(*b, c * sizeof(engine_handle));
        if (nb == NULL)
            return -1;
        *b = nb;
    }
    *cap = c;
    return 0;
}

/* Forget n's dependents list (it finished: nobody will wait on it any more). */
static void
drop_dependents(node *n)
{
    if (n->cap > INLINE_DEPENDENTS)
        free(n->dependents.heap);
    n->cap = INLINE_DEPENDENTS;
    n->ndependents = 0;
}

int
engine_finish(engine *e, engine_handle h, int failed, engine_events *ev)
{
    node *n = lookup(e, h);
    if (n == NULL || n->state == ENGINE_DONE || n->state == ENGINE_FAILED)
        return 0;
    if (!failed) {
        n->state = ENGINE_DONE;
        engine_handle *deps = dependents_of(n);
        for (uint32_t i = 0; i < n->ndependents; i++) {
            node *d = lookup(e, deps[i]);
            if (d == NULL || d->state != ENGINE_WAITING || d->nwaiting == 0)
                continue;
            if (--d->nwaiting == 0) {
                if (grow(&ev->ready, &ev->ready_cap, ev->nready + 1, NULL) < 0)
                    return -1;
                d->state = ENGINE_READY;
                ev->ready[ev->nready++] = deps[i];
            }
        }
        drop_dependents(n);
        return 0;
    }
    /* Failure: every node waiting on n, directly or not, fails with n's failure. Depth first,
     * in the order the dependents started waiting. */
    n->state = ENGINE_FAILED;
    size_t top = 0;
    if (grow(&e->stack, &e->stack_cap, 1, NULL) < 0)
        return -1;
    e->stack[top++] = h;
    while (top) {
        node *f = lookup(e, e->stack[--top]);
        if (f == NULL)
            continue;
        engine_handle *deps = dependents_of(f);
        uint32_t nd = f->ndependents;
        if (grow(&e->stack, &e->stack_cap, top + nd, NULL) < 0)
            return -1;
        /* Pushed in reverse so the first dependent is handled first. */
        for (uint32_t i = nd; i-- > 0;) {
            node *d = lookup(e, deps[i]);
            if (d == NULL || d->state != ENGINE_WAITING)
                continue;
            d->state = ENGINE_FAILED;
            d->nwaiting = 0;
            e->stack[top++] = deps[i];
        }
        drop_dependents(f);
        /* Recorded as it is popped: depth first, pre-order. */
        if (f != n) {
            if (grow(&ev->failed, &ev->failed_cap, ev->nfailed + 1, &ev->cause) < 0)
                return -1;
            ev->failed[ev->nfailed] = handle_of((uint32_t)(f - e->nodes), f->gen);
            ev->cause[ev->nfailed++] = h;
        }
    }
    return 0;
}

void
engine_remove(engine *e, engine_handle h)
{
    node *n = lookup(e, h);
    if (n == NULL)
        return;
    drop_dependents(n);
    n->live = 0;
    n->owner = NULL;
    n->next_free = e->free_head;
    e->free_head = slot_of(h);
    e->live--;
}

void *
engine_owner(const engine *e, engine_handle h)
{
    node *n = lookup(e, h);
    return n ? n->owner : NULL;
}

int
engine_state(const engine *e, engine_handle h)
{
    node *n = lookup(e, h);
    return n ? n->state : -1;
}

uint32_t
engine_waiting(const engine *e, engine_handle h)
{
    node *n = lookup(e, h);
    return n ? n->nwaiting : 0;
}

size_t
engine_live(const engine *e)
{
    return e->live;
}

size_t
engine_dependents(const engine *e, engine_handle h, engine_handle *out, size_t cap)
{
    node *n = lookup(e, h);
    if (n == NULL)
        return 0;
    engine_handle *deps = dependents_of(n);
    size_t count = 0;
    for (uint32_t i = 0; i < n->ndependents; i++) {
        node *d = lookup(e, deps[i]);
        if (d == NULL || d->state != ENGINE_WAITING)
            continue;
        if (count < cap)
            out[count] = deps[i];
        count++;
    }
    return count;
}

size_t
engine_unfinished(const engine *e, engine_handle *out, size_t cap)
{
    size_t n = 0;
    for (uint32_t i = 0; i < e->count; i++) {
        const node *d = &e->nodes[i];
        if (!d->live || d->state == ENGINE_DONE || d->state == ENGINE_FAILED)
            continue;
        if (n < cap)
            out[n] = handle_of(i, d->gen);
        n++;
    }
    return n;
}

size_t
engine_bytes(const engine *e)
{
    size_t b = sizeof(*e) + (size_t)e->cap * sizeof(node) + e->stack_cap * sizeof(engine_handle);
    for (uint32_t i = 0; i < e->count; i++)
        if (e->nodes[i].cap > INLINE_DEPENDENTS)
            b += (size_t)e->nodes[i].cap * sizeof(engine_handle);
    return b;
}

void
engine_events_clear(engine_events *ev)
{
    ev->nready = 0;
    ev->nfailed = 0;
}

void
engine_events_free(engine_events *ev)
{
    free(ev->ready);
    free(ev->failed);
    free(ev->cause);
    memset(ev, 0, sizeof(*ev));
}
