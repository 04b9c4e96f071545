/* LD_PRELOAD shim for the TLS rows of bench/run.sh: fio's nbd engine hands
 * libnbd only a URI, and libnbd refuses the URI's tls-certificates=DIR
 * parameter unless the program called nbd_set_uri_allow_local_file. This
 * makes every nbd_connect_uri call do that first, then connect as usual;
 * nothing else of fio or libnbd changes. Built by bench/run.sh with cc. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdbool.h>

struct nbd_handle;

int nbd_connect_uri(struct nbd_handle *h, const char *uri)
{
    int (*allow)(struct nbd_handle *, bool) = dlsym(RTLD_NEXT, "nbd_set_uri_allow_local_file");
    int (*connect)(struct nbd_handle *, const char *) = dlsym(RTLD_NEXT, "nbd_connect_uri");
    if (allow == 0 || connect == 0)
        return -1;
    if (allow(h, true) == -1)
        return -1;
    return connect(h, uri);
}
