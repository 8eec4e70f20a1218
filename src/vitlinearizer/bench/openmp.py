"""OpenMP wait policies of the benchmark's measuring processes (docs/performance.md, "OpenMP wait policy").

torch's Linux wheels use GNU libgomp, whose idle threads spin ``GOMP_SPINCOUNT`` times before they sleep; libgomp's
own estimate is ~100k spins per ms. ``short-spin`` (the CPU default) spins ~50 us: long enough to bridge the gap
between two ops of one forward, short enough not to take a core from the thread doing the work on a shared CPU,
which torch's default (~3 ms of spinning) does; ``passive`` sleeps at once and pays a thread wake-up on every
parallel op.
"""
from __future__ import annotations

OMP_POLICIES = ("short-spin", "passive", "active", "inherit")
OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
SHORT_SPIN_COUNT = 5000


def openmp_env(policy: str, env: dict[str, str]) -> dict[str, str]:
    """``env`` with the OpenMP variables of ``policy`` (``inherit``: unchanged). Each policy sets one variable
    and drops the other, since an inherited GOMP_SPINCOUNT would override OMP_WAIT_POLICY."""
    if policy not in OMP_POLICIES:
        raise ValueError(f"unknown OpenMP wait policy {policy!r}; choose one of {', '.join(OMP_POLICIES)}")
    if policy == "inherit":
        return dict(env)
    env = {name: value for name, value in env.items() if name not in OPENMP_VARIABLES}
    if policy == "short-spin":
        env["GOMP_SPINCOUNT"] = str(SHORT_SPIN_COUNT)
    else:
        env["OMP_WAIT_POLICY"] = policy.upper()
    return env


def describe_openmp_env(policy: str, env: dict[str, str]) -> str:
    """How the measuring processes wait, for the report: the policy and the variables it leaves them."""
    env = openmp_env(policy, env)
    settings = [f"{name}={env[name]}" for name in OPENMP_VARIABLES if name in env]
    return f"{policy} ({', '.join(settings) or 'OpenMP defaults'})"
