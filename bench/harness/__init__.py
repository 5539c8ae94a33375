"""What the scripts in bench/ share: the states they measure, the child process that times
one operation, the page cache, and the report.

The scripts run as ``python bench/NAME.py`` from the repository root, so ``bench/`` is first
on ``sys.path`` and this package imports as ``harness``. Modules:

- :mod:`harness.state`: the GPT-2-shaped training state (a real model and AdamW after 2 real
  steps), its bf16 cast, synthetic states, walks over tensors. Imports torch: child code only.
- :mod:`harness.ops`: one timed operation (a peer's save or load, a ckptstore commit,
  checkout or repack) in a child process, checked against the source state. Imports torch.
- :mod:`harness.measure`: wall time, CPU, peak RSS (the kernel's high-water mark, reset before
  the timer) of one operation.
- :mod:`harness.files`: durable writes (fsync), disk usage, the page cache (evict, resident
  bytes, drop), the load average.
- :mod:`harness.child`: the parent's side: re-invoke the script with ``--op``, read the
  child's JSON result; long-running server children.
- :mod:`harness.cli`: argument conventions, the working directory, the log line.
- :mod:`harness.report`: the machine description and markdown tables.

Every module but ``state`` and ``ops`` imports without torch, so that a parent process stays
small while its children are measured.
"""

GB = 1e9
MB = 1e6
MiB = 1 << 20
