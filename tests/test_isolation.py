"""Approved code run through `run_isolated`: escape attempts fail and leak nothing, real work comes back exact.

Every test runs twice, against a cold child and a warm one (forked from the zygote that did the
imports before the run). Cold: all runs of the module happen once, concurrently from a thread
pool (which is also the thread-safety test), and each test reads its outcome. Warm: one after the
other, each forked from the zygote of its preloads. The secret is planted where a hostile
function would look: the server's environment, a file in the site's data dir, an exception
message, an exception's class name, an audit event name and a forged protocol frame.

The result channel is attacked as well: a forged "ok" frame written after a refusal, before it,
to every fd, to objects found through gc or the harness's frames, and the hook's own state
tampered with; none of it turns a refusal into a success. The caps on threads (Python and
OpenMP), open files and result size hold with the tests running as root.
"""

from __future__ import annotations

import os
import socket
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import psutil

from datasite_setup.isolation import REQUIRED_LAYERS, IsolatedOutcome, Limits, run_isolated, start_fork_server, stop_fork_servers
from datasite_setup.sandbox.audit_hook import REFUSABLE_EVENTS, exit_status, refused_event
from datasite_setup.sandbox.grants import carve

SECRET = f"s3cr3t-{uuid.uuid4().hex[:12]}"
LIMITS = Limits(cpu_seconds=60, wall_seconds=60, memory_mb=2048)
NUMPY = ("numpy",)
TORCH = ("numpy", "torch")
# A thread's stack and malloc arena take address space, so under the 2 GB memory limit a run cannot
# start many more than ~20 threads anyway; a cap below that shows the cap itself refusing.
EIGHT_THREADS = Limits(cpu_seconds=60, wall_seconds=60, memory_mb=2048, max_threads=8)
ONE_MB_RESULT = Limits(cpu_seconds=60, wall_seconds=60, memory_mb=2048, max_result_mb=1)
# Code that forges the harness's result frame, as a hostile function can: the format is public.
FORGE = """
import os
from datasite_setup.sandbox.frames import frame
forged = frame({"ok": True, "result": {"forged": 1.0}, "error_type": None, "stdout": ""}, 1 << 20)
def forge(fds):
    for fd in fds:
        try:
            os.write(fd, forged)
        except OSError:
            pass
"""


def _code(body: str, args: str = "") -> str:
    return f"def f({args}):\n" + textwrap.indent(textwrap.dedent(body).strip("\n"), "    ") + "\n"


# Whichever counts the threads (the kernel in the run's pids cgroup, or the parent's approvals), a
# refused thread fails the run, whatever the code does with the error.
THREAD_BOMB_CAUGHT = _code(
    """
    import threading
    stop, started = threading.Event(), 0
    try:
        for _ in range(1000):
            threading.Thread(target=stop.wait, daemon=True).start()
            started += 1
    except RuntimeError:
        pass
    return {"started": float(started)}
    """
)


