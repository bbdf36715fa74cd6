/* st_file.c: the file layer: reference-counted private mappings, positioned reads,
 * and atomic writes (temporary file in the target's directory, then rename). */
#define _GNU_SOURCE
#include "st_file.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

/* ---- blobs ---- */

static atomic_long live_blobs;

long st_blob_live(void)
{
    return atomic_load(&live_blobs);
}

st_blob *st_blob_map(int fd, size_t len)
{
    st_blob *b;
    void *p;
    int saved;
    b = malloc(sizeof(*b));
    if (!b) {
        errno = ENOMEM;
        return NULL;
    }
    /* private and writable: in-place edits of loaded tensors copy the page and
     * never reach the file */
    p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
        saved = errno;
        free(b);
        errno = saved;
        return NULL;
    }
    atomic_init(&b->refs, 1);
    b->base = p;
    b->len = len;
    atomic_fetch_add(&live_blobs, 1);
    return b;
}

void st_blob_incref(st_blob *b)
{
    atomic_fetch_add_explicit(&b->refs, 1, memory_order_relaxed);
}

void st_blob_decref(st_blob *b)
{
    if (atomic_fetch_sub_explicit(&b->refs, 1, memory_order_acq_rel) != 1)
        return;
    munmap(b->base, b->len);
    free(b);
    atomic_fetch_sub(&live_blobs, 1);
}

/* ---- reading ---- */

int st_fd_size(int fd, uint64_t *size)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return -1;
    if (S_ISDIR(st.st_mode)) {
        errno = EISDIR;
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        /* pipes and devices have no stable size to validate against */
        errno = EINVAL;
        return -1;
    }
    *size = (uint64_t)st.st_size;
    return 0;
}

