/* st_file.h: the file layer: reference-counted private mappings of files, and
 * atomic writes through a temporary file renamed over the target. No Python. */
#ifndef ST_FILE_H
#define ST_FILE_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

/* ---- blobs: the private mapping that tensors point into ---- */

typedef struct {
    atomic_long refs;
    uint8_t *base;
    size_t len;      /* bytes mapped */
} st_blob;

/* Live blobs in this process, for leak tests. */
long st_blob_live(void);

/* Maps len bytes of fd privately (read-write, copy-on-write); refs starts at 1.
 * Returns NULL with errno set on failure. len must be > 0. */
st_blob *st_blob_map(int fd, size_t len);

/* Takes a reference. */
void st_blob_incref(st_blob *b);

/* Drops a reference; the last one unmaps. Safe from any thread. */
void st_blob_decref(st_blob *b);

/* ---- reading ---- */

/* Checks fd is a regular file and fills its size. Returns 0, or -1 with errno set. */
int st_fd_size(int fd, uint64_t *size);

/* Opens path read-only (O_CLOEXEC|O_NONBLOCK: a FIFO never blocks the open) and
 * checks it is a regular file; fills size.
 * Returns the fd, or -1 with errno set. */
int st_open_read(const char *path, uint64_t *size);

/* Reads exactly len bytes at offset; returns 0, or -1 with errno set
 * (EIO-like short reads report ENODATA: the file shrank). */
int st_pread_all(int fd, void *buf, size_t len, uint64_t offset);

/* ---- atomic writing ---- */

typedef struct {
    int fd;
    char *target;    /* resolved final path */
    char *tmp;       /* temporary path in the target's directory; NULL when in place */
    uint64_t written;
} st_writer;

/* Creates a temporary file (O_EXCL|O_CLOEXEC) beside path, with an existing
 * target's permission bits; an existing target that is not a regular file (a
 * device, a FIFO) is opened and written in place instead (tmp stays NULL), and
 * so is a procfs link such as /proc/self/fd/N or /dev/stdout's target (the file or
 * pipe it stands for, never a path built from its text).
 * Returns 0, or -1 with errno set. */
int st_writer_open(st_writer *w, const char *path);

/* Writes all of iov[0..cnt) (cnt <= IOV_MAX) at the current position, resuming
 * after short writes. Returns 0, or -1 with errno set. */
int st_writer_writev(st_writer *w, struct iovec *iov, int cnt);

/* Flushes (when durable), closes and renames over the target; on durable also
 * syncs the directory. Returns 0, or -1 with errno set (the temporary is removed). */
int st_writer_commit(st_writer *w, int durable);

/* Closes and removes the temporary file; keeps errno. */
void st_writer_abort(st_writer *w);

#endif
