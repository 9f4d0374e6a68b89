/* exec/forkserver.c — the fork server. exec_start forks it while the master is still young and
 * single-threaded; from then on it forks workers on request (so workers never inherit the
 * master's later threads and locks), reaps them and reports their deaths in the shared control
 * block. It runs no Python code after the fork: a loop over its command socket and SIGCHLD.
 * Thread and GIL model: the master side runs with the GIL; the server is single-threaded. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "exec/internal.h"

#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

enum { CMD_SPAWN = 1, CMD_QUIT = 2, CMD_IMPORT = 3 };

/* Longest list of module names one CMD_IMPORT carries (the packet after the command). */
#define IMPORT_LIST_MAX (256 * 1024)

/* Exit codes of a fork server that cannot go on (seen by the master's waitpid). */
enum { FS_EXIT_NO_SIGNALFD = 70, FS_EXIT_POLL = 71 };

typedef struct {
    int32_t op, slot;
} fs_command;

/* ---- master side ------------------------------------------------------------------------------ */

void
exec__flush_std_streams(void)
{
    const char *names[2] = {"stdout", "stderr"};
    for (int i = 0; i < 2; i++) {
        PyObject *f = PySys_GetObject(names[i]);   /* borrowed */
        if (f && f != Py_None) {
            PyObject *r = PyObject_CallMethod(f, "flush", NULL);
            Py_XDECREF(r);
            PyErr_Clear();       /* a closed or broken stream must not stop a fork */
        }
    }
    fflush(NULL);
}

static void forkserver_main(int sock, pid_t master) __attribute__((noreturn));
static int fs_gc_was_enabled;

pid_t
exec__forkserver_start(int *sock)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    /* Buffered output of the master would be written twice (by it and by a child). */
    exec__flush_std_streams();
    pid_t master = getpid();
    PyOS_BeforeFork();
    exec__internal_fork = 1;
    pid_t pid = fork();
    exec__internal_fork = 0;
    if (pid == 0) {
        /* No collection in the fork server: finalizers of the master's objects must not run
         * there (workers get the collector back). */
        fs_gc_was_enabled = PyGC_Disable();
        PyOS_AfterFork_Child();
        close(sv[0]);
        forkserver_main(sv[1], master);
    }
    int err = errno;
    PyOS_AfterFork_Parent();
    close(sv[1]);
    if (pid < 0) {
        close(sv[0]);
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    *sock = sv[0];
    return pid;
}