int st_open_read(const char *path, uint64_t *size)
{
    int fd, saved;
    /* O_NONBLOCK: opening a FIFO for reading would wait for a writer; it has no
     * effect on the regular files that are all we accept */
    do {
        fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return -1;
    if (st_fd_size(fd, size) != 0) {
        saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

int st_pread_all(int fd, void *buf, size_t len, uint64_t offset)
{
    uint8_t *p = buf;
    while (len) {
        size_t chunk = len > (1u << 30) ? (1u << 30) : len;
        ssize_t r = pread(fd, p, chunk, (off_t)offset);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (r == 0) {
            errno = ENODATA; /* the file is shorter than when it was validated */
            return -1;
        }
        p += r;
        len -= (size_t)r;
        offset += (uint64_t)r;
    }
    return 0;
}

/* ---- atomic writing ---- */

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

#define ST_PROC_SUPER_MAGIC 0x9fa0 /* linux/magic.h */

/* Whether the link at path lives in procfs (/proc/self/fd/N, /dev/stdout's target):
 * a "magic" link whose text ("pipe:[12]", "/tmp/x (deleted)") is not a path. */
static int in_procfs(const char *path)
{
    char *copy = strdup(path);
    struct statfs fs;
    int magic;
    if (!copy)
        return 0;
    magic = statfs(dirname(copy), &fs) == 0 && fs.f_type == ST_PROC_SUPER_MAGIC;
    free(copy);
    return magic;
}

/* The file a path names once symlinks are followed, as open() would write it, even
 * when the last link dangles. A procfs link is not followed as text: *magic is set
 * and the path returned as it is, for open() to resolve. Returns a malloc'd path, or
 * NULL with errno set. */
static char *follow_links(const char *path, int *magic)
{
    char *cur = strdup(path);
    *magic = 0;
    for (int hops = 0; cur; hops++) {
        struct stat st;
        char target[PATH_MAX];
        ssize_t n;
        if (lstat(cur, &st) != 0 || !S_ISLNK(st.st_mode))
            return cur; /* not a link (or absent): write here */
        if (in_procfs(cur)) {
            *magic = 1;
            return cur;
        }
        if (hops == 40) {
            free(cur);
            errno = ELOOP;
            return NULL;
        }
        n = readlink(cur, target, sizeof(target) - 1);
        if (n < 0) {
            int saved = errno;
            free(cur);
            errno = saved;
            return NULL;
        }
        target[n] = '\0';
        if (target[0] == '/') {
            free(cur);
            cur = strdup(target);
        } else {
            /* relative to the link's own directory */
            char *copy = strdup(cur), *next = NULL;
            if (copy) {
                const char *dir = dirname(copy);
                size_t len = strlen(dir) + strlen(target) + 2;
                next = malloc(len);
                if (next)
                    snprintf(next, len, "%s/%s", dir, target);
            }
            free(copy);
            free(cur);
            cur = next;
        }
    }
    errno = ENOMEM;
    return NULL;
}

int st_writer_open(st_writer *w, const char *path)
{
    struct stat st;
    char *dir_copy = NULL, *base_copy = NULL;
    const char *dir, *base;
    mode_t mode = 0666;
    int have_mode = 0, saved, magic = 0;
    static atomic_ulong counter;

    w->fd = -1;
    w->tmp = NULL;
    w->written = 0;
    w->target = NULL;
    /* a symlink is followed: the file it names is replaced, as open() would write it */
    w->target = follow_links(path, &magic);
    if (!w->target)
        goto error;
    if (magic) {
        /* /proc/self/fd/N names an open file, which may be unlinked or renamed, or
         * a pipe: write into that very file in place, as open(path, "wb") does */
        if (stat(w->target, &st) != 0)
            goto error;
        if (S_ISDIR(st.st_mode)) {
            errno = EISDIR;
            goto error;
        }
        do {
            w->fd = open(w->target, O_WRONLY | O_CLOEXEC | (S_ISREG(st.st_mode) ? O_TRUNC : 0));
        } while (w->fd < 0 && errno == EINTR);
        if (w->fd < 0)
            goto error;
        return 0;
    }
    if (stat(w->target, &st) == 0) {
        if (S_ISDIR(st.st_mode)) {
            errno = EISDIR;
            goto error;
        }
        if (!S_ISREG(st.st_mode)) {
            /* a device or a pipe (/dev/null, a FIFO): write into it as open() would;
             * renaming a file over it would replace the node itself */
            do {
                w->fd = open(w->target, O_WRONLY | O_CLOEXEC);
            } while (w->fd < 0 && errno == EINTR);
            if (w->fd < 0)
                goto error;
            return 0;
        }
        mode = st.st_mode & 07777;
        have_mode = 1;
    }
    dir_copy = strdup(w->target);
    base_copy = strdup(w->target);
    if (!dir_copy || !base_copy)
        goto error;
    dir = dirname(dir_copy);
    base = basename(base_copy);
    for (int attempt = 0; attempt < 100; attempt++) {
        struct timespec ts;
        uint64_t r;
        size_t n;
        clock_gettime(CLOCK_REALTIME, &ts);
        r = mix64((uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 32) ^
                  (uint64_t)atomic_fetch_add(&counter, 1) ^ (uint64_t)(uintptr_t)w);
        n = strlen(dir) + strlen(base) + 48;
        free(w->tmp);
        w->tmp = malloc(n);
        if (!w->tmp)
            goto error;
        /* the name keeps the target's when it fits: a stale one says whose it was */
        if (strlen(base) + 22 <= NAME_MAX)
            snprintf(w->tmp, n, "%s/.%s.%016llx.tmp", dir, base, (unsigned long long)r);
        else
            snprintf(w->tmp, n, "%s/.torch_safetensors.%016llx.tmp", dir, (unsigned long long)r);
        w->fd = open(w->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, have_mode ? 0600 : 0666);
        if (w->fd >= 0 || errno != EEXIST)
            break;
    }
    if (w->fd < 0)
        goto error;
    /* an existing file keeps its permission bits (umask does not apply to fchmod) */
    if (have_mode && fchmod(w->fd, mode) != 0)
        goto error;
    free(dir_copy);
    free(base_copy);
    return 0;
error:
    saved = errno;
    if (w->fd >= 0) {
        close(w->fd);
        unlink(w->tmp);
        w->fd = -1;
    }
    free(dir_copy);
    free(base_copy);
    free(w->tmp);
    free(w->target);
    w->tmp = w->target = NULL;
    errno = saved;
    return -1;
}

int st_writer_writev(st_writer *w, struct iovec *iov, int cnt)
{
    while (cnt > 0) {
        ssize_t r = writev(w->fd, iov, cnt);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (r == 0) {
            errno = EIO;
            return -1;
        }
        w->written += (uint64_t)r;
        /* skip what was written, resuming inside a partly written segment */
        size_t left = (size_t)r;
        while (cnt > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return 0;
}

static int sync_dir(const char *path)
{
    char *copy = strdup(path);
    int fd, rc = 0, saved;
    if (!copy)
        return -1;
    fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 || fsync(fd) != 0)
        rc = -1;
    saved = errno;
    if (fd >= 0)
        close(fd);
    free(copy);
    errno = saved;
    return rc;
}

void st_writer_abort(st_writer *w)
{
    int saved = errno;
    if (w->fd >= 0)
        close(w->fd);
    if (w->tmp)
        unlink(w->tmp);
    free(w->tmp);
    free(w->target);
    w->fd = -1;
    w->tmp = w->target = NULL;
    errno = saved;
}

int st_writer_commit(st_writer *w, int durable)
{
    int rc;
    if (!w->tmp) {
        /* written in place (a device, a pipe, a /proc/self/fd link): nothing to
         * rename; a regular file is still flushed when asked */
        struct stat st;
        if (durable && fstat(w->fd, &st) == 0 && S_ISREG(st.st_mode) && fdatasync(w->fd) != 0) {
            st_writer_abort(w);
            return -1;
        }
        rc = close(w->fd);
        w->fd = -1;
        free(w->target);
        w->target = NULL;
        return rc;
    }
    if (durable && fdatasync(w->fd) != 0)
        goto error;
    rc = close(w->fd);
    w->fd = -1;
    /* close can report a deferred write error (NFS, quotas) */
    if (rc != 0)
        goto error;
    if (rename(w->tmp, w->target) != 0)
        goto error;
    if (durable && sync_dir(w->target) != 0) {
        /* the new file is in place; only the directory flush failed */
        int saved = errno;
        free(w->tmp);
        free(w->target);
        w->tmp = w->target = NULL;
        errno = saved;
        return -1;
    }
    free(w->tmp);
    free(w->target);
    w->tmp = w->target = NULL;
    return 0;
error:
    st_writer_abort(w);
    return -1;
}
