/* The pod sandbox ("pause") process of the local cluster's images: sleeps until SIGTERM or
 * SIGINT, then exits 0. Built static by scripts/k8s/image.sh so the image needs no libraries. */
#include <signal.h>
#include <unistd.h>
#include <stdlib.h>

static void on_signal(int sig) { (void)sig; _exit(0); }

int main(void) {
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    for (;;) pause();
    return 0;
}
