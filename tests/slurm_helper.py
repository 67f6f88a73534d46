"""Start a one-node SLURM on this machine for the HPC tests (root only).

Debian's slurmctld/slurmd/munge (installed by .ci/run) with a config of our own
under a temporary folder; SLURM_CONF points the clients (sbatch, squeue,
scancel, used by dask-jobqueue) at it. Only daemons started here are stopped.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

CONF = """\
ClusterName=filterdb
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldPort={p1}
SlurmdPort={p2}
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName={host} CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def why_not() -> str | None:
    """None if a local SLURM can be started here, else the reason."""
    if os.geteuid() != 0:
        return "starting SLURM needs root"
    for b in ("slurmctld", "slurmd", "munged", "sbatch", "sinfo"):
        if shutil.which(b) is None:
            return f"{b} is not installed (apt-get install slurmctld slurmd slurm-client munge)"
    if not os.path.exists("/etc/munge/munge.key"):
        return "/etc/munge/munge.key is missing"
    return None


def start(directory: str, timeout: float = 60.0) -> dict:
    """Start munged (if needed), slurmctld and slurmd; return handles for stop()."""
    os.makedirs(os.path.join(directory, "state"), exist_ok=True)
    os.makedirs(os.path.join(directory, "spool"), exist_ok=True)
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.9)
    conf = os.path.join(directory, "slurm.conf")
    with open(conf, "w") as fh:
        fh.write(CONF.format(host=host, d=directory, cpus=cpus, mem=mem_mb,
                             p1=_free_port(), p2=_free_port()))
    env = dict(os.environ, SLURM_CONF=conf)
    started = []
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        os.makedirs("/run/munge", exist_ok=True)
        subprocess.run(["munged", "--force"], check=True, capture_output=True)
        started.append("munged")
    subprocess.run(["slurmctld", "-f", conf], check=True, env=env, capture_output=True)
    subprocess.run(["slurmd", "-f", conf], check=True, env=env, capture_output=True)
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True,
                             text=True)
        state = out.stdout.strip()
        if state in ("idle", "mix", "alloc"):
            break
        time.sleep(0.5)
    else:
        stop({"dir": directory, "conf": conf, "started": started})
        raise RuntimeError(f"SLURM node did not become idle (state {state!r}); see "
                           f"{directory}/slurmctld.log")
    return {"dir": directory, "conf": conf, "started": started, "env": env}


def stop(handle: dict) -> None:
    d = handle["dir"]
    env = dict(os.environ, SLURM_CONF=handle["conf"])
    subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
    for name in ("slurmd", "slurmctld"):
        pid_file = os.path.join(d, f"{name}.pid")
        try:
            pid = int(open(pid_file).read().strip())
            os.kill(pid, 15)
        except (OSError, ValueError):
            pass
    if "munged" in handle.get("started", []):
        subprocess.run(["pkill", "-x", "munged"], capture_output=True)
