/*
 * The pod sandbox's placeholder process (containerd's sandbox_image) for
 * nbd-csi's cluster tests, where no registry serves registry.k8s.io/pause.
 * It holds the pod's namespaces: it sleeps until SIGTERM or SIGINT and then
 * exits 0; as PID 1 of a pod sharing its PID namespace it also reaps the
 * orphans that are handed to it (SIGCHLD).
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_terminate(int sig) {
    (void)sig;
    _exit(0);
}

static void on_child(int sig) {
    (void)sig;
    int saved = errno;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved;
}

static int handle(int sig, void (*handler)(int)) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sa.sa_flags = SA_RESTART | (sig == SIGCHLD ? SA_NOCLDSTOP : 0);
    sigemptyset(&sa.sa_mask);
    return sigaction(sig, &sa, NULL);
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "-v") == 0) {
        puts("pause (nbd-csi tests/cluster/images/pause)");
        return 0;
    }
    if (getpid() != 1) {
        fprintf(stderr, "pause: warning: not PID 1, orphans are not reaped here\n");
    }
    if (handle(SIGTERM, on_terminate) || handle(SIGINT, on_terminate) || handle(SIGCHLD, on_child)) {
        perror("pause: sigaction");
        return 1;
    }
    for (;;) {
        pause();
    }
}
