"""A disk that is slow or hangs, for the relay's fsyncs: a library preloaded into
the process (``LD_PRELOAD``) that waits before each fsync and fdatasync for as
long as a file says (ms; -1: until the file says something else), of every
file or only of those whose path holds a given part."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long delay_ms(void) {
    const char *path = getenv("SLOWDISK_FILE");
    if (!path) return 0;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return 0;
    char buf[32];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    return atol(buf);
}

static int on_slow_disk(int fd) {
    const char *only = getenv("SLOWDISK_ONLY");
    if (!only) return 1;
    char link[64], target[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n < 0) return 0;
    target[n] = 0;
    return strstr(target, only) != NULL;
}

static void wait_for_disk(int fd) {
    int saved = errno;
    if (!on_slow_disk(fd)) {
        errno = saved;
        return;
    }
    long ms = delay_ms();
    while (ms < 0) {
        struct timespec tick = {0, 50000000L};
        nanosleep(&tick, NULL);
        ms = delay_ms();
        if (ms >= 0) ms = 0;
    }
    struct timespec left = {ms / 1000, (ms % 1000) * 1000000L};
    while (ms > 0 && nanosleep(&left, &left) == -1 && errno == EINTR) {
    }
    errno = saved;
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fsync");
    wait_for_disk(fd);
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fdatasync");
    wait_for_disk(fd);
    return real(fd);
}
"""


def slow_disk(
    directory: Path, delay_ms: int = 0, only: str | None = None
) -> tuple[dict[str, str], Path]:
    """The environment that runs a process on the slow disk, and the file that
    says its delay; ``only``: a part of the path of the files it delays, else
    every file's. The test is skipped without a C compiler."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    source, library = directory / "slowdisk.c", directory / "slowdisk.so"
    source.write_text(SOURCE)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    delay = directory / "delay_ms"
    delay.write_text(str(delay_ms))
    env = {**os.environ, "LD_PRELOAD": str(library), "SLOWDISK_FILE": str(delay)}
    if only is not None:
        env["SLOWDISK_ONLY"] = only
    return env, delay


def serving(policy: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``relay serve`` on the slow disk ``env`` gives, in a session of its own,
    all it writes in ``log``: the caller stops it by its PID."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "-c", str(policy)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
