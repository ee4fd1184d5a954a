/*
 * fstatat_bench: the C-level peer of `Stack.stat_many` in benches/test_stack.py.
 *
 * Usage: fstatat_bench ROOT LIST ROUNDS
 *
 * LIST holds NUL-separated paths relative to ROOT (a directory, here a kernel overlay mount).
 * After one untimed warm-up pass, each of ROUNDS passes calls
 * fstatat(rootfd, path, &st, AT_SYMLINK_NOFOLLOW) for every path and adds up st_size (so the
 * result of every lookup is used, as the Python side reads every result's .size). One line per
 * pass: "<seconds> <lookups> <sum of sizes> <failed lookups>".
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static char *read_all(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        perror(path);
        exit(2);
    }
    size_t cap = 1 << 20, n = 0, got;
    char *buf = malloc(cap);
    while (buf != NULL && (got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            cap *= 2;
            buf = realloc(buf, cap);
        }
    }
    if (buf == NULL) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    fclose(f);
    *len = n;
    return buf;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s ROOT LIST ROUNDS\n", argv[0]);
        return 2;
    }
    int rootfd = open(argv[1], O_PATH | O_DIRECTORY);
    if (rootfd < 0) {
        perror(argv[1]);
        return 2;
    }
    size_t len;
    char *data = read_all(argv[2], &len);
    size_t count = 0;
    for (size_t i = 0; i < len; i++) {
        count += data[i] == '\0';
    }
    char **paths = malloc(count * sizeof *paths);
    size_t k = 0;
    for (size_t start = 0, i = 0; i < len; i++) {
        if (data[i] == '\0') {
            paths[k++] = data + start;
            start = i + 1;
        }
    }
    int rounds = atoi(argv[3]);
    struct stat st;
    for (int r = -1; r < rounds; r++) { /* round -1: warm-up, not reported */
        unsigned long long sum = 0, failed = 0;
        double t0 = now();
        for (size_t i = 0; i < count; i++) {
            if (fstatat(rootfd, paths[i], &st, AT_SYMLINK_NOFOLLOW) == 0) {
                sum += (unsigned long long)st.st_size;
            } else {
                failed++;
            }
        }
        double t1 = now();
        if (r >= 0) {
            printf("%.9f %zu %llu %llu\n", t1 - t0, count, sum, failed);
        }
    }
    return 0;
}
