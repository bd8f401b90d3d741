"""OpenMP wait policy and thread counts: set before torch loads, overridable, counted from usable CPUs."""

from __future__ import annotations

import os
import subprocess
import sys

from embedsvc.cpu import apply_openmp_defaults, cgroup_cpu_quota, usable_cpus

PROBE = (
    "import os, sys; from embedsvc.cli import main; sys.argv[1:] = {argv!r}; "
    "import embedsvc.cli.serve as s; s.run = lambda args: print(os.environ.get('OMP_WAIT_POLICY'), "
    "os.environ.get('KMP_BLOCKTIME'), os.environ.get('OMP_NUM_THREADS')) or 0; "
    "main()"
)


def run_probe(argv, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS")}
    environ.update(env)
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(argv=argv)], env=environ, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_serve_sets_a_passive_wait_policy_before_torch_loads():
    policy, blocktime, threads = run_probe(["serve"])
    assert (policy, blocktime, threads) == ("PASSIVE", "0", str(usable_cpus()))


def test_the_environment_overrides_the_defaults():
    policy, _, threads = run_probe(["serve"], OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1")
    assert (policy, threads) == ("ACTIVE", "1")


def test_torch_is_not_loaded_before_the_defaults_apply():
    """The subcommands import torch; apply_openmp_defaults must run first, so check the order directly."""
    code = (
        "import sys, os; from embedsvc.cpu import apply_openmp_defaults; "
        "assert 'torch' not in sys.modules; apply_openmp_defaults(); import torch; "
        "print(torch.get_num_threads())"
    )
    environ = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == usable_cpus()


def test_usable_cpus_respects_affinity_and_cgroup_quota(tmp_path):
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    applied = apply_openmp_defaults(env)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE" and "OMP_WAIT_POLICY" not in applied and env["KMP_BLOCKTIME"] == "0"


def test_lower_thread_priority_raises_only_the_calling_threads_nice_value():
    import threading

    from embedsvc.cpu import lower_thread_priority

    seen = {}

    def worker():
        lower_thread_priority(5)
        seen["worker"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if before + 5 > 19:
        import pytest

        pytest.skip("this process already runs at a nice value that cannot rise by 5")
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["worker"] == before + 5
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # this thread is untouched
    lower_thread_priority(0)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


def test_decode_nice_is_checked():
    import pytest

    from embedsvc.errors import InvalidInput
    from embedsvc.service.config import ServerConfig

    for bad in (20, -1):
        with pytest.raises(InvalidInput, match=f"decode_nice must be between 0 and 19, got {bad}"):
            ServerConfig(decode_nice=bad).validate()


def test_faiss_threads_hold_in_the_threads_that_search(tmp_path):
    """OpenMP's thread count is a per-thread setting: the store's `omp_threads` (the server's faiss_threads)
    must hold in its worker threads, where the server searches and writes, not only where it was opened."""
    from concurrent.futures import ThreadPoolExecutor

    import faiss
    import numpy as np

    from embedsvc.store import CollectionConfig, Item, LocalStore, SearchOptions

    store = LocalStore(tmp_path / "d", omp_threads=1)
    try:
        store.create_collection(CollectionConfig("c", 4))
        with ThreadPoolExecutor(max_workers=1) as worker:  # one thread: what it searched with, it keeps
            assert worker.submit(faiss.omp_set_num_threads, 3).result() is None
            worker.submit(store.upsert, "c", [Item("a", np.ones(4, np.float32))]).result()
            assert worker.submit(faiss.omp_get_max_threads).result() == 1
            worker.submit(faiss.omp_set_num_threads, 3).result()
            hits = worker.submit(store.search, "c", np.ones((1, 4), np.float32), SearchOptions(1)).result()
            assert [h.id for h in hits[0]] == ["a"] and worker.submit(faiss.omp_get_max_threads).result() == 1
    finally:
        store.close()