def _probes(data_dir: Path, outside: Path, port: int) -> dict[str, tuple[str, dict[str, Any], Limits, tuple[str, ...]]]:
    secret_file = data_dir / "secret.txt"
    return {
        "etc_hostname": (_code("return open('/etc/hostname').read()"), {}, LIMITS, NUMPY),
        "forbidden_file": (_code(f"return open({str(secret_file)!r}).read()"), {}, LIMITS, NUMPY),
        "forbidden_listdir": (_code(f"import os\nreturn os.listdir({str(data_dir)!r})"), {}, LIMITS, NUMPY),
        "forbidden_file_native": (
            _code(f"import torch\nreturn torch.from_file({str(secret_file)!r}, size=8, dtype=torch.uint8)"),
            {}, LIMITS, TORCH,
        ),
        "write_outside": (_code(f"open({str(outside)!r}, 'w').write('x')\nreturn 1"), {}, LIMITS, NUMPY),
        "write_outside_native": (
            _code(f"import torch\ntorch.save({{'w': torch.ones(2)}}, {str(outside)!r})\nreturn 1"), {}, LIMITS, TORCH,
        ),
        "hook_tampering": (
            _code(
                """
                import builtins, os.path, posixpath
                builtins.any = lambda items: True
                builtins.isinstance = lambda obj, kind: True
                os.path.realpath = posixpath.realpath = lambda path, **kw: os.getcwd()
                return open('/etc/hostname').read()
                """
            ),
            {}, LIMITS, NUMPY,
        ),
        "late_import": (_code("import scipy.ndimage\nreturn float(scipy.ndimage.gaussian_filter(x, 1).sum())", "x"),
                        {"x": np.ones((8, 8))}, LIMITS, NUMPY),
        "symlink_out": (_code("import os\nos.symlink('/etc/hostname', 'link')\nreturn open('link').read()"), {}, LIMITS, NUMPY),
        "socket_new": (_code("import socket\nsocket.socket()\nreturn 1"), {}, LIMITS, NUMPY),
        "socket_connect": (
            _code(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')\nreturn 1"),
            {}, LIMITS, NUMPY,
        ),
        "parent_environ": (_code("import os\nreturn open(f'/proc/{os.getppid()}/environ').read()"), {}, LIMITS, NUMPY),
        "env_secret": (
            _code("import os\nreturn {'has': float('MEDFED_TEST_SECRET' in os.environ), 'n': len(os.environ)}"),
            {}, LIMITS, NUMPY,
        ),
        "subprocess_run": (_code("import subprocess\nsubprocess.run(['true'])\nreturn 1"), {}, LIMITS, NUMPY),
        "os_system": (_code("import os\nreturn os.system('true')"), {}, LIMITS, NUMPY),
        "ctypes": (_code("import ctypes\nreturn ctypes.CDLL(None).getpid()"), {}, LIMITS, NUMPY),
        "pidfd_native": (_code("import os\nos.pidfd_open(os.getppid())\nreturn 1"), {}, LIMITS, NUMPY),
        "gc_objects": (_code("import gc\nreturn len(gc.get_objects())"), {}, LIMITS, NUMPY),
        "swallowed_refusal": (
            _code("try:\n    open('/etc/hostname').read()\nexcept PermissionError:\n    pass\nreturn {'x': 1.0}"),
            {}, LIMITS, NUMPY,
        ),
        "forged_event_name": (_code(f"import sys\nsys.audit('socket.{SECRET}')\nreturn 1"), {}, LIMITS, NUMPY),
        "exception_message": (_code(f"raise ValueError('patient value ' + {SECRET!r})"), {}, LIMITS, NUMPY),
        "exception_class_name": (
            _code(f"Leak = type({SECRET.replace('-', '_')!r}, (Exception,), {{}})\nraise Leak()"), {}, LIMITS, NUMPY,
        ),
        "forged_frame": (
            _code(
                f"""
                import os, stat, struct
                from datasite_setup.result_codec import encode
                blob = encode({{"ok": False, "result": None, "error_type": {SECRET!r}, "refused_event": None,
                               "stdout": "", "confinement": []}})
                for fd in range(3, 64):
                    try:
                        if stat.S_ISFIFO(os.fstat(fd).st_mode):
                            os.write(fd, struct.pack(">Q", len(blob)) + blob)
                    except OSError:
                        pass
                os._exit(0)
                """
            ),
            {}, LIMITS, NUMPY,
        ),
        "forged_ok_after_refusal": (
            _code(FORGE + "try:\n    open('/etc/hostname').read()\nexcept PermissionError:\n    pass\n"
                  "forge(range(3, 256))\nos._exit(0)"),
            {}, LIMITS, NUMPY,
        ),
        "forged_ok_before_refusal": (
            _code(FORGE + "forge(range(3, 256))\ntry:\n    open('/etc/hostname').read()\nexcept PermissionError:\n"
                  "    pass\nreturn {'x': 1.0}"),
            {}, LIMITS, NUMPY,
        ),
        "forged_ok_found_by_gc": (
            _code(
                FORGE
                + textwrap.dedent(
                    """
                import gc, socket
                try:
                    found = [o for o in gc.get_objects() if isinstance(o, socket.socket)]
                except PermissionError:
                    found = []
                forge([s.fileno() for s in found])
                os._exit(0)
                """
                )
            ),
            {}, LIMITS, NUMPY,
        ),
        "forged_ok_found_in_frames": (
            _code(
                FORGE
                + textwrap.dedent(
                    """
                import sys
                fds, frame_ = set(), sys._getframe()
                while frame_ is not None:
                    fds |= {v for v in frame_.f_locals.values() if type(v) is int and 2 < v < 1024}
                    frame_ = frame_.f_back
                forge(sorted(fds))
                try:
                    open('/etc/hostname').read()
                except PermissionError:
                    pass
                forge(sorted(fds))
                os._exit(0)
                """
                )
            ),
            {}, LIMITS, NUMPY,
        ),
        "forged_ok_alone": (_code(FORGE + "forge(range(3, 256))\nos._exit(0)"), {}, LIMITS, NUMPY),
        "hook_tampering_defaults": (
            _code(
                """
                import sys, types
                hook_module = sys.modules["datasite_setup.sandbox.audit_hook"]
                for value in list(vars(hook_module).values()):
                    if isinstance(value, types.FunctionType) and value.__defaults__:
                        value.__defaults__ = tuple(None for _ in value.__defaults__)
                return open('/etc/hostname').read()
                """
            ),
            {}, LIMITS, NUMPY,
        ),
        "thread_bomb": (
            _code("import threading\nstop = threading.Event()\nfor _ in range(1000):\n"
                  "    threading.Thread(target=stop.wait, daemon=True).start()\nreturn 1"),
            {}, EIGHT_THREADS, NUMPY,
        ),
        "thread_bomb_caught": (THREAD_BOMB_CAUGHT, {}, EIGHT_THREADS, NUMPY),
        "thread_bomb_native": (
            _code("import torch\ntorch.set_num_threads(200)\nreturn float(torch.ones(20_000_000).exp().sum())"),
            {}, EIGHT_THREADS, TORCH,
        ),
        "thread_bomb_caught_approvals": (THREAD_BOMB_CAUGHT, {}, replace(EIGHT_THREADS, thread_cgroup=False), NUMPY),
        "open_files": (_code("handles = [open(f'f{i}', 'w') for i in range(1000)]\nreturn 1"), {}, LIMITS, NUMPY),
        "open_files_caught": (
            _code("handles = []\ntry:\n    for i in range(1000):\n        handles.append(open(f'f{i}', 'w'))\n"
                  "except OSError:\n    pass\nreturn {'opened': float(len(handles))}"),
            {}, LIMITS, NUMPY,
        ),
        "oversized_result": (
            _code("import numpy as np\nreturn {'a': np.zeros(2 * 1024 * 1024, dtype=np.uint8)}"), {}, ONE_MB_RESULT, NUMPY,
        ),
        "oversized_forged_output": (
            _code(
                """
                import os, stat
                junk = bytes(3 * 1024 * 1024)
                for fd in range(3, 256):
                    try:
                        if stat.S_ISSOCK(os.fstat(fd).st_mode):
                            os.write(fd, junk)
                    except OSError:
                        pass
                return 1
                """
            ),
            {}, ONE_MB_RESULT, NUMPY,
        ),
        "hard_exit": (_code("import os\nos._exit(3)"), {}, LIMITS, NUMPY),
        "memory_hog": (
            _code("import numpy as np\nreturn float(np.ones(2 * 512 * 1024 * 1024 // 8).sum())"),
            {}, Limits(cpu_seconds=60, wall_seconds=60, memory_mb=512), NUMPY,
        ),
        "memory_hog_torch": (
            _code("import torch\nreturn float(torch.ones(2 * 2048 * 1024 * 1024 // 4).sum())"),
            {}, Limits(cpu_seconds=60, wall_seconds=60, memory_mb=2048), TORCH,
        ),
        "infinite_loop": (_code("while True:\n    pass"), {}, Limits(cpu_seconds=60, wall_seconds=3, memory_mb=1024), NUMPY),
        "cpu_limit": (_code("while True:\n    pass"), {}, Limits(cpu_seconds=1, wall_seconds=10, memory_mb=1024), NUMPY),
        "scratch_file_work": (
            _code(
                """
                import os, shutil, tempfile
                import numpy as np
                os.makedirs("a/b", exist_ok=True)
                np.save("a/b/x.npy", np.arange(4))
                os.rename("a/b/x.npy", "a/y.npy")
                os.symlink("y.npy", "a/link.npy")
                shutil.copyfile("a/link.npy", "a/z.npy")
                fd, name = tempfile.mkstemp()
                os.close(fd)
                os.remove(name)
                total = int(np.load("a/z.npy").sum()) + len(os.listdir("a"))
                shutil.rmtree("a")
                return {"total": total, "left": len(os.listdir("."))}
                """
            ),
            {}, LIMITS, NUMPY,
        ),
        "scratch_cwd": (_code("import os\nopen('w.npy', 'wb').write(b'x')\nreturn os.getcwd()"), {}, LIMITS, NUMPY),
        "thread_native_read": (
            _code(
                f"""
                import threading
                import torch
                seen = []
                def read():
                    try:
                        seen.append(str(torch.from_file({str(secret_file)!r}, size=8, dtype=torch.uint8).tolist()))
                    except Exception as exc:
                        seen.append(type(exc).__name__)
                worker = threading.Thread(target=read)
                worker.start()
                worker.join()
                return {{"read": seen[0]}}
                """
            ),
            {}, LIMITS, TORCH,
        ),
        "legit_numpy_torch": (LEGIT_SOURCE, {"images": IMAGES, "seed": 7}, LIMITS, TORCH),
    }


LEGIT_SOURCE = _code(
    """
    import numpy as np
    import torch
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(1, 4, 3)
    x = torch.from_numpy(images)
    loss = torch.nn.functional.relu(conv(x)).mean()
    loss.backward()
    counts, _ = np.histogram(images, bins=8, range=(0.0, 1.0))
    return {
        "weights": {name: p.detach() for name, p in conv.named_parameters()},
        "grads": {name: p.grad.numpy() for name, p in conv.named_parameters()},
        "loss": float(loss.detach()),
        "hist": counts,
        "echo": images,
        "cumsum": np.cumsum(images.astype(np.float64)),
    }
    """,
    args="images, seed",
)
IMAGES = np.random.default_rng(0).random((3, 1, 12, 12), dtype=np.float32)


def _legit_locally() -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(LEGIT_SOURCE, namespace)
    return namespace["f"](images=IMAGES.copy(), seed=7)


def _children_running_sandbox() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any(module in child.cmdline() for module in ("datasite_setup.sandbox.child_main", "datasite_setup.sandbox.zygote")):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.fixture(scope="module", params=["cold", "warm"])
def site(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("isolation")
    data_dir = base / "site-data"
    data_dir.mkdir()
    (data_dir / "secret.txt").write_text(f"patient 0042: {SECRET}\n")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.setblocking(False)
    probes = _probes(data_dir, base / "escaped.txt", listener.getsockname()[1])
    outcomes = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDFED_TEST_SECRET", SECRET)
        if request.param == "cold":
            with ThreadPoolExecutor(max_workers=4) as pool:
                futures = {
                    name: pool.submit(run_isolated, src, "f", kwargs, limits, [data_dir], preload, warm=False)
                    for name, (src, kwargs, limits, preload) in probes.items()
                }
                outcomes = {name: future.result() for name, future in futures.items()}
        else:
            for name, (src, kwargs, limits, preload) in sorted(probes.items(), key=lambda item: repr(item[1][2:])):
                outcomes[name] = run_isolated(src, "f", kwargs, limits, [data_dir], preload)
            stop_fork_servers()
    yield {"mode": request.param, "outcomes": outcomes, "listener": listener, "outside": base / "escaped.txt"}
    listener.close()


REFUSED = {
    "etc_hostname": "refused:open",
    "forbidden_file": "refused:open",
    "forbidden_listdir": "refused:os.listdir",
    "forbidden_file_native": "error:RuntimeError",  # torch reads natively: Landlock, not the audit hook, refuses
    "write_outside": "refused:open",
    "write_outside_native": "error:RuntimeError",  # torch writes natively: Landlock refuses
    "hook_tampering": "refused:open",
    "symlink_out": "refused:os.symlink",
    "socket_new": "refused:socket.__new__",
    "socket_connect": "refused:socket.getaddrinfo",
    "parent_environ": "refused:open",
    "subprocess_run": "refused:subprocess.Popen",
    "os_system": "refused:os.system",
    "ctypes": "refused:ctypes.dlopen",
    "pidfd_native": "error:PermissionError",  # not an audit event: seccomp refuses it
    "gc_objects": "refused:gc.get_objects",
    "swallowed_refusal": "refused:open",
    "forged_event_name": "refused:socket.*",
    "exception_message": "error:ValueError",
    "exception_class_name": "error:Exception",
    "forged_frame": "crashed",
    "hard_exit": "crashed",
    "forged_ok_after_refusal": "refused:open",
    "forged_ok_before_refusal": "refused:open",
    "forged_ok_found_by_gc": "refused:gc.get_objects",
    "forged_ok_found_in_frames": "refused:open",
    "hook_tampering_defaults": "refused:object.__setattr__",
    "thread_bomb": "threads",
    "thread_bomb_caught": "threads",  # the kernel refused the thread: final, whatever the code does next
    "thread_bomb_caught_approvals": "threads",  # the parent refused it: the same
    "thread_bomb_native": "threads",  # OpenMP threads go through the same kernel check
    "open_files": "open-files",
    "oversized_result": "result-size",
    "oversized_forged_output": "result-size",  # the parent stops reading at the cap
}


@pytest.mark.parametrize("probe", sorted(REFUSED))
def test_escape_attempt_fails_without_leaking(site: dict[str, Any], probe: str) -> None:
    outcome: IsolatedOutcome = site["outcomes"][probe]
    assert not outcome.ok
    assert outcome.result is None
    assert outcome.failure == REFUSED[probe]
    assert SECRET not in repr(outcome)
    assert SECRET.replace("-", "_") not in repr(outcome)


def test_each_run_used_the_child_of_its_mode(site: dict[str, Any]) -> None:
    assert {outcome.warm for outcome in site["outcomes"].values()} == {site["mode"] == "warm"}


def test_no_sandbox_child_is_left_running(site: dict[str, Any]) -> None:
    stop_fork_servers()  # other modules' runs may have left a zygote for later runs; runs leave nothing
    assert _children_running_sandbox() == []


def test_a_thread_the_code_starts_cannot_read_natively_outside(site: dict[str, Any]) -> None:
    outcome = site["outcomes"]["thread_native_read"]
    assert outcome.ok, outcome
    assert outcome.result == {"read": "RuntimeError"}


def test_kernel_layers_are_in_force(site: dict[str, Any]) -> None:
    outcome = site["outcomes"]["etc_hostname"]
    assert set(outcome.confinement) >= {"landlock-fs", "seccomp", "audit-hook"}


def test_nothing_reached_the_listening_socket_or_the_outside_file(site: dict[str, Any]) -> None:
    with pytest.raises(BlockingIOError):
        site["listener"].accept()
    assert not site["outside"].exists()


def test_server_environment_is_not_inherited(site: dict[str, Any]) -> None:
    outcome = site["outcomes"]["env_secret"]
    assert outcome.ok, outcome
    assert outcome.result["has"] == 0.0
    assert outcome.result["n"] <= 8
    assert SECRET not in repr(outcome)


def test_legitimate_numpy_torch_work_returns_exact_values(site: dict[str, Any]) -> None:
    outcome = site["outcomes"]["legit_numpy_torch"]
    assert outcome.ok, outcome
    expected = _legit_locally()
    got = outcome.result
    assert got["loss"] == expected["loss"]
    for section in ("weights", "grads"):
        assert set(got[section]) == set(expected[section])
        for name, value in expected[section].items():
            value = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
            assert got[section][name].dtype == value.dtype
            assert np.array_equal(got[section][name], value)
    for name in ("hist", "echo", "cumsum"):
        assert got[name].dtype == expected[name].dtype
        assert np.array_equal(got[name], expected[name])


def test_memory_exhaustion_is_reported_as_memory(site: dict[str, Any]) -> None:
    assert site["outcomes"]["memory_hog"].failure == "memory"
    assert site["outcomes"]["memory_hog_torch"].failure == "memory"


def test_wall_clock_limit_is_reported_as_timeout(site: dict[str, Any]) -> None:
    outcome = site["outcomes"]["infinite_loop"]
    assert outcome.failure == "timeout"
    assert 3 <= outcome.seconds < 6


def test_cpu_limit_is_reported_as_cpu(site: dict[str, Any]) -> None:
    outcome = site["outcomes"]["cpu_limit"]
    assert outcome.failure == "cpu"
    assert outcome.seconds < 10


def test_late_imports_still_work(site: dict[str, Any]) -> None:
    outcome = site["outcomes"]["late_import"]
    assert outcome.ok, outcome
    assert outcome.result == pytest.approx(64.0)


def test_file_work_inside_scratch_is_allowed(site: dict[str, Any]) -> None:
    outcome = site["outcomes"]["scratch_file_work"]
    assert outcome.ok, outcome
    assert outcome.result == {"total": 6 + 4, "left": 0}


def test_scratch_dir_is_the_cwd_and_is_removed_afterwards(site: dict[str, Any]) -> None:
    outcome = site["outcomes"]["scratch_cwd"]
    assert outcome.ok, outcome
    assert "medfed-sandbox-" in outcome.result
    assert not os.path.exists(outcome.result)


def test_prints_come_back_separately_and_truncated() -> None:
    source = _code("print('hello')\nprint('x' * 50_000)\nreturn {'v': 1.5}")
    outcome = run_isolated(source, "f", {}, LIMITS, preload=NUMPY)
    assert outcome.ok and outcome.result == {"v": 1.5}
    assert outcome.stdout.startswith("hello\n")
    assert len(outcome.stdout) <= 10_100


def test_carve_grants_around_a_forbidden_dir_below_a_readable_root(tmp_path: Path) -> None:
    for rel in ("pkg/a.py", "pkg/sub/b.py", "data/site/secret.txt", "data/other/c.txt", "top.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    root, site_dir = str(tmp_path), str(tmp_path / "data" / "site")
    granted = carve([root, "/nonexistent"], [site_dir])
    assert root not in granted and site_dir not in granted
    assert str(tmp_path / "pkg") in granted and str(tmp_path / "data" / "other") in granted
    assert carve([site_dir, str(tmp_path / "data" / "site" / "x")], [site_dir]) == []


def test_site_config_runs_the_fork_server_by_default_and_not_on_request(tmp_path: Path) -> None:
    from datasite_setup.site_config import SiteConfigError, load_site_config
    from tests.conftest import write_site_config

    assert load_site_config(write_site_config(tmp_path / "a", "site-a", 8081)).fork_server is True
    off = write_site_config(tmp_path / "b", "site-b", 8081, extra="\n[execution]\nfork_server = false\n")
    assert load_site_config(off).fork_server is False
    for key, bad in (("fork_server", '"yes"'), ("fork_server", "1"), ("warm_spares", "2")):
        path = write_site_config(tmp_path / "c", "site-c", 8081, extra=f"\n[execution]\n{key} = {bad}\n")
        with pytest.raises(SiteConfigError, match=f"execution.{key}"):
            load_site_config(path)


def test_back_to_back_runs_are_all_forked_warm_from_one_zygote() -> None:
    """Training then evaluation then training, with no pause: every run is forked from the zygote,
    which is the only process importing; each child draws its own random numbers and looks for
    modules and temp files in its own scratch dir, never in the zygote's start dir."""
    stop_fork_servers()
    start_fork_server(TORCH)
    source = _code("import os, random, sys, tempfile\nimport numpy as np\nimport torch\n"
                   "here = os.getcwd()\n"
                   "return {'v': float(torch.ones(3).sum()), 'draws': [random.random(), float(np.random.rand()), float(torch.rand(1))],"
                   " 'in_scratch': [sys.path[0] == here, tempfile.gettempdir() == here, os.environ['HOME'] == here]}")
    outcomes = [run_isolated(source, "f", {}, LIMITS, preload=TORCH) for _ in range(4)]
    zygotes = [p for p in _children_running_sandbox() if "datasite_setup.sandbox.zygote" in p.cmdline()]
    stop_fork_servers()
    assert all(o.ok and o.warm and o.result["v"] == 3.0 and all(o.result["in_scratch"]) for o in outcomes), outcomes
    assert len(zygotes) == 1
    for source_index in range(3):
        assert len({o.result["draws"][source_index] for o in outcomes}) == len(outcomes)
    assert _children_running_sandbox() == []


def test_itk_filters_in_a_child_keep_their_default_threader() -> None:
    """ITK's default threader starts a thread per filter call and core (pyradiomics makes several
    calls per case): free under the run's pids cgroup, one approval each otherwise; its pool
    threader was slower either way on the cases radiomics sees (benchmarks/radiomics_throughput)."""
    itk = ("SimpleITK",)
    source = _code("import SimpleITK as sitk\nimage = sitk.Image(32, 32, 32, sitk.sitkFloat32)\n"
                   "for _ in range(5):\n    image = sitk.SmoothingRecursiveGaussian(image, 1.0)\n"
                   "return {'threader': sitk.ProcessObject.GetGlobalDefaultThreader(), 'v': float(sitk.GetArrayViewFromImage(image).sum())}")
    outcomes = [run_isolated(source, "f", {}, replace(LIMITS, thread_cgroup=kernel), preload=itk) for kernel in (True, False)]
    stop_fork_servers()
    assert all(outcome.ok and outcome.warm for outcome in outcomes), outcomes
    assert all(outcome.result == {"threader": "Platform", "v": 0.0} for outcome in outcomes)
    assert "thread-approvals" in outcomes[1].confinement


@pytest.fixture()
def runs_cgroup_root() -> Path:
    from datasite_setup.isolation.thread_cgroup import runs_root

    root = runs_root()
    if root is None:
        pytest.skip("this server may not make pids cgroups (needs root, or a delegated tree, and a cgroup v1 pids "
                    "hierarchy or cgroup v2 enabling pids at its root): runs' threads are approved by the parent")
    return root


def test_a_run_is_alone_in_a_pids_cgroup_capped_at_its_threads(runs_cgroup_root: Path) -> None:
    """While the code runs its process is the only member of `run-<pid>`, whose pids.max is the
    run's thread cap; the cgroup is gone once the run is over."""
    seen: dict[str, set[tuple[str, str]]] = {}  # every (pids.max, members) read, the last ones after the reap
    done = False

    def watch() -> None:
        while not done:
            for run in runs_cgroup_root.glob("run-*"):
                try:
                    seen.setdefault(run.name, set()).add(((run / "pids.max").read_text().strip(),
                                                          (run / "cgroup.procs").read_text().strip()))
                except OSError:
                    continue
            time.sleep(0.02)

    with ThreadPoolExecutor(max_workers=1) as pool:
        watcher = pool.submit(watch)
        outcome = run_isolated(_code("import os, time\ntime.sleep(1.0)\nreturn {'pid': float(os.getpid())}"), "f", {},
                               EIGHT_THREADS, preload=NUMPY)
        done = True
        watcher.result()
    assert outcome.ok, outcome
    pid = int(outcome.result["pid"])
    assert ("8", str(pid)) in seen[f"run-{pid}"] and seen[f"run-{pid}"] <= {("8", str(pid)), ("8", "")}
    assert "pids-cgroup" in outcome.confinement
    assert not (runs_cgroup_root / f"run-{pid}").exists()


def test_the_code_cannot_raise_its_thread_cap_or_leave_its_cgroup(runs_cgroup_root: Path) -> None:
    """Python's open is refused by the audit hook; a native open for writing (torch maps a file
    read-write) is refused by Landlock, before cgroupfs could say anything of its own."""
    own_cap = f"{runs_cgroup_root}/run-{{os.getpid()}}/pids.max"
    attempts = {
        "raise_cap": _code(f"import os\nopen(f'{own_cap}', 'w').write('max')\nreturn 1"),
        "leave": _code(f"import os\nopen('{runs_cgroup_root.parent}/cgroup.procs', 'w').write(str(os.getpid()))\nreturn 1"),
        "raise_cap_natively": _code(
            f"""
            import os
            import torch
            try:
                torch.from_file(f'{own_cap}', shared=True, size=4, dtype=torch.uint8)
            except RuntimeError as exc:
                return {{"error": str(exc)}}
            return {{"error": ""}}
            """
        ),
    }
    outcomes = {name: run_isolated(code, "f", {}, EIGHT_THREADS, preload=TORCH) for name, code in attempts.items()}
    assert outcomes["raise_cap"].failure == outcomes["leave"].failure == "refused:open", outcomes
    assert outcomes["raise_cap_natively"].ok, outcomes["raise_cap_natively"]
    assert "Permission denied" in outcomes["raise_cap_natively"].result["error"]


def test_a_forked_child_holds_nothing_of_the_zygote_or_of_a_concurrent_run() -> None:
    """The zygote holds the descriptors of every run it forked and is the forked child's parent:
    a run started while another is running finds no descriptor beyond its own channel, cannot
    signal the zygote, and the zygote goes on forking."""
    stop_fork_servers()
    start_fork_server(NUMPY)
    open_fds = _code("import os\nfound = []\nfor fd in range(1024):\n    try:\n        os.fstat(fd)\n"
                     "    except OSError:\n        continue\n    found.append(fd)\nreturn {'fds': found}")
    with ThreadPoolExecutor(max_workers=1) as pool:
        holding = pool.submit(run_isolated, _code("import time\ntime.sleep(3)\nreturn {'v': 1.0}"), "f", {}, LIMITS, preload=NUMPY)
        while not any("datasite_setup.sandbox.zygote" in p.cmdline() and p.children() for p in _children_running_sandbox()):
            time.sleep(0.05)
        listed = run_isolated(open_fds, "f", {}, LIMITS, preload=NUMPY)
        assert holding.result().ok
    zygote_pids = {p.pid for p in _children_running_sandbox()}
    signalled = run_isolated(_code("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nreturn {'v': 1.0}"),
                             "f", {}, LIMITS, preload=NUMPY)
    after = run_isolated(_code("return {'v': 2.0}"), "f", {}, LIMITS, preload=NUMPY)
    still = {p.pid for p in _children_running_sandbox() if "datasite_setup.sandbox.zygote" in p.cmdline()}
    stop_fork_servers()
    assert listed.ok and listed.warm and set(listed.result["fds"]) <= {0, 1, 2, 3}, listed
    assert not signalled.ok and signalled.failure in ("refused:os.kill", "error:PermissionError"), signalled
    assert after.ok and after.warm and still == zygote_pids


@pytest.mark.parametrize("warm", [True, False])
def test_the_site_preloads_run_monai_warm_and_cold_without_a_user_name(warm: bool) -> None:
    """MONAI at import asks for the user's name and tries pandas (whose pyarrow starts a thread):
    a child forked from the zygote of the site's preloads must still confine itself and run MONAI code."""
    from datasite_setup.isolation.spawn import DEFAULT_PRELOAD

    stop_fork_servers()
    if warm:
        start_fork_server(DEFAULT_PRELOAD)
    source = _code("import torch\nfrom monai.losses import DiceCELoss\n"
                   "return {'loss': float(DiceCELoss(sigmoid=True)(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)))}")
    outcome = run_isolated(source, "f", {}, LIMITS, preload=DEFAULT_PRELOAD, warm=warm)
    stop_fork_servers()
    assert outcome.ok and outcome.warm == warm, outcome.stderr_tail[-2000:]
    assert outcome.result["loss"] > 0


@pytest.mark.parametrize("warm", [True, False])
def test_a_preload_that_configures_logging_does_not_send_library_logs_to_stderr(warm: bool) -> None:
    """opacus calls `logging.basicConfig` at import: with it in the preloads, every INFO record of
    every library (pyradiomics logs a dozen lines per case) was formatted and written to the run's
    stderr pipe. A run starts with the root logger as a fresh interpreter has it."""
    preload = ("numpy", "opacus")
    stop_fork_servers()
    if warm:
        start_fork_server(preload)
    source = _code("import logging\nlogging.getLogger('some.library').setLevel(logging.INFO)\n"
                   "logging.getLogger('some.library').info('per-case line')\n"
                   "return {'root_handlers': float(len(logging.getLogger().handlers))}")
    outcome = run_isolated(source, "f", {}, LIMITS, preload=preload, warm=warm)
    stop_fork_servers()
    assert outcome.ok and outcome.warm == warm, outcome.stderr_tail[-2000:]
    assert outcome.result == {"root_handlers": 0.0}
    assert "per-case line" not in outcome.stderr_tail


def test_a_stuck_zygote_costs_a_run_seconds_not_its_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A zygote that has forked before and then stops answering: the next run starts cold after
    FORK_REPLY_S, not after its wall clock, and the stuck zygote is replaced."""
    from datasite_setup.isolation import fork_server

    monkeypatch.setattr(fork_server, "FORK_REPLY_S", 1.0)
    stop_fork_servers()
    start_fork_server(NUMPY)
    first = run_isolated(_code("return {'v': 1.0}"), "f", {}, LIMITS, preload=NUMPY)
    (stuck,) = [p for p in _children_running_sandbox() if "datasite_setup.sandbox.zygote" in p.cmdline()]
    stuck.suspend()
    started = time.monotonic()
    fallback = run_isolated(_code("return {'v': 2.0}"), "f", {}, replace(LIMITS, wall_seconds=120), preload=NUMPY)
    elapsed = time.monotonic() - started
    replaced = run_isolated(_code("return {'v': 3.0}"), "f", {}, LIMITS, preload=NUMPY)
    stop_fork_servers()
    assert first.ok and first.warm
    assert fallback.ok and not fallback.warm and fallback.result == {"v": 2.0}, fallback
    assert elapsed < 30, elapsed
    assert replaced.ok and replaced.warm and not stuck.is_running()
    assert _children_running_sandbox() == []


def test_a_cold_run_starts_no_fork_server() -> None:
    stop_fork_servers()
    outcome = run_isolated(_code("return {'v': 2.0}"), "f", {}, LIMITS, preload=NUMPY, warm=False)
    assert outcome.ok and not outcome.warm
    assert _children_running_sandbox() == []


def test_a_forged_frame_without_a_refusal_counts_only_as_a_return_value(site: dict[str, Any]) -> None:
    """Code can always write to its own channel; what it writes there is believed no more than
    what it could have returned, and the layers reported are the harness's, sent before it ran."""
    outcome = site["outcomes"]["forged_ok_alone"]
    assert outcome.ok and outcome.result == {"forged": 1.0}
    assert set(outcome.confinement) >= REQUIRED_LAYERS


def test_the_open_file_cap_holds_when_the_code_handles_the_error(site: dict[str, Any]) -> None:
    outcome = site["outcomes"]["open_files_caught"]
    assert outcome.ok, outcome
    assert 0 < outcome.result["opened"] < 256


def test_every_refusable_event_has_its_own_exit_status() -> None:
    statuses = {exit_status(name) for name in REFUSABLE_EVENTS}
    assert len(statuses) == len(REFUSABLE_EVENTS) and max(statuses) <= 255
    assert statuses.isdisjoint({0, 1, 2, 70, 71, 120, 126, 127, *range(128, 193)})
    assert all(refused_event(exit_status(name)) == name for name in REFUSABLE_EVENTS)
    assert refused_event(0) is None and refused_event(70) is None


def test_limits_refuse_caps_too_small_to_run_anything() -> None:
    for caps in ({"max_threads": 1}, {"max_open_files": 8}, {"max_result_mb": 0}):
        with pytest.raises(ValueError, match="too small"):
            Limits(**caps)


def test_site_config_reads_the_execution_caps(tmp_path: Path) -> None:
    from dataclasses import asdict

    from datasite_setup.site_config import SiteConfigError, load_site_config
    from tests.conftest import write_site_config

    default = load_site_config(write_site_config(tmp_path / "a", "site-a", 8081)).limits
    assert (default.max_threads, default.max_open_files, default.max_result_mb) == (64, 256, 256)
    extra = "\n[execution]\nmax_threads = 16\nmax_open_files = 64\nmax_result_mb = 8\nthread_cgroup = false\n"
    custom = load_site_config(write_site_config(tmp_path / "b", "site-b", 8081, extra=extra)).limits
    assert Limits(**asdict(custom)) == Limits(1800, 1800.0, 6144, max_threads=16, max_open_files=64, max_result_mb=8,
                                              thread_cgroup=False)
    assert default.thread_cgroup
    for key, bad in (("max_threads", "2"), ("max_open_files", '"many"'), ("max_result_mb", "0"), ("max_threads", "true"),
                     ("thread_cgroup", '"yes"')):
        path = write_site_config(tmp_path / "c", "site-c", 8081, extra=f"\n[execution]\n{key} = {bad}\n")
        with pytest.raises(SiteConfigError, match=f"execution.{key}"):
            load_site_config(path)
