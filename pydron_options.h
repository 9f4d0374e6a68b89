/* pydron_options.h — options the C core takes from pydron/config.py (the one reader of PYDRON_*
 * variables), handed over by pydron.enable() through _core._configure(dict) in trace/module.c.
 * The values are set in the master before the fork server starts, so workers inherit them. */
#ifndef PYDRON_OPTIONS_H
#define PYDRON_OPTIONS_H

/* Threads of the executor="threads" pool; 0: not configured (the pool uses the online cores). */
extern int pydron_opt_thread_workers;
/* 1: large numpy arrays made in a worker are allocated in the shared arena; 0: plain malloc. */
extern int pydron_opt_arena_arrays;

#endif
