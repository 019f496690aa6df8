"""Local stand-ins for the SLURM client commands used by snakemake-executor-plugin-slurm.

The scripts next to this file (``sbatch``, ``squeue``, ``sacct``, ``scancel``, ``srun``,
``sinfo``, ``scontrol``, ``sacctmgr``, ``sshare``) all call :func:`main` with their own name.
Put this folder first on ``PATH`` and ``snakemake --executor slurm`` runs its jobs on this
machine: ``sbatch`` starts each job as a detached local process and the query commands answer
from a state folder.

Environment:

``SLURM_SHIM_LOG``
    If set, ``sbatch`` appends one JSON line per call to this file (argv, parsed options, job
    id, job name, script text, ...).
``SLURM_SHIM_STATE``
    The state folder (job records, job scripts, a trace of every shim call in ``calls.jsonl``).
    Default: ``$SLURM_SHIM_LOG.state``, else ``$TMPDIR/slurm_shim_state_<uid>``. Jobs get it
    also as ``SHIM_SLURM_STATE``: the jobstep plugin drops every ``SLURM_*`` variable before srun.
``SLURM_SHIM_ACCOUNTS`` / ``SLURM_SHIM_PARTITIONS``
    Comma-separated accounts and partitions the fake cluster knows (default ``test`` and
    ``test``); a partition marked ``*`` is the default one (default: the first).
    ``sbatch`` rejects others, ``sacctmgr``/``sshare``/``sinfo`` list them.
``SLURM_SHIM_PENDING_SECONDS``
    Seconds a job stays PENDING before it starts (default 0).
``SLURM_SHIM_ENFORCE_TIME``
    If ``1``, a job running longer than its ``--time`` is killed and ends as TIMEOUT.
``SLURM_SHIM_KILL_WAIT``
    Seconds between SIGTERM and SIGKILL when a job is cancelled or timed out (default 5).
``SLURM_SHIM_MAX_CPUS``
    If set, ``sbatch`` rejects jobs asking for more CPUs, as SLURM does when no node has them.
``SLURM_SHIM_SACCT_WAIT``
    Opt-in, seconds: ``sacct -X --name <run>`` (the plugin's status query) waits up to this long
    until a job of that run has ended since the previous query. Keeps the plugin polling at
    ``--slurm-init-seconds-before-status-checks`` instead of adding 10 s per empty poll. While
    the query waits, the plugin holds its list of active jobs, so a Ctrl-C in that time reaches
    no ``scancel``: leave it unset in tests of cancellation.
``SLURM_SHIM_MIN_JOB_AGE`` / ``SLURM_SHIM_MAX_ARRAY_SIZE``
    What ``scontrol show config`` reports as MinJobAge (default 300) and MaxArraySize (1001).

Deviations from SLURM worth knowing: ``sacct`` ignores ``--starttime``/``--endtime`` and lists
every job of the state folder; for array tasks ``JobIDRaw`` reads ``<jobid>_<task>`` (what the
plugin looks up); states are PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT only
(a job whose supervisor died reads FAILED); memory and CPU requests are recorded, not enforced.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime

VERSION = "slurm 23.02.7-shim"
CLUSTER = "shim"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
SHORT_STATE = {
    "PENDING": "PD",
    "RUNNING": "R",
    "COMPLETED": "CD",
    "FAILED": "F",
    "CANCELLED": "CA",
    "TIMEOUT": "TO",
    "NODE_FAIL": "NF",
    "OUT_OF_MEMORY": "OOM",
}


class UsageError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# state folder


def state_dir() -> str:
    # SHIM_SLURM_STATE: the copy sbatch puts into a job's environment; the jobstep plugin removes
    # every SLURM_* variable (SLURM_SHIM_* included) before it calls srun.
    d = os.environ.get("SLURM_SHIM_STATE") or os.environ.get("SHIM_SLURM_STATE")
    if not d:
        log = os.environ.get("SLURM_SHIM_LOG")
        fallback = os.path.join(tempfile.gettempdir(), f"slurm_shim_state_{os.getuid()}")
        d = os.path.abspath(log) + ".state" if log else fallback
    d = os.path.abspath(d)
    os.makedirs(os.path.join(d, "jobs"), exist_ok=True)
    return d


@contextlib.contextmanager
def locked(sdir: str):
    with open(os.path.join(sdir, ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def append_jsonl(path: str, record: dict, sdir: str) -> None:
    with locked(sdir), open(path, "a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")


def trace(sdir: str, cmd: str, argv: list[str], **extra) -> None:
    rec = {"cmd": cmd, "argv": [cmd, *argv], "time": time.time(), "cwd": os.getcwd(), "pid": os.getpid()}
    if os.environ.get("SLURM_JOB_ID"):
        rec["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    rec.update(extra)
    append_jsonl(os.path.join(sdir, "calls.jsonl"), rec, sdir)


def record_path(sdir: str, key: str) -> str:
    return os.path.join(sdir, "jobs", f"{key}.json")


def write_record(sdir: str, rec: dict) -> None:
    path = record_path(sdir, rec["key"])
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(rec, fh, sort_keys=True)
    os.replace(tmp, path)


def read_record(sdir: str, key: str) -> dict | None:
    try:
        with open(record_path(sdir, key)) as fh:
            return json.load(fh)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def effective(rec: dict) -> dict:
    """The record with a job whose supervisor vanished before finishing marked FAILED."""
    if rec["state"] not in TERMINAL and rec.get("supervisor_pid") and not _pid_alive(rec["supervisor_pid"]):
        rec = dict(rec, state="FAILED", reason="SupervisorLost", end_time=rec.get("end_time") or time.time())
    return rec


def all_records(sdir: str) -> list[dict]:
    recs = []
    jobs = os.path.join(sdir, "jobs")
    for name in os.listdir(jobs):
        if name.endswith(".json"):
            rec = read_record(sdir, name[: -len(".json")])
            if rec is not None:
                recs.append(effective(rec))
    recs.sort(key=lambda r: (r["base_id"], r.get("array_task") or 0))
    return recs


def allocate_ids(sdir: str, n: int) -> int:
    with locked(sdir):
        path = os.path.join(sdir, "next_id")
        try:
            with open(path) as fh:
                first = int(fh.read().strip())
        except (FileNotFoundError, ValueError):
            first = 1000
        with open(path, "w") as fh:
            fh.write(str(first + n))
    return first


def cluster_accounts() -> list[str]:
    return [a.strip() for a in os.environ.get("SLURM_SHIM_ACCOUNTS", "test").split(",") if a.strip()]


def cluster_partitions() -> tuple[list[str], str]:
    raw = [p.strip() for p in os.environ.get("SLURM_SHIM_PARTITIONS", "test").split(",") if p.strip()]
    names = [p.rstrip("*") for p in raw]
    default = next((p.rstrip("*") for p in raw if p.endswith("*")), names[0] if names else "")
    return names, default


# ---------------------------------------------------------------------------------------------
# option parsing (getopt_long-like)

V, F, OPT = "value", "flag", "optional"  # option takes a value / none / only as --opt=value

_COMMON_ALLOC = {
    "account": V, "acctg-freq": V, "begin": V, "bb": V, "bbf": V, "chdir": V, "cluster-constraint": V,
    "clusters": V, "comment": V, "constraint": V, "container": V, "container-id": V, "contiguous": F,
    "core-spec": V, "cores-per-socket": V, "cpu-freq": V, "cpus-per-gpu": V, "cpus-per-task": V,
    "deadline": V, "delay-boot": V, "dependency": V, "distribution": V, "error": V, "exclude": V,
    "exclusive": OPT, "export": V, "extra": V, "extra-node-info": V, "gid": V, "gpu-bind": V,
    "gpu-freq": V, "gpus": V, "gpus-per-node": V, "gpus-per-socket": V, "gpus-per-task": V, "gres": V,
    "gres-flags": V, "help": F, "hint": V, "hold": F, "input": V, "job-name": V, "licenses": V,
    "mail-type": V, "mail-user": V, "mcs-label": V, "mem": V, "mem-bind": V, "mem-per-cpu": V,
    "mem-per-gpu": V, "mincpus": V, "network": V, "nice": OPT, "no-kill": OPT, "nodefile": V, "nodelist": V,
    "nodes": V, "ntasks": V, "ntasks-per-core": V, "ntasks-per-gpu": V, "ntasks-per-node": V,
    "ntasks-per-socket": V, "open-mode": V, "output": V, "overcommit": F, "oversubscribe": F,
    "partition": V, "power": V, "prefer": V, "priority": V, "profile": V, "propagate": OPT, "qos": V,
    "quiet": F, "reboot": F, "reservation": V, "resv-ports": OPT, "segment": V, "signal": V,
    "sockets-per-node": V, "spread-job": F, "switches": V, "test-only": F, "thread-spec": V,
    "threads-per-core": V, "time": V, "time-min": V, "tmp": V, "tres-bind": V, "tres-per-task": V,
    "uid": V, "usage": F, "use-min-nodes": F, "verbose": F, "version": F, "wckey": V,
}  # fmt: skip
_COMMON_ALLOC_SHORT = {
    "A": "account", "B": "extra-node-info", "b": "begin", "C": "constraint", "c": "cpus-per-task",
    "D": "chdir", "d": "dependency", "e": "error", "G": "gpus", "H": "hold", "h": "help", "i": "input",
    "J": "job-name", "k": "no-kill", "L": "licenses", "M": "clusters", "m": "distribution", "N": "nodes",
    "n": "ntasks", "O": "overcommit", "o": "output", "p": "partition", "Q": "quiet", "q": "qos",
    "S": "core-spec", "s": "oversubscribe", "t": "time", "V": "version", "v": "verbose", "w": "nodelist",
    "x": "exclude",
}  # fmt: skip

SBATCH = (
    {**_COMMON_ALLOC, "array": V, "batch": V, "export-file": V, "get-user-env": OPT, "ignore-pbs": F,
     "kill-on-invalid-dep": V, "parsable": F, "requeue": F, "no-requeue": F, "wait": F,
     "wait-all-nodes": V, "wrap": V},
    {**_COMMON_ALLOC_SHORT, "a": "array", "F": "nodefile", "W": "wait"},
)  # fmt: skip
SRUN = (
    {**_COMMON_ALLOC, "accel-bind": V, "bcast": OPT, "compress": OPT, "cpu-bind": V, "disable-status": F,
     "epilog": V, "exact": F, "external-launcher": F, "het-group": V, "immediate": OPT, "jobid": V,
     "kill-on-bad-exit": OPT, "label": F, "mpi": V, "multi-prog": F, "no-allocate": F, "overlap": F,
     "preserve-env": F, "prolog": V, "pty": OPT, "quit-on-interrupt": F, "relative": V, "send-libs": OPT,
     "slurmd-debug": V, "task-epilog": V, "task-prolog": V, "threads": V, "unbuffered": F, "wait": V,
     "whole": F},
    {**_COMMON_ALLOC_SHORT, "E": "preserve-env", "I": "immediate", "K": "kill-on-bad-exit", "l": "label",
     "r": "relative", "T": "threads", "u": "unbuffered", "W": "wait", "X": "disable-status", "Z": "no-allocate"},
)  # fmt: skip
SACCT = (
    {"accounts": V, "allclusters": F, "allocations": F, "allusers": F, "array": F, "associations": V,
     "batch-script": F, "brief": F, "clusters": V, "completion": F, "constraints": V, "delimiter": V,
     "duplicates": F, "endtime": V, "env-vars": F, "federation": F, "format": V, "gid": V, "group": V,
     "help": F, "helpformat": F, "jobs": V, "json": OPT, "local": F, "long": F, "name": V, "nnodes": V,
     "noconvert": F, "noheader": F, "nodelist": V, "parsable": F, "parsable2": F, "partition": V, "qos": V,
     "reason": V, "starttime": V, "state": V, "timelimit-max": V, "timelimit-min": V, "truncate": F,
     "uid": V, "units": V, "usage": F, "user": V, "verbose": F, "version": F, "wckeys": V,
     "whole-hetjob": OPT, "yaml": OPT},
    {"a": "allusers", "A": "accounts", "B": "batch-script", "b": "brief", "C": "constraints",
     "c": "completion", "D": "duplicates", "E": "endtime", "e": "helpformat", "g": "gid", "h": "help",
     "i": "nnodes", "j": "jobs", "K": "timelimit-max", "k": "timelimit-min", "L": "allclusters",
     "l": "long", "M": "clusters", "N": "nodelist", "n": "noheader", "o": "format", "P": "parsable2",
     "p": "parsable", "q": "qos", "R": "reason", "r": "partition", "S": "starttime", "s": "state",
     "T": "truncate", "u": "user", "V": "version", "v": "verbose", "W": "wckeys", "X": "allocations",
     "x": "associations"},
)  # fmt: skip
SQUEUE = (
    {"account": V, "all": F, "array": F, "array-unique": F, "clusters": V, "federation": F, "format": V,
     "Format": V, "help": F, "hide": F, "iterate": V, "jobs": V, "json": OPT, "licenses": V, "local": F,
     "long": F, "me": F, "name": V, "noconvert": F, "noheader": F, "nodelist": V, "partition": V,
     "priority": F, "qos": V, "reservation": V, "sibling": F, "sort": V, "start": F, "states": V,
     "steps": OPT, "usage": F, "user": V, "verbose": F, "version": F, "yaml": OPT},
    {"A": "account", "a": "all", "h": "noheader", "i": "iterate", "j": "jobs", "L": "licenses", "l": "long",
     "M": "clusters", "n": "name", "O": "Format", "o": "format", "P": "priority", "p": "partition",
     "q": "qos", "R": "reservation", "r": "array", "S": "sort", "s": "steps", "t": "states", "u": "user",
     "V": "version", "v": "verbose", "w": "nodelist"},
)  # fmt: skip
SCANCEL = (
    {"account": V, "batch": F, "clusters": V, "cron": F, "ctld": F, "full": F, "help": F, "hurry": F,
     "interactive": F, "me": F, "name": V, "nodelist": V, "partition": V, "qos": V, "quiet": F,
     "reservation": V, "sibling": V, "signal": V, "state": V, "usage": F, "user": V, "verbose": F,
     "version": F, "wckey": V},
    {"A": "account", "b": "batch", "f": "full", "H": "hurry", "i": "interactive", "M": "clusters",
     "n": "name", "p": "partition", "Q": "quiet", "q": "qos", "R": "reservation", "s": "signal",
     "t": "state", "u": "user", "V": "version", "v": "verbose", "W": "wckey", "w": "nodelist"},
)  # fmt: skip
SINFO = (
    {"all": F, "clusters": V, "dead": F, "exact": F, "format": V, "Format": V, "help": F, "hide": F,
     "iterate": V, "json": OPT, "local": F, "long": F, "noconvert": F, "noheader": F, "node": F,
     "nodes": V, "partition": V, "reservation": F, "responding": F, "list-reasons": F, "states": V,
     "sort": V, "summarize": F, "usage": F, "verbose": F, "version": F, "yaml": OPT},
    {"a": "all", "d": "dead", "e": "exact", "h": "noheader", "i": "iterate", "l": "long", "M": "clusters",
     "N": "node", "n": "nodes", "O": "Format", "o": "format", "p": "partition", "R": "list-reasons",
     "r": "responding", "S": "sort", "s": "summarize", "t": "states", "T": "reservation", "V": "version",
     "v": "verbose"},
)  # fmt: skip


def parse_args(argv, spec, prog, stop_at_positional=False):
    """Return ([(long_name, value)], positionals). ``value`` is True for flags."""
    longs, shorts = spec
    opts, positionals = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            positionals.extend(argv[i + 1 :])
            break
        if a.startswith("--"):
            name, eq, val = a[2:].partition("=")
            kind = longs.get(name)
            if kind is None:
                cands = [n for n in longs if n.startswith(name)]
                if len(cands) == 1:
                    name, kind = cands[0], longs[cands[0]]
                else:
                    raise UsageError(f"unrecognized option '{a}'")
            if kind == V and not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"option '--{name}' requires an argument")
                val = argv[i]
            elif kind == F:
                if eq:
                    raise UsageError(f"option '--{name}' doesn't allow an argument")
                val = True
            elif kind == OPT and not eq:
                val = True
            opts.append((name, val))
        elif a.startswith("-") and len(a) > 1:
            j = 1
            while j < len(a):
                name = shorts.get(a[j])
                if name is None:
                    raise UsageError(f"invalid option -- '{a[j]}'")
                kind = longs[name]
                if kind == F:
                    opts.append((name, True))
                    j += 1
                    continue
                val = a[j + 1 :]
                if not val and kind == V:
                    i += 1
                    if i >= len(argv):
                        raise UsageError(f"option requires an argument -- '{a[j]}'")
                    val = argv[i]
                opts.append((name, val or True))
                break
        else:
            if stop_at_positional:
                positionals = argv[i:]
                break
            positionals.append(a)
        i += 1
    return opts, positionals


def _last(opts, name, default=None):
    for n, v in reversed(opts):
        if n == name:
            return v
    return default


def _csv(value) -> list[str]:
    return [x for x in str(value).split(",") if x] if value not in (None, True) else []


# ---------------------------------------------------------------------------------------------
# value helpers


def parse_mem_mb(value) -> int | None:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGTkmgt]?)", str(value or "").strip())
    if not m:
        return None
    mult = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def parse_time_seconds(value) -> int | None:
    """SLURM --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; 'UNLIMITED'/'infinite' -> None."""
    s = str(value or "").strip()
    if not s or s.lower() in ("unlimited", "infinite"):
        return None
    days = 0
    if "-" in s:
        d, s = s.split("-", 1)
        days = int(d)
        parts = [int(x) for x in s.split(":")]
        h, m, sec = (parts + [0, 0])[:3]
    else:
        parts = [int(x) for x in s.split(":")]
        if len(parts) == 1:
            h, m, sec = 0, parts[0], 0
        elif len(parts) == 2:
            h, m, sec = 0, parts[0], parts[1]
        else:
            h, m, sec = parts[:3]
    return ((days * 24 + h) * 60 + m) * 60 + sec


def fmt_duration(seconds) -> str:
    if seconds is None:
        return "UNLIMITED"
    seconds = int(seconds)
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return f"{d}-{h:02d}:{m:02d}:{s:02d}" if d else f"{h:02d}:{m:02d}:{s:02d}"


def fmt_ts(ts) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%dT%H:%M:%S") if ts else "Unknown"


def expand_filename(pattern: str, rec: dict) -> str:
    def sub(m):
        width, c = m.group(1), m.group(2)
        val = {
            "%": "%",
            "A": str(rec["base_id"]),
            "a": str(rec.get("array_task") if rec.get("array_task") is not None else 4294967294),
            "b": str((rec.get("array_task") or 0) % 10),
            "J": f"{rec['raw_id']}.batch",
            "j": str(rec["raw_id"]),
            "N": socket.gethostname().split(".")[0],
            "n": "0",
            "s": "batch",
            "t": "0",
            "u": rec["user"],
            "x": rec["name"],
        }[c]
        return val.zfill(int(width)) if width and c != "%" else val

    return re.sub(r"%(\d*)([%AabJjNnstux])", sub, pattern)


def expand_array_spec(spec: str) -> list[int]:
    spec = spec.split("%", 1)[0]
    tasks: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part.strip())
        if not m:
            raise UsageError(f"Invalid job array specification: {spec}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        tasks.extend(range(lo, hi + 1, int(m.group(3) or 1)))
    return sorted(set(tasks))


# ---------------------------------------------------------------------------------------------
# sbatch


def cmd_sbatch(argv: list[str]) -> int:
    sdir = state_dir()
    trace(sdir, "sbatch", argv)
    opts, positionals = parse_args(argv, SBATCH, "sbatch", stop_at_positional=True)
    if _last(opts, "version"):
        print(VERSION)
        return 0
    wrap = _last(opts, "wrap")
    if wrap is not None and positionals:
        raise UsageError("script arguments not permitted with --wrap option")
    if wrap is not None:
        script = f"#!/bin/sh\n# This script was created by sbatch --wrap.\n\n{wrap}\n"
        script_args: list[str] = []
    elif positionals:
        with open(positionals[0]) as fh:
            script = fh.read()
        script_args = positionals[1:]
    else:
        script = sys.stdin.read()
        script_args = []
    if not script.startswith("#!"):
        raise UsageError(
            "This does not look like a batch script.  The first\n"
            "sbatch: error: line must start with #! followed by the path to an interpreter."
        )
    # #SBATCH directives count unless the command line sets the same option
    directives = []
    for line in script.splitlines()[1:]:
        if line.startswith("#SBATCH"):
            directives.extend(shlex.split(line[len("#SBATCH") :], comments=False))
        elif line.strip() and not line.startswith("#"):
            break
    if directives:
        dir_opts, _ = parse_args(directives, SBATCH, "sbatch")
        opts = dir_opts + opts

    options: dict = {}
    for name, val in opts:
        options[name] = val

    accounts = cluster_accounts()
    partitions, default_partition = cluster_partitions()
    account = options.get("account") or (accounts[0] if accounts else "")
    if accounts and account.lower() not in [a.lower() for a in accounts]:
        msg = "Invalid account or account/partition combination specified"
        print(f"sbatch: error: Batch job submission failed: {msg}", file=sys.stderr)
        return 1
    partition = options.get("partition") or default_partition
    for p in str(partition).split(","):
        if p not in partitions:
            print(f"sbatch: error: invalid partition specified: {p}", file=sys.stderr)
            print("sbatch: error: Batch job submission failed: Invalid partition name specified", file=sys.stderr)
            return 1
    if _last(opts, "test-only"):
        print(f"sbatch: Job 0 to start at now on nodes localhost in partition {partition}", file=sys.stderr)
        return 0

    submit_dir = os.getcwd()
    workdir = os.path.abspath(os.path.expanduser(options.get("chdir") or submit_dir))
    if not os.path.isdir(workdir):
        print(f"sbatch: error: chdir to {workdir} failed: No such file or directory", file=sys.stderr)
        return 1
    tasks = expand_array_spec(options["array"]) if options.get("array") else [None]
    base_id = allocate_ids(sdir, len(tasks))
    user = getpass.getuser()
    name = options.get("job-name") or (
        "wrap" if wrap is not None else os.path.basename(positionals[0]) if positionals else "sbatch"
    )
    default_out = "slurm-%A_%a.out" if tasks != [None] else "slurm-%j.out"
    ntasks = int(options.get("ntasks") or 1)
    cpus_per_task = int(options["cpus-per-task"]) if options.get("cpus-per-task") else None
    max_cpus = os.environ.get("SLURM_SHIM_MAX_CPUS")
    if max_cpus and ntasks * (cpus_per_task or 1) > int(max_cpus):
        msg = "Requested node configuration is not available"
        print(f"sbatch: error: Batch job submission failed: {msg}", file=sys.stderr)
        return 1
    time_limit = parse_time_seconds(options.get("time"))
    kill_wait = float(os.environ.get("SLURM_SHIM_KILL_WAIT", "5"))
    pending = float(os.environ.get("SLURM_SHIM_PENDING_SECONDS", "0") or 0)
    enforce_time = os.environ.get("SLURM_SHIM_ENFORCE_TIME") == "1"

    scripts_dir = os.path.join(sdir, "scripts")
    os.makedirs(scripts_dir, exist_ok=True)
    script_path = os.path.join(scripts_dir, f"{base_id}.sh")
    with open(script_path, "w") as fh:
        fh.write(script)
    os.chmod(script_path, 0o755)

    records = []
    for k, task in enumerate(tasks):
        raw_id = base_id + k
        key = f"{base_id}_{task}" if task is not None else str(base_id)
        rec = {
            "key": key,
            "job_id": key,
            "raw_id": raw_id,
            "base_id": base_id,
            "array_task": task,
            "name": name,
            "user": user,
            "account": account,
            "partition": partition,
            "comment": options.get("comment") or "",
            "workdir": workdir,
            "submit_dir": submit_dir,
            "script_path": script_path,
            "script_args": script_args,
            "ntasks": ntasks,
            "cpus_per_task": cpus_per_task,
            "cpus": ntasks * (cpus_per_task or 1),
            "mem": options.get("mem"),
            "mem_per_cpu": options.get("mem-per-cpu"),
            "gpus": options.get("gpus"),
            "gres": options.get("gres"),
            "time_limit": time_limit,
            "enforce_time": enforce_time,
            "kill_wait": kill_wait,
            "pending_seconds": pending,
            "state": "PENDING",
            "reason": "None",
            "exit_code": "0:0",
            "submit_time": time.time(),
            "start_time": None,
            "end_time": None,
            "supervisor_pid": None,
            "job_pid": None,
            "steps": {},
            "submit_line": shlex.join(["sbatch", *argv]),
        }
        rec["output"] = os.path.join(workdir, expand_filename(options.get("output") or default_out, rec))
        rec["error"] = os.path.join(workdir, expand_filename(options["error"], rec)) if options.get("error") else None
        rec["open_mode"] = options.get("open-mode") or "truncate"
        rec["env"] = job_env(rec, options, tasks)
        write_record(sdir, rec)
        records.append(rec)

    log = os.environ.get("SLURM_SHIM_LOG")
    if log:
        append_jsonl(
            os.path.abspath(log),
            {
                "cmd": "sbatch",
                "argv": ["sbatch", *argv],
                "options": options,
                "job_id": str(base_id),
                "job_name": name,
                "script": script,
                "script_args": script_args,
                "cwd": submit_dir,
                "workdir": workdir,
                "output": [r["output"] for r in records],
                "array_tasks": tasks if tasks != [None] else None,
                "env": records[0]["env"],
                "time": records[0]["submit_time"],
            },
            sdir,
        )

    env_export = str(options.get("export") or "ALL")
    for rec in records:
        env = build_export_env(env_export)
        env.update(rec["env"])
        sup_log = os.path.join(sdir, "jobs", f"{rec['key']}.supervisor.log")
        with open(sup_log, "w") as out, open(os.devnull) as devnull:
            subprocess.Popen(
                [sys.executable, os.path.realpath(__file__), "_supervise", sdir, rec["key"]],
                stdin=devnull,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=workdir,
                start_new_session=True,
                close_fds=True,
            )

    cluster = options.get("clusters")
    if _last(opts, "parsable"):
        print(f"{base_id};{cluster}" if cluster and cluster != "all" else str(base_id))
    else:
        print(f"Submitted batch job {base_id}" + (f" on cluster {cluster}" if cluster else ""))
    if _last(opts, "wait"):
        return wait_for(sdir, [r["key"] for r in records])
    return 0


def build_export_env(spec: str) -> dict:
    """--export=ALL|NONE|[ALL,]VAR[=value],..."""
    items = [x for x in spec.split(",") if x]
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k.startswith("SLURM_SHIM_")}
    if not items or items[0] == "ALL":
        env = dict(base)
        items = items[1:]
    else:
        keep = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "TMPDIR", "LANG")
        env = {k: v for k, v in base.items() if k in keep or k.startswith("SLURM_SHIM_")}
        if items[0] == "NONE":
            items = items[1:]
    for item in items:
        k, eq, v = item.partition("=")
        if eq:
            env[k] = v
        elif k in os.environ:
            env[k] = os.environ[k]
    return env


def job_env(rec: dict, options: dict, tasks: list) -> dict:
    host = socket.gethostname().split(".")[0]
    env = {
        "SLURM_SHIM": "1",
        "SLURM_SHIM_STATE": state_dir(),
        "SHIM_SLURM_STATE": state_dir(),
        "SLURM_JOB_ID": str(rec["raw_id"]),
        "SLURM_JOBID": str(rec["raw_id"]),
        "SLURM_JOB_NAME": rec["name"],
        "SLURM_JOB_USER": rec["user"],
        "SLURM_JOB_UID": str(os.getuid()),
        "SLURM_JOB_ACCOUNT": rec["account"],
        "SLURM_JOB_PARTITION": rec["partition"],
        "SLURM_JOB_QOS": str(options.get("qos") or "normal"),
        "SLURM_CLUSTER_NAME": CLUSTER,
        "SLURM_SUBMIT_DIR": rec["submit_dir"],
        "SLURM_SUBMIT_HOST": host,
        "SLURM_JOB_NODELIST": host,
        "SLURM_NODELIST": host,
        "SLURMD_NODENAME": host,
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_CPUS_ON_NODE": str(rec["cpus"]),
        "SLURM_JOB_CPUS_PER_NODE": str(rec["cpus"]),
        "SLURM_TASKS_PER_NODE": str(rec["ntasks"]),
        "SLURM_GTIDS": "0",
    }
    if options.get("ntasks"):
        env["SLURM_NTASKS"] = env["SLURM_NPROCS"] = str(rec["ntasks"])
    if rec["cpus_per_task"]:
        env["SLURM_CPUS_PER_TASK"] = str(rec["cpus_per_task"])
    mem = parse_mem_mb(options.get("mem"))
    if mem is not None:
        env["SLURM_MEM_PER_NODE"] = str(mem)
    mem_cpu = parse_mem_mb(options.get("mem-per-cpu"))
    if mem_cpu is not None:
        env["SLURM_MEM_PER_CPU"] = str(mem_cpu)
    for opt, var in (
        ("gpus", "SLURM_GPUS"),
        ("gpus-per-task", "SLURM_GPUS_PER_TASK"),
        ("gpus-per-node", "SLURM_GPUS_PER_NODE"),
        ("cpus-per-gpu", "SLURM_CPUS_PER_GPU"),
        ("ntasks-per-gpu", "SLURM_NTASKS_PER_GPU"),
        ("ntasks-per-node", "SLURM_NTASKS_PER_NODE"),
        ("gres", "SLURM_GRES"),
        ("comment", "SLURM_JOB_COMMENT"),
    ):
        if options.get(opt) not in (None, True):
            env[var] = str(options[opt])
    if rec["array_task"] is not None:
        env.update(
            SLURM_ARRAY_JOB_ID=str(rec["base_id"]),
            SLURM_ARRAY_TASK_ID=str(rec["array_task"]),
            SLURM_ARRAY_TASK_MIN=str(min(tasks)),
            SLURM_ARRAY_TASK_MAX=str(max(tasks)),
            SLURM_ARRAY_TASK_COUNT=str(len(tasks)),
            SLURM_ARRAY_TASK_STEP="1",
        )
    return env


def wait_for(sdir: str, keys: list[str]) -> int:
    while True:
        recs = [effective(read_record(sdir, k) or {"state": "FAILED", "exit_code": "1:0"}) for k in keys]
        if all(r["state"] in TERMINAL for r in recs):
            return max(int(r["exit_code"].split(":")[0]) for r in recs)
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# the supervisor: one detached process per job (task), the job's "slurmstepd"


def supervise(sdir: str, key: str) -> int:
    rec = read_record(sdir, key)
    rec["supervisor_pid"] = os.getpid()
    write_record(sdir, rec)
    cancel_marker = record_path(sdir, key) + ".cancel"
    st = {"cancel": False, "timeout": False, "proc": None}
    kill_wait = rec["kill_wait"]

    def kill_job(sig=signal.SIGTERM):
        proc = st["proc"]
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        if sig != signal.SIGKILL:
            t = threading.Timer(kill_wait, lambda: kill_job(signal.SIGKILL))
            t.daemon = True
            t.start()

    def on_signal(signum, frame):
        st["cancel"] = True
        kill_job()

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)

    deadline = time.time() + rec["pending_seconds"]
    while time.time() < deadline and not (st["cancel"] or os.path.exists(cancel_marker)):
        time.sleep(0.05)
    if st["cancel"] or os.path.exists(cancel_marker):
        rec.update(state="CANCELLED", end_time=time.time(), exit_code="0:15")
        write_record(sdir, rec)
        return 0

    try:
        mode = "a" if rec["open_mode"] == "append" else "w"
        out = open(rec["output"], mode)
        err = open(rec["error"], mode) if rec["error"] else out
    except OSError as e:
        print(f"could not open job output: {e}", flush=True)
        rec.update(state="FAILED", reason="OutputOpenFailed", start_time=time.time(), end_time=time.time())
        rec["exit_code"] = "1:0"
        write_record(sdir, rec)
        return 0
    with open(os.devnull) as devnull:
        st["proc"] = subprocess.Popen(
            [rec["script_path"], *rec["script_args"]],
            cwd=rec["workdir"],
            stdin=devnull,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    rec.update(state="RUNNING", start_time=time.time(), job_pid=st["proc"].pid)
    write_record(sdir, rec)
    if os.path.exists(cancel_marker):
        st["cancel"] = True
        kill_job()
    if rec["enforce_time"] and rec["time_limit"] is not None:

        def on_timeout():
            st["timeout"] = True
            kill_job()

        timer = threading.Timer(rec["time_limit"], on_timeout)
        timer.daemon = True
        timer.start()

    _, status, usage = os.wait4(st["proc"].pid, 0)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(st["proc"].pid, signal.SIGKILL)  # like SLURM: nothing of the job outlives it
    rc = os.waitstatus_to_exitcode(status)
    code, sig = (rc, 0) if rc >= 0 else (0, -rc)
    if st["cancel"] or os.path.exists(cancel_marker):
        state = "CANCELLED"
    elif st["timeout"]:
        state = "TIMEOUT"
    elif rc == 0:
        state = "COMPLETED"
    else:
        state = "FAILED"
    with locked(sdir):
        rec = read_record(sdir, key)  # srun steps may have been added meanwhile
        rec.update(
            state=state,
            end_time=time.time(),
            exit_code=f"{code}:{sig}",
            reason="None" if state == "COMPLETED" else ("NonZeroExitCode" if state == "FAILED" else state.title()),
            maxrss_kb=usage.ru_maxrss,
            cpu_seconds=usage.ru_utime + usage.ru_stime,
        )
        write_record(sdir, rec)
    return 0


# ---------------------------------------------------------------------------------------------
# srun: run the command in place (the allocation is this machine)


def cmd_srun(argv: list[str]) -> int:
    sdir = state_dir()
    opts, command = parse_args(argv, SRUN, "srun", stop_at_positional=True)
    if _last(opts, "version"):
        print(VERSION)
        return 0
    if not command:
        raise UsageError("No command given to execute.")
    options = dict(opts)
    job_id = str(_last(opts, "jobid") or os.environ.get("SLURM_JOB_ID") or "")
    key = None
    if job_id:
        with locked(sdir):
            key = _key_for_raw_id(sdir, job_id)
            rec = read_record(sdir, key) if key else None
            if rec is not None:
                step = len(rec.get("steps", {}))
                rec.setdefault("steps", {})[str(step)] = {
                    "name": os.path.basename(command[0]),
                    "state": "RUNNING",
                    "start_time": time.time(),
                    "argv": ["srun", *argv],
                }
                write_record(sdir, rec)
            else:
                step = 0
    else:
        step = 0
    trace(sdir, "srun", argv, options=options, command=command, step=step)

    ntasks = int(options.get("ntasks") or 1)
    env = dict(os.environ)
    env.update(SLURM_STEP_ID=str(step), SLURM_STEPID=str(step), SLURM_NTASKS=str(ntasks), SLURM_NPROCS=str(ntasks))
    if options.get("cpus-per-task") not in (None, True):
        env["SLURM_CPUS_PER_TASK"] = str(options["cpus-per-task"])
    for opt, var in (
        ("gpus", "SLURM_GPUS"),
        ("gres", "SLURM_GRES"),
        ("cpus-per-gpu", "SLURM_CPUS_PER_GPU"),
        ("mem-per-cpu", "SLURM_MEM_PER_CPU"),
    ):
        if options.get(opt) not in (None, True):
            env[var] = str(options[opt])
    if options.get("chdir") not in (None, True):
        os.chdir(options["chdir"])

    procs = []
    for task in range(ntasks):
        env_t = dict(env, SLURM_PROCID=str(task), SLURM_LOCALID=str(task))
        procs.append(subprocess.Popen(command, env=env_t, stdin=None if task == 0 else subprocess.DEVNULL))

    def forward(signum, frame):
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, forward)
    rcs = [p.wait() for p in procs]
    rc = next((r for r in rcs if r != 0), 0)
    if key:
        with locked(sdir):
            rec = read_record(sdir, key)
            if rec is not None and str(step) in rec.get("steps", {}):
                code, sig = (rc, 0) if rc >= 0 else (0, -rc)
                rec["steps"][str(step)].update(
                    state="COMPLETED" if rc == 0 else ("CANCELLED" if rc < 0 else "FAILED"),
                    end_time=time.time(),
                    exit_code=f"{code}:{sig}",
                )
                write_record(sdir, rec)
    return rc if rc >= 0 else 128 - rc


def _key_for_raw_id(sdir: str, raw_id: str) -> str | None:
    if read_record(sdir, raw_id) is not None:
        return raw_id
    for rec in all_records(sdir):
        if str(rec["raw_id"]) == raw_id:
            return rec["key"]
    return None


# ---------------------------------------------------------------------------------------------
# scancel


def _select(recs: list[dict], ids: list[str]) -> list[dict]:
    """Records matching job ids like 1000, 1000_3, 1000_[1-3] (an array's base id selects all tasks)."""
    out = []
    for jid in ids:
        jid = jid.split(".", 1)[0]
        m = re.fullmatch(r"(\d+)(?:_\[?([\d,\-:%]+)\]?)?", jid)
        if not m:
            continue
        base = int(m.group(1))
        tasks = set(expand_array_spec(m.group(2))) if m.group(2) else None
        for r in recs:
            hit = r["base_id"] == base or r["raw_id"] == base
            if hit and (tasks is None or r.get("array_task") in tasks):
                out.append(r)
    return out


def cmd_scancel(argv: list[str]) -> int:
    sdir = state_dir()
    trace(sdir, "scancel", argv)
    opts, ids = parse_args(argv, SCANCEL, "scancel")
    if _last(opts, "version"):
        print(VERSION)
        return 0
    recs = all_records(sdir)
    ids = [x for i in ids for x in i.split(",") if x]
    names = _csv(_last(opts, "name"))
    everyone = bool(_last(opts, "me") or _last(opts, "user"))  # the shim has one user
    if not ids and not names and not everyone:
        raise UsageError("No job identification provided")
    selected = _select(recs, ids) if ids else list(recs)
    if names:
        selected = [r for r in selected if r["name"] in names]
    rc = 0
    for jid in ids:
        if not _select(recs, [jid]):
            print(f"scancel: error: Kill job error on job id {jid}: Invalid job id specified", file=sys.stderr)
            rc = 1
    sig_opt = _last(opts, "signal")
    for r in selected:
        if r["state"] in TERMINAL:
            continue
        if sig_opt:
            sig_name = str(sig_opt).upper().removeprefix("SIG")
            sig = int(sig_opt) if str(sig_opt).isdigit() else getattr(signal, "SIG" + sig_name)
            if r.get("job_pid"):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(r["job_pid"], sig)
            continue
        with open(record_path(sdir, r["key"]) + ".cancel", "w") as fh:
            fh.write(str(time.time()))
        if r.get("supervisor_pid"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(r["supervisor_pid"], signal.SIGTERM)
    return rc


# ---------------------------------------------------------------------------------------------
# sacct


def _rows(rec: dict, with_steps: bool):
    """(row id, row fields) for the allocation and, without -X, the batch step and srun steps."""
    yield rec["job_id"], {}
    if not with_steps or rec["state"] == "PENDING":
        return
    batch_state = rec["state"] if rec["state"] != "TIMEOUT" else "CANCELLED"
    yield f"{rec['job_id']}.batch", {"name": "batch", "state": batch_state, "step": "batch"}
    for sid, st in sorted(rec.get("steps", {}).items(), key=lambda kv: int(kv[0])):
        state = st["state"]
        if state == "RUNNING" and rec["state"] in TERMINAL:
            state = "CANCELLED"
        yield (
            f"{rec['job_id']}.{sid}",
            {
                "name": st["name"],
                "state": state,
                "step": sid,
                "start_time": st.get("start_time"),
                "end_time": st.get("end_time") or (rec["end_time"] if rec["state"] in TERMINAL else None),
                "exit_code": st.get("exit_code", "0:0"),
            },
        )


def _field(name: str, rec: dict, row_id: str, step: dict) -> str:
    n = name.lower()
    state = step.get("state", rec["state"])
    start = step.get("start_time", rec.get("start_time"))
    end = step.get("end_time", rec.get("end_time"))
    elapsed = (end or time.time()) - start if start else 0
    cpu_s = rec.get("cpu_seconds") or 0
    values = {
        "jobid": row_id,
        "jobidraw": row_id if rec.get("array_task") is not None else row_id.replace(rec["job_id"], str(rec["raw_id"])),
        "jobname": step.get("name", rec["name"]),
        "state": state,
        "exitcode": step.get("exit_code", rec.get("exit_code", "0:0")),
        "derivedexitcode": rec.get("exit_code", "0:0"),
        "account": rec["account"],
        "partition": rec["partition"],
        "user": rec["user"] if not step else "",
        "uid": str(os.getuid()),
        "group": rec["user"],
        "cluster": CLUSTER,
        "comment": rec["comment"] if not step else "",
        "workdir": rec["workdir"],
        "nodelist": socket.gethostname().split(".")[0] if start else "None assigned",
        "nnodes": "1",
        "ncpus": str(rec["cpus"]),
        "alloccpus": str(rec["cpus"]),
        "reqcpus": str(rec["cpus"]),
        "reqmem": _reqmem(rec),
        "maxrss": f"{rec['maxrss_kb']}K" if step and rec.get("maxrss_kb") else "",
        "reqtres": f"cpu={rec['cpus']}" + (f",gres/gpu={rec['gpus']}" if rec.get("gpus") else ""),
        "alloctres": f"cpu={rec['cpus']}" + (f",gres/gpu={rec['gpus']}" if rec.get("gpus") else ""),
        "elapsed": fmt_duration(elapsed),
        "elapsedraw": str(int(elapsed)),
        "totalcpu": fmt_duration(cpu_s) if state in TERMINAL else "00:00:00",
        "cputime": fmt_duration(elapsed * rec["cpus"]),
        "cputimeraw": str(int(elapsed * rec["cpus"])),
        "submit": fmt_ts(rec["submit_time"]),
        "start": fmt_ts(start),
        "end": fmt_ts(end),
        "timelimit": fmt_duration(rec["time_limit"]),
        "timelimitraw": str(rec["time_limit"] // 60) if rec["time_limit"] is not None else "UNLIMITED",
        "reason": rec.get("reason", "None"),
        "qos": "normal",
        "priority": "1",
        "submitline": rec.get("submit_line", "") if not step else "",
        "arrayjobid": str(rec["base_id"]) if rec.get("array_task") is not None else "",
        "arraytaskid": str(rec["array_task"]) if rec.get("array_task") is not None else "",
    }
    if n not in values:
        raise UsageError(f'Invalid field requested: "{name}"')
    return values[n]


def _reqmem(rec: dict) -> str:
    if rec.get("mem"):
        return f"{parse_mem_mb(rec['mem']) or 0}M"
    if rec.get("mem_per_cpu"):
        return f"{parse_mem_mb(rec['mem_per_cpu']) or 0}Mc"
    return "0"


def _wait_for_news(sdir: str, tag: str, matching, wait: float) -> list[dict]:
    """Opt-in (SLURM_SHIM_SACCT_WAIT): hold a status query until a job has ended since the last one.

    The plugin adds 10 s to its polling interval after every poll in which no job ended and goes
    back to --slurm-init-seconds-before-status-checks after one in which a job did; answering
    only when there is news keeps it at the short interval.
    """
    seen_dir = os.path.join(sdir, "sacct_seen")
    os.makedirs(seen_dir, exist_ok=True)
    seen_path = os.path.join(seen_dir, re.sub(r"[^A-Za-z0-9_.-]", "_", tag)[:200] + ".json")
    try:
        with open(seen_path) as fh:
            seen = set(json.load(fh))
    except (FileNotFoundError, json.JSONDecodeError):
        seen = set()
    deadline = time.time() + wait
    while True:
        recs = matching()
        ended = {r["key"] for r in recs if r["state"] in TERMINAL}
        if ended - seen or len(ended) == len(recs) or time.time() >= deadline:
            break
        time.sleep(0.1)
    with open(seen_path, "w") as fh:
        json.dump(sorted(ended | seen), fh)
    return recs


DEFAULT_SACCT_FORMAT = "JobID,JobName,Partition,Account,AllocCPUS,State,ExitCode"


def cmd_sacct(argv: list[str]) -> int:
    sdir = state_dir()
    trace(sdir, "sacct", argv)
    # strict like the real sacct: the plugin's account guess passes "| tail -1" as arguments,
    # which fails on "-1" and makes it go on without an account
    opts, _ = parse_args(argv, SACCT, "sacct")
    if _last(opts, "version"):
        print(VERSION)
        return 0
    fmt = ",".join(v for n, v in opts if n == "format") or DEFAULT_SACCT_FORMAT
    fields = []
    for f in fmt.split(","):
        name, _, width = f.partition("%")
        if name:
            fields.append((name, int(width) if width.lstrip("-").isdigit() else None))
    allocations = bool(_last(opts, "allocations"))
    names = {x for n, v in opts if n == "name" for x in _csv(v)}
    jobs = [x for n, v in opts if n == "jobs" for x in _csv(v)]
    states = {x.upper() for n, v in opts if n == "state" for x in _csv(v)}
    partitions = {x for n, v in opts if n == "partition" for x in _csv(v)}
    accounts = {x.lower() for n, v in opts if n == "accounts" for x in _csv(v)}

    def matching() -> list[dict]:
        recs = all_records(sdir)
        if names:
            recs = [r for r in recs if r["name"] in names]
        if partitions:
            recs = [r for r in recs if r["partition"] in partitions]
        if accounts:
            recs = [r for r in recs if r["account"].lower() in accounts]
        return recs

    recs = matching()
    wait = float(os.environ.get("SLURM_SHIM_SACCT_WAIT", "0") or 0)
    if wait > 0 and names and allocations and not jobs:
        recs = _wait_for_news(sdir, ",".join(sorted(names)), matching, wait)
    step_filter = None
    if jobs:
        recs = _select(recs, jobs)
        step_filter = {j.split(".", 1)[1] for j in jobs if "." in j} or None
    rows = []
    for r in recs:
        for row_id, step in _rows(r, with_steps=not allocations or step_filter is not None):
            if step_filter is not None and step.get("step") not in step_filter:
                continue
            state = step.get("state", r["state"])
            if states and state not in states and SHORT_STATE.get(state) not in states:
                continue
            rows.append([_field(name, r, row_id, step) for name, _ in fields])

    parsable2, parsable = _last(opts, "parsable2"), _last(opts, "parsable")
    header = not _last(opts, "noheader")
    delim = _last(opts, "delimiter") or "|"
    if parsable or parsable2:
        if header:
            rows.insert(0, [name for name, _ in fields])
        for row in rows:
            print(delim.join(row) + (delim if parsable and not parsable2 else ""))
        return 0
    widths = [abs(w) if w is not None else 10 for _, w in fields]
    left = [w is not None and w < 0 for _, w in fields]

    def cell(val, w, lft):
        if len(val) > w:
            val = val[: w - 1] + "+"
        return val.ljust(w) if lft else val.rjust(w)

    if header:
        print(" ".join(cell(name, w, lft) for (name, _), w, lft in zip(fields, widths, left)))
        print(" ".join("-" * w for w in widths))
    for row in rows:
        print(" ".join(cell(v, w, lft) for v, w, lft in zip(row, widths, left)))
    return 0


# ---------------------------------------------------------------------------------------------
# squeue


DEFAULT_SQUEUE_FORMAT = "%.18i %.9P %.8j %.8u %.2t %.10M %.6D %R"


def _squeue_field(c: str, rec: dict) -> str:
    running = rec["state"] == "RUNNING"
    start = rec.get("start_time")
    used = ((rec.get("end_time") or time.time()) - start) if start else 0
    host = socket.gethostname().split(".")[0]
    reason = "(None)" if rec["state"] == "PENDING" else rec.get("reason", "None")
    return {
        "i": rec["job_id"],
        "A": str(rec["raw_id"]),
        "F": str(rec["base_id"]),
        "K": str(rec["array_task"]) if rec.get("array_task") is not None else "N/A",
        "j": rec["name"],
        "T": rec["state"],
        "t": SHORT_STATE.get(rec["state"], rec["state"][:2]),
        "u": rec["user"],
        "a": rec["account"],
        "P": rec["partition"],
        "M": _squeue_time(used),
        "l": fmt_duration(rec["time_limit"]),
        "D": "1",
        "C": str(rec["cpus"]),
        "R": host if running else reason,
        "r": "None" if running else reason,
        "N": host if start else "",
        "k": rec["comment"],
        "Z": rec["workdir"],
        "m": f"{parse_mem_mb(rec['mem'])}M" if rec.get("mem") else "0",
        "o": rec["script_path"],
        "V": fmt_ts(rec["submit_time"]),
        "S": fmt_ts(start) if start else "N/A",
        "e": fmt_ts(rec.get("end_time")) if rec.get("end_time") else "N/A",
        "q": "normal",
        "b": f"gres/gpu:{rec['gpus']}" if rec.get("gpus") else (rec.get("gres") or "N/A"),
        "%": "%",
    }.get(c, "")


def _squeue_time(seconds: float) -> str:
    s = int(seconds)
    d, h, m, s = s // 86400, s // 3600 % 24, s // 60 % 60, s % 60
    return f"{d}-{h:02d}:{m:02d}:{s:02d}" if d else (f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}")


def _squeue_header(c: str) -> str:
    return {
        "i": "JOBID", "A": "JOBID", "F": "ARRAY_JOB_ID", "K": "ARRAY_TASK_ID", "j": "NAME", "T": "STATE",
        "t": "ST", "u": "USER", "a": "ACCOUNT", "P": "PARTITION", "M": "TIME", "l": "TIME_LIMIT", "D": "NODES",
        "C": "CPUS", "R": "NODELIST(REASON)", "r": "REASON", "N": "NODELIST", "k": "COMMENT", "Z": "WORK_DIR",
        "m": "MIN_MEMORY", "o": "COMMAND", "V": "SUBMIT_TIME", "S": "START_TIME", "e": "END_TIME", "q": "QOS",
        "b": "TRES_PER_NODE", "%": "%",
    }.get(c, c)  # fmt: skip


def _render(fmt: str, getter) -> str:
    def sub(m):
        right, width, c = m.group(1), m.group(2), m.group(3)
        val = getter(c)
        if width:
            w = int(width)
            val = val[:w]
            val = val.rjust(w) if right else val.ljust(w)
        return val

    return re.sub(r"%(\.)?(\d*)([A-Za-z%])", sub, fmt)


def cmd_squeue(argv: list[str]) -> int:
    sdir = state_dir()
    trace(sdir, "squeue", argv)
    opts, _ = parse_args(argv, SQUEUE, "squeue")
    if _last(opts, "version"):
        print(VERSION)
        return 0
    if _last(opts, "Format"):
        raise UsageError("--Format is not supported by the shim; use --format")
    fmt = _last(opts, "format") or DEFAULT_SQUEUE_FORMAT
    states = {x.upper() for n, v in opts if n == "states" for x in _csv(v)}
    names = {x for n, v in opts if n == "name" for x in _csv(v)}
    jobs = [x for n, v in opts if n == "jobs" for x in _csv(v)]
    recs = all_records(sdir)
    if jobs:
        recs = _select(recs, jobs)
    if names:
        recs = [r for r in recs if r["name"] in names]
    if "ALL" not in states:
        wanted = states or {"PENDING", "RUNNING"}
        recs = [r for r in recs if r["state"] in wanted or SHORT_STATE.get(r["state"]) in wanted]
    if not _last(opts, "noheader"):
        print(_render(fmt, _squeue_header))
    for r in recs:
        print(_render(fmt, lambda c, r=r: _squeue_field(c, r)))
    return 0


# ---------------------------------------------------------------------------------------------
# sinfo, scontrol, sacctmgr, sshare


def cmd_sinfo(argv: list[str]) -> int:
    sdir = state_dir()
    trace(sdir, "sinfo", argv)
    opts, _ = parse_args(argv, SINFO, "sinfo")
    if _last(opts, "version"):
        print(VERSION)
        return 0
    names, default = cluster_partitions()
    wanted = _csv(_last(opts, "partition"))
    host = socket.gethostname().split(".")[0]
    fmt = _last(opts, "format") or "%9P %.5a %.10l %.6D %.6t %N"

    def getter(p):
        return lambda c: {
            "P": p + ("*" if p == default else ""),
            "R": p,
            "a": "up",
            "l": "infinite",
            "D": "1",
            "t": "idle",
            "T": "idle",
            "N": host,
            "c": str(os.cpu_count() or 1),
            "m": "1000000",
            "G": "(null)",
            "%": "%",
        }.get(c, "")

    hdr = {"P": "PARTITION", "R": "PARTITION", "a": "AVAIL", "l": "TIMELIMIT", "D": "NODES", "t": "STATE",
           "T": "STATE", "N": "NODELIST", "c": "CPUS", "m": "MEMORY", "G": "GRES", "%": "%"}  # fmt: skip
    if not _last(opts, "noheader"):
        print(_render(fmt, lambda c: hdr.get(c, c)))
    for p in names:
        if not wanted or p in wanted:
            print(_render(fmt, getter(p)))
    return 0


def cmd_scontrol(argv: list[str]) -> int:
    sdir = state_dir()
    trace(sdir, "scontrol", argv)
    args = [a for a in argv if not a.startswith("-")]
    if any(a in ("-V", "--version") for a in argv) or args[:1] == ["version"]:
        print(VERSION)
        return 0
    if args[:1] != ["show"] or len(args) < 2:
        raise UsageError(f"shim supports only 'scontrol show config|partition|job|node', got {argv}")
    what, rest = args[1].lower(), args[2:]
    host = socket.gethostname().split(".")[0]
    if what in ("config", "conf"):
        print(f"Configuration data as of {fmt_ts(time.time())}")
        for k, v in (
            ("ClusterName", CLUSTER),
            ("MaxArraySize", os.environ.get("SLURM_SHIM_MAX_ARRAY_SIZE", "1001")),
            ("MaxJobCount", "10000"),
            ("MinJobAge", f"{os.environ.get('SLURM_SHIM_MIN_JOB_AGE', '300')} sec"),
            ("SelectType", "select/cons_tres"),
            ("SLURM_VERSION", VERSION.split()[1]),
        ):
            print(f"{k:<23} = {v}")
        return 0
    if what.startswith("partition"):
        names, default = cluster_partitions()
        for p in names:
            if rest and p not in rest:
                continue
            print(f"PartitionName={p}")
            print(f"   AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL Default={'YES' if p == default else 'NO'}")
            print(f"   MaxNodes=UNLIMITED MaxTime=UNLIMITED MinNodes=0 Nodes={host}")
            print(f"   State=UP TotalCPUs={os.cpu_count() or 1} TotalNodes=1")
            print(f"   TRES=cpu={os.cpu_count() or 1},mem=1000000M,node=1")
            print()
        return 0
    if what == "job":
        recs = _select(all_records(sdir), rest) if rest else all_records(sdir)
        if rest and not recs:
            print("slurm_load_jobs error: Invalid job id specified", file=sys.stderr)
            return 1
        for r in recs:
            print(f"JobId={r['raw_id']} JobName={r['name']}")
            print(f"   UserId={r['user']}({os.getuid()}) Account={r['account']} QOS=normal")
            print(f"   JobState={r['state']} Reason={r.get('reason', 'None')} ExitCode={r['exit_code']}")
            print(f"   TimeLimit={fmt_duration(r['time_limit'])} SubmitTime={fmt_ts(r['submit_time'])}")
            print(f"   Partition={r['partition']} NodeList={host} NumCPUs={r['cpus']}")
            print(f"   Comment={r['comment']}")
            print(f"   WorkDir={r['workdir']} StdOut={r['output']}")
            print()
        return 0
    if what.startswith("node"):
        print(f"NodeName={host} CPUTot={os.cpu_count() or 1} State=IDLE Partitions={','.join(cluster_partitions()[0])}")
        return 0
    raise UsageError(f"shim does not know 'scontrol show {what}'")


def cmd_sacctmgr(argv: list[str]) -> int:
    sdir = state_dir()
    trace(sdir, "sacctmgr", argv)
    words = [a.lower() for a in argv if not a.startswith("-")]
    if any(a in ("-V", "--version") for a in argv):
        print(VERSION)
        return 0
    if "list" not in words and "show" not in words:
        raise UsageError("shim supports only 'sacctmgr list ...'")
    fmt = next((a.split("=", 1)[1] for a in argv if a.lower().startswith("format=")), "account")
    short_flags = "".join(a[1:] for a in argv if a.startswith("-") and not a.startswith("--"))
    header = "--noheader" not in argv and "n" not in short_flags
    fields = [f.split("%")[0].lower() for f in fmt.split(",")]
    user = getpass.getuser()
    if header:
        print(" ".join(f"{f.title():>10}" for f in fields))
    for acct in cluster_accounts():
        vals = {"account": acct, "user": user, "cluster": CLUSTER, "partition": "", "qos": "normal"}
        print(" ".join(f"{vals.get(f, ''):>10}" for f in fields))
    return 0


def cmd_sshare(argv: list[str]) -> int:
    sdir = state_dir()
    trace(sdir, "sshare", argv)
    if "--noheader" not in argv and "-n" not in argv:
        print("             Account")
        print("--------------------")
    for acct in cluster_accounts():
        print(f"{acct:>20}")
    return 0


COMMANDS = {
    "sbatch": cmd_sbatch,
    "srun": cmd_srun,
    "scancel": cmd_scancel,
    "sacct": cmd_sacct,
    "squeue": cmd_squeue,
    "sinfo": cmd_sinfo,
    "scontrol": cmd_scontrol,
    "sacctmgr": cmd_sacctmgr,
    "sshare": cmd_sshare,
}


def main(prog: str, argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return COMMANDS[prog](argv)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "_supervise":
        sys.exit(supervise(sys.argv[2], sys.argv[3]))
    sys.exit(main(os.path.basename(sys.argv[1]) if len(sys.argv) > 1 else "", sys.argv[2:]))