static int
send_command(int sock, int op, int slot)
{
    fs_command c = {op, slot};
    ssize_t n;
    do
        n = send(sock, &c, sizeof c, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    return n == (ssize_t)sizeof c ? 0 : -1;
}

int
exec__forkserver_spawn(int sock, int slot)
{
    return send_command(sock, CMD_SPAWN, slot);
}

void
exec__forkserver_quit(int sock)
{
    send_command(sock, CMD_QUIT, 0);
}

int
exec__forkserver_import(int sock, const char *names, size_t len)
{
    if (len == 0)
        return 0;
    if (len > IMPORT_LIST_MAX)
        len = IMPORT_LIST_MAX;       /* the rest is imported by the workers as they need it */
    if (send_command(sock, CMD_IMPORT, (int)len) < 0)
        return -1;
    ssize_t n;
    do
        n = send(sock, names, len, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    return n == (ssize_t)len ? 0 : -1;
}

/* In the fork server: import the modules the master imported since (newline-separated names),
 * so workers forked from now on have them already (a script's libraries are imported once, not
 * once per worker on its first task). Best effort: a module that fails to import is left to the
 * workers, which would import it anyway; nothing is printed. */
static void
fs_import(int sock, int len)
{
    char *names = PyMem_RawMalloc((size_t)len + 1);
    if (names == NULL)
        return;
    ssize_t n = recv(sock, names, (size_t)len, 0);
    if (n <= 0) {
        PyMem_RawFree(names);
        return;
    }
    names[n] = '\0';
    for (char *name = names, *end; *name; name = end + (*end != '\0')) {
        end = strchr(name, '\n');
        if (end == NULL)
            end = name + strlen(name);
        char saved = *end;
        *end = '\0';
        PyObject *m = PyImport_ImportModule(name);
        Py_XDECREF(m);
        PyErr_Clear();
        *end = saved;
    }
    PyMem_RawFree(names);
    exec__flush_std_streams();
}

/* ---- the server ------------------------------------------------------------------------------- */

static pid_t worker_pids[EXEC_MAX_WORKERS];
pid_t exec__forkserver_pid;            /* in the fork server and its workers: the server's pid */
static int fs_sock = -1, fs_sigfd = -1;

/* Report a death of slot's worker (or a failed fork) to the master, with its peak memory. */
static void
report_death(int slot, int status, long maxrss_kb)
{
    exec_slot *s = &exec__shared->slots[slot];
    atomic_store(&s->pid, 0);
    atomic_store(&s->death_maxrss_kb, maxrss_kb > 0 ? (uint64_t)maxrss_kb : 0);
    atomic_store(&s->death_status, status);
    atomic_fetch_add(&s->deaths, 1);
    atomic_fetch_add(&exec__shared->deaths, 1);
    wake_notify(&exec__shared->master);
}

static void
fs_spawn(int slot)
{
    if (slot < 0 || slot >= exec__shared->nslots || worker_pids[slot] > 0)
        return;
    /* As os.fork does (the child's re-initialisation expects the import lock taken here); the
     * collector stays off in the fork server, so no finalizer of the master's objects runs. */
    PyOS_BeforeFork();
    exec__internal_fork = 1;
    pid_t pid = fork();
    exec__internal_fork = 0;
    if (pid == 0) {
        PyOS_AfterFork_Child();
        if (fs_gc_was_enabled)
            PyGC_Enable();
        if (fs_sock >= 0)
            close(fs_sock);
        if (fs_sigfd >= 0)
            close(fs_sigfd);
        exec__in_forkserver = 0;
        exec__worker_main(slot);
    }
    PyOS_AfterFork_Parent();
    if (pid < 0) {
        report_death(slot, 127 << 8, 0);   /* the master sees the slot failing, not waiting */
        return;
    }
    worker_pids[slot] = pid;
    atomic_store(&exec__shared->slots[slot].pid, pid);
}

static void
fs_reap(void)
{
    int status;
    pid_t pid;
    struct rusage ru;
    while ((pid = wait4(-1, &status, WNOHANG, &ru)) > 0) {
        for (int i = 0; i < EXEC_MAX_WORKERS; i++) {
            if (worker_pids[i] != pid)
                continue;
            worker_pids[i] = 0;
            report_death(i, status, ru.ru_maxrss);
            break;
        }
    }
}

static void fs_quit(void) __attribute__((noreturn));

static void
fs_quit(void)
{
    for (int i = 0; i < EXEC_MAX_WORKERS; i++)
        if (worker_pids[i] > 0)
            kill(worker_pids[i], SIGKILL);
    for (int i = 0; i < EXEC_MAX_WORKERS; i++)
        if (worker_pids[i] > 0)
            waitpid(worker_pids[i], NULL, 0);
    _exit(0);
}

/* Close every descriptor the master had open, but ours: a socket or file the user closes later
 * must really close (a listening socket must not stay in LISTEN, held here and by workers). */
static void
close_inherited_fds(int keep, int keep2)
{
    DIR *d = opendir("/proc/self/fd");
    if (d == NULL) {
        long max = sysconf(_SC_OPEN_MAX);
        for (int fd = 3; fd < (max > 0 && max < 65536 ? max : 65536); fd++)
            if (fd != keep && fd != keep2)
                close(fd);
        return;
    }
    int dfd = dirfd(d), n = 0, fds[1024];
    struct dirent *e;
    while ((e = readdir(d)) != NULL && n < 1024) {
        int fd = atoi(e->d_name);
        if (fd > 2 && fd != keep && fd != keep2 && fd != dfd && e->d_name[0] != '.')
            fds[n++] = fd;
    }
    closedir(d);
    for (int i = 0; i < n; i++)
        close(fds[i]);
    if (n == 1024)
        close_inherited_fds(keep, keep2);      /* more than fit in one pass */
}

/* Waits for commands and for SIGCHLD. Ends with the master: its end of the socket closes when
 * the master process is gone, however it died (no PDEATHSIG: that follows the *thread* that
 * forked, and enable() may have been called from a thread that has ended since). */
static void
forkserver_main(int sock, pid_t master)
{
    if (getppid() != master)
        _exit(0);
    close_inherited_fds(sock, exec__arena_fd);     /* the arena's memfd stays: guard.c */
    prctl(PR_SET_NAME, "pydron-forksrv");
    exec__forkserver_pid = getpid();
    exec__in_forkserver = 1;
    signal(SIGINT, SIG_IGN);      /* Ctrl-C is the master's business */
    signal(SIGPIPE, SIG_IGN);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigprocmask(SIG_BLOCK, &set, NULL);
    fs_sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    fs_sock = sock;
    if (fs_sigfd < 0)
        _exit(FS_EXIT_NO_SIGNALFD);
    for (;;) {
        struct pollfd fds[2] = {{sock, POLLIN, 0}, {fs_sigfd, POLLIN, 0}};
        if (poll(fds, 2, 1000) < 0 && errno != EINTR)
            _exit(FS_EXIT_POLL);
        if (fds[1].revents) {
            struct signalfd_siginfo si;
            while (read(fs_sigfd, &si, sizeof si) > 0)
                ;
        }
        fs_reap();
        if (fds[0].revents) {
            fs_command c;
            ssize_t n = recv(sock, &c, sizeof c, 0);
            if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN))
                fs_quit();                 /* the master is gone */
            if (n == (ssize_t)sizeof c) {
                if (c.op == CMD_QUIT)
                    fs_quit();
                if (c.op == CMD_SPAWN)
                    fs_spawn(c.slot);
                if (c.op == CMD_IMPORT && c.slot > 0 && c.slot <= IMPORT_LIST_MAX)
                    fs_import(sock, c.slot);
            }
        }
    }
}
