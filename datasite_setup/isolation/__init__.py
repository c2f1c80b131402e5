"""Run approved code in a confined child process instead of inside the datasite server.

syft 0.9.5 `exec`s approved code in the server process, where it can read the site's files and
secrets, open sockets and touch the server's objects. `run_isolated` starts a fresh interpreter
(`datasite_setup.sandbox`, which confines itself: Landlock, seccomp, an audit-hook tripwire)
with a scrubbed environment, its own scratch dir and limits on CPU, memory, threads, open files
and result size, and reads back frames in the `result_codec` format, never a pickle, since the
child is hostile. What the parent believes of them is set out in `datasite_setup.sandbox.frames`:
a refusal is final, and a result counts as no more than what the code could have returned.

- `spawn`: starting a cold child (environment, resource limits, scratch dir, its socket channel);
- `fork_server`: warm children, forked from a zygote that did their imports once;
- `exchange`: the I/O loop of one run; `thread_cgroup`: the kernel counting the child's threads
  in a pids cgroup of its own, where the server may make one; `thread_cap`: otherwise, approving
  each of them;
- `run`: `run_isolated`, from payload to checked outcome;
- `limits`, `outcome`: the budget of a run, and what comes back.

Linux only (Landlock >= 5.13, seccomp user notification >= 5.7, pidfd). Safe to call from
several threads at once: each run has its own process, channel and scratch dir, and the fork
servers are the only shared state (locked).

Child start overhead on the 2-core dev VM (median of 5 runs of a trivial function): 0.10 s with
`preload=("numpy",)`, 1.07 s with numpy+torch (almost all of it `import torch`), 1.33 s with the
full DEFAULT_PRELOAD; passing a 30 MB dict of arrays adds 0.12-0.18 s. A warm child forked from
the zygote starts a run in ~0.1 s whatever its preloads.
"""

from datasite_setup.isolation.limits import Limits
from datasite_setup.isolation.outcome import IsolatedOutcome
from datasite_setup.isolation.run import REQUIRED_LAYERS, run_isolated
from datasite_setup.isolation.fork_server import start_fork_server, stop_fork_servers
from datasite_setup.isolation.spawn import DEFAULT_PRELOAD

__all__ = [
    "DEFAULT_PRELOAD",
    "REQUIRED_LAYERS",
    "IsolatedOutcome",
    "Limits",
    "run_isolated",
    "start_fork_server",
    "stop_fork_servers",
]
