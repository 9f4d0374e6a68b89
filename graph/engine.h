/* graph/engine.h — the dependency engine: task nodes, how many unfinished dependencies each
 * waits for, who waits for whom, and what a finish releases. Pure C (no Python): built into the
 * extension and into ctest's test_engine.
 *
 * A node is named by a handle: its slot index in the low 32 bits, the slot's generation in the
 * high bits, so a handle kept past its node's end never reaches the node that reuses the slot.
 * Handles are never 0, and stay below 2^62 (ids above are free for other uses).
 * Thread model: none; the caller serialises (pydron holds the GIL). */
#ifndef PYDRON_GRAPH_ENGINE_H
#define PYDRON_GRAPH_ENGINE_H

#include <stddef.h>
#include <stdint.h>

typedef uint64_t engine_handle;

enum engine_state {
    ENGINE_WAITING = 0,    /* dependencies unfinished, or not sealed yet */
    ENGINE_READY,          /* every dependency done: the caller may run it */
    ENGINE_RUNNING,        /* handed to an executor */
    ENGINE_DONE,
    ENGINE_FAILED,
};

typedef struct engine engine;

/* What a finish changed, in order: nodes that became READY (in the order they started waiting),
 * and nodes that failed because a node they depend on failed (depth first, each with the failed
 * node whose failure it inherits). Reused between calls; engine_events_clear empties it. */
typedef struct {
    engine_handle *ready;
    size_t nready, ready_cap;
    engine_handle *failed, *cause;
    size_t nfailed, failed_cap;
} engine_events;

engine *engine_new(void);
void engine_free(engine *e);

/* A new WAITING node carrying owner. 0, or -1 when out of memory. */
int engine_add(engine *e, void *owner, engine_handle *h);
/* Node h waits for node on: 1 when recorded; 0 when on is already DONE (nothing to wait for);
 * 2 when on has FAILED (h must fail too); -1 when out of memory or a handle is stale. */
int engine_depend(engine *e, engine_handle h, engine_handle on);
/* No more dependencies will be added to h: 1 when it is READY now, 0 when it still waits. */
int engine_seal(engine *e, engine_handle h);
/* A READY node was handed to an executor. */
void engine_set_running(engine *e, engine_handle h);
/* Node h finished (failed or not); the consequences are appended to ev. Finishing a node that
 * already finished does nothing. 0, or -1 when out of memory (ev is then incomplete). */
int engine_finish(engine *e, engine_handle h, int failed, engine_events *ev);
/* The owner is gone: the slot is free for reuse. Its dependents (if still waiting) no longer
 * wait for it; a node that was waiting for others simply stops being reported. */
void engine_remove(engine *e, engine_handle h);

/* The owner of a live node, or NULL for a stale or unknown handle. */
void *engine_owner(const engine *e, engine_handle h);
int engine_state(const engine *e, engine_handle h);        /* -1 for a stale handle */
uint32_t engine_waiting(const engine *e, engine_handle h); /* unfinished dependencies */
size_t engine_live(const engine *e);                       /* nodes added and not removed */
/* Handles of the nodes waiting for h (registered with engine_depend, not failed), up to cap of
 * them into out: the number there are. */
size_t engine_dependents(const engine *e, engine_handle h, engine_handle *out, size_t cap);
/* Handles of the live nodes not finished yet, up to cap of them into out: the number found. */
size_t engine_unfinished(const engine *e, engine_handle *out, size_t cap);
size_t engine_bytes(const engine *e);                      /* memory held by the engine */

void engine_events_clear(engine_events *ev);
void engine_events_free(engine_events *ev);

#endif
