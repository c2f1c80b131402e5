"""The sandboxed child that runs one approved function on private data.

syft 0.9.5 `exec`s approved code inside the server, where it could read any file, open sockets
and reach the server's secrets. Here it runs in a child (`python -m datasite_setup.sandbox.child_main`, or forked from the
`zygote` that did the imports once) that the parent (`datasite_setup.isolation`) started with a
scrubbed environment and resource limits, and the child confines itself before the untrusted code runs:

1. Landlock (`landlock`, grants from `grants`): reads only the Python installation, the
   project's own packages and the system library dirs; writes only the scratch dir; the site's
   data dir is carved out; no TCP; no signals to or abstract sockets of other processes.
2. seccomp (`seccomp`): no sockets, no exec, no fork, no ptrace, no raising resource limits;
   threads only, counted by the kernel in the run's pids cgroup where the parent made one, else
   each new thread waits for the parent's approval (the thread cap). With Landlock this is what
   holds against native code (torch, SimpleITK, numpy).
3. An audit hook (`audit_hook`): a tripwire for Python-level events. A refusal ends the child
   at once, with an exit status naming the event, so an attempt made through Python fails the
   run even if the code catches the error, and nothing the code writes afterwards can count.

`child_main` puts the layers in place in the order they need, `harness` runs the function, and
`frames` is what crosses to the parent, with what the parent may believe of it (the code runs in
the same interpreter as the harness, so it can write anything the harness can). This package is
imported by the child at start, so it stays free of heavy imports.
"""
