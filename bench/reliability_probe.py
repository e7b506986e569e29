"""A held-out reliability probe (issue 29): adversarial cases a new user would try, through the CLI
(in this process, as `secateur.cli.main`, or as a real `secateur` process where signals, concurrency
or the installed entry point matter) and the Python API, on tiny random models.

Each case states what must happen: a refusal (non-zero exit, or for the API an exception of a clear
type) or success, substrings the message must hold, paths whose bytes must not change (sha256 of
every file, before and after), no traceback and nothing half-written left behind. A failed case is
classified by what went wrong:
- serious: a protected path changed or vanished (data loss), a refusal that exited 0 (a model or
  file that is not what was asked), or a case's own check of the result (a wrong number, NaN
  weights, a model that does not match its report);
- minor: a traceback, an unexpected exception type from the API, a missing or unclear message, a
  refusal of something valid, a leftover temporary folder, a hang past the case's time limit.

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python bench/reliability_probe.py [--only WORD] \
        [--root /tmp/secateur-probe] [--out bench/results/reliability_probe]

The cases are in bench/probe_cases.py (fixtures and the first groups) and bench/probe_cases2.py.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

CLEAR_API_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


class ProbeTimeout(BaseException):
    """A case ran past its limit (BaseException: the CLI's own handlers must not swallow it)."""


@dataclass
class Case:
    """One adversarial input and what must happen."""

    id: str
    category: str
    run: Sequence[str] | Callable[[], Any]  # CLI argv (mode cli/sub) or a callable (mode api)
    expect: str = "fail"  # "fail" | "ok" | "any" (either, as long as the other checks hold)
    msg: tuple[str, ...] = ()  # each must appear (case-insensitive) in stderr or the exception
    keep: tuple[Path, ...] = ()  # files/folders whose bytes must be unchanged afterwards
    absent: tuple[Path, ...] = ()  # must not exist afterwards (no half-written output)
    check: Callable[[Outcome], tuple[str, str] | None] | None = None  # -> (severity, why) on failure
    mode: str = "cli"  # "cli" (main() here), "fork" (main() in a forked child), "sub" (a new process), "api"
    memory_gib: float | None = None  # fork: address space the child may add (a bomb fails, not the machine)
    signal_when: tuple[int, Path] | None = None  # fork: send this signal once OUT's temporary folder exists
    env: dict[str, str] | None = None  # fork: environment variables set in the child
    then: Callable[[], Any] | None = None  # run after the case, before the checks (e.g. a cleanup command)
    raises: tuple[type[BaseException], ...] = CLEAR_API_ERRORS  # api: clear exception types
    timeout: int = 300  # generous: a loaded shared machine makes even an import take a minute
    note: str = ""


@dataclass
class Outcome:
    rc: int | str
    out: str
    err: str
    exc: BaseException | None = None
    value: Any = None
    seconds: float = 0.0


@dataclass
class Verdict:
    case: Case
    outcome: Outcome
    problems: list[tuple[str, str]] = field(default_factory=list)  # (severity, why)

    @property
    def severity(self) -> str:
        sev = {s for s, _ in self.problems}
        return "serious" if "serious" in sev else "minor" if sev else "pass"


def digest(paths: Iterable[Path]) -> dict[str, str]:
    """sha256 of every file under each path (a missing path maps to 'absent')."""
    out: dict[str, str] = {}
    for p in paths:
        p = Path(p)
        if not p.exists() and not p.is_symlink():
            out[str(p)] = "absent"
        elif p.is_dir() and not p.is_symlink():
            files = sorted(q for q in p.rglob("*") if q.is_file())
            out[str(p)] = "dir:" + ",".join(str(q.relative_to(p)) for q in files)
            for q in files:
                out[str(q)] = hashlib.sha256(q.read_bytes()).hexdigest()
        else:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "other"
    return out


def leftovers(root: Path, registry: Path) -> list[str]:
    """Temporary folders/files of Secateur's under root, and entries still in the registry."""
    bad = []
    for p in root.rglob("*"):
        n = p.name
        if ".tmp-" in n or n.startswith((".secateur-probe-", ".secateur-partial")) or n.endswith(".partial"):
            if "ro-src" not in str(p):
                bad.append(str(p.relative_to(root)))
    bad += [f"registry:{q.name}" for q in registry.glob("*")] if registry.is_dir() else []
    return bad


def _alarm(_signum: int, _frame: Any) -> None:
    raise ProbeTimeout()


def run_inprocess(case: Case) -> Outcome:
    """main(argv) or the API callable here, stdout/stderr captured, exceptions kept."""
    from secateur.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(case.timeout)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("always")
            if case.mode == "api":
                assert callable(case.run)
                value = case.run()
                return Outcome(0, out.getvalue(), err.getvalue(), value=value)
            return Outcome(main(list(case.run)), out.getvalue(), err.getvalue())  # type: ignore[arg-type]
    except ProbeTimeout as e:
        return Outcome("timeout", out.getvalue(), err.getvalue(), exc=e)
    except SystemExit as e:  # argparse errors
        return Outcome(int(e.code or 0) if not isinstance(e.code, str) else 2, out.getvalue(), err.getvalue())
    except BaseException as e:  # noqa: BLE001 - the probe records what a user would see
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        return Outcome("exception", out.getvalue(), err.getvalue() + tb, exc=e)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_subprocess(case: Case, env: dict[str, str], cwd: Path) -> Outcome:
    """A real `secateur` process (argv[0] may be 'python' for a script)."""
    argv = list(case.run)  # type: ignore[arg-type]
    if not argv or argv[0] not in ("python", "bash"):
        argv = [str(Path(sys.executable).with_name("secateur")), *argv]
    elif argv[0] == "python":
        argv[0] = sys.executable
    try:
        p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=case.timeout)
        return Outcome(p.returncode, p.stdout, p.stderr)
    except subprocess.TimeoutExpired as e:
        return Outcome("timeout", str(e.stdout or ""), str(e.stderr or ""))


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _child(case: Case, out_fd: int, err_fd: int) -> None:
    """In the forked child: main(argv) under the memory limit, exit with its code (never returns)."""
    from secateur.cli import main

    rc = 99
    try:
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as from a terminal
        os.environ.update(case.env or {})
        if case.memory_gib:
            limit = _vm_bytes() + int(case.memory_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        rc = main(list(case.run))  # type: ignore[arg-type]
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 2
    except BaseException:  # noqa: BLE001 - what a user would see: a traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(rc) & 0xFF)


def run_forked(case: Case) -> Outcome:
    """A child forked from this process (torch and Secateur already imported: no minute-long start on
    a loaded machine), optionally signalled mid-run or limited in memory; as isolated as a process."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            _child(case, out.fileno(), err.fileno())
        deadline, sent, status = time.monotonic() + case.timeout, False, None
        while status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = "timeout"
                break
            if case.signal_when and not sent:
                sig, target = case.signal_when
                if any(q.name.startswith(f".{target.name}.tmp-") for q in target.parent.iterdir()):
                    time.sleep(0.05)
                    os.kill(pid, sig)
                    sent = True
            time.sleep(0.01)
        out.seek(0)
        err.seek(0)
        o, e = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if status == "timeout":
        return Outcome("timeout", o, e)
    rc = os.waitstatus_to_exitcode(status)  # type: ignore[arg-type]
    return Outcome(rc if rc >= 0 else 128 - rc, o, e)


def judge(case: Case, o: Outcome, before: dict[str, str], after: dict[str, str], left: list[str]) -> Verdict:
    """Apply the case's expectations; see the module docstring for the severities."""
    v = Verdict(case, o)
    changed = [k for k in before if before[k] != after.get(k)]
    if changed:
        v.problems.append(("serious", f"changed/removed: {', '.join(changed[:3])}"))
    failed = o.rc != 0 if case.mode != "api" else o.exc is not None
    if case.expect == "fail" and not failed:
        v.problems.append(("serious", "exit 0 where a refusal was due"))
    if case.expect == "ok" and failed:
        why = (o.err.strip().splitlines() or [str(o.exc)])[-1][:160]
        v.problems.append(("minor", f"refused a valid request: {why}"))
    if o.rc == "timeout":
        v.problems.append(("minor", f"no answer within {case.timeout} s"))
    text = (o.err + (f"\n{type(o.exc).__name__}: {o.exc}" if o.exc else "")).lower()
    said = (text + "\n" + o.out).lower()  # a warning may come on stdout, with the run's other lines
    if case.mode == "api":
        if o.exc is not None and not isinstance(o.exc, case.raises) and o.rc != "timeout":
            v.problems.append(("minor", f"unclear exception {type(o.exc).__name__}: {str(o.exc)[:120]}"))
    elif o.rc == "exception" or "traceback (most recent call last)" in text:
        v.problems.append(("minor", f"traceback: {type(o.exc).__name__ if o.exc else 'in stderr'}"))
    elif "internal error (" in text:  # the CLI's last resort: one line instead of a traceback, still a bug
        v.problems.append(("minor", "internal error"))
    missing = [m for m in case.msg if m.lower() not in said]
    if missing and (failed or case.expect != "fail"):
        v.problems.append(("minor", f"message lacks {missing}"))
    for p in case.absent:
        if Path(p).exists():
            v.problems.append(("minor", f"half-written output left: {p}"))
    if left:
        v.problems.append(("minor", f"leftovers: {', '.join(left[:3])}"))
    if case.check is not None:
        try:
            extra = case.check(o)
        except Exception as e:  # noqa: BLE001 - a check that cannot read the result is a finding too
            extra = ("serious", f"result unreadable: {type(e).__name__}: {e}")
        if extra:
            v.problems.append(extra)
    return v


def summary_line(o: Outcome) -> str:
    lines = [ln for ln in (o.err.strip().splitlines()) if ln.strip()]
    errs = [ln for ln in lines if "error" in ln.lower() or "refus" in ln.lower()]
    if o.exc is not None and o.rc != "exception":
        return f"{type(o.exc).__name__}: {o.exc}".replace("\n", " ")[:200]
    return ((errs or lines or [str(o.rc)])[-1]).replace("|", "/")[:200]


def run_cases(cases: list[Case], root: Path, registry: Path, env: dict[str, str]) -> list[Verdict]:
    verdicts = []
    for i, case in enumerate(cases, 1):
        before = digest(case.keep)
        t0 = time.monotonic()
        if case.mode == "sub":
            o = run_subprocess(case, env, root)
        elif case.mode == "fork":
            o = run_forked(case)
        else:
            o = run_inprocess(case)
        o.seconds = time.monotonic() - t0
        os.chdir(root)
        if case.then is not None:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as e:
                case.then()
            o.err += e.getvalue()
        left = leftovers(root, registry)
        v = judge(case, o, before, digest(case.keep), left)
        for p in left:  # do not blame the next case for this one's leftovers
            q = root / p
            if q.is_dir():
                shutil.rmtree(q, ignore_errors=True)
            elif q.exists():
                q.unlink()
        shutil.rmtree(registry, ignore_errors=True)
        registry.mkdir(parents=True, exist_ok=True)
        verdicts.append(v)
        tag = v.severity.upper() if v.problems else "ok"
        why = "; ".join(w for _, w in v.problems)
        print(
            f"[{i:3d}/{len(cases)}] {tag:<7} {case.id} rc={o.rc} {o.seconds:.1f}s :: {why + ' :: ' if why else ''}"
            f"{summary_line(o)}",
            flush=True,
        )
    return verdicts


def table(verdicts: list[Verdict], command: str, seconds: float) -> tuple[dict[str, Any], list[str]]:
    n = len(verdicts)
    serious = [v for v in verdicts if v.severity == "serious"]
    minor = [v for v in verdicts if v.severity == "minor"]
    cats: dict[str, list[int]] = {}
    for v in verdicts:
        c = cats.setdefault(v.case.category, [0, 0, 0, 0])
        c[0] += 1
        c[{"pass": 1, "serious": 2, "minor": 3}[v.severity]] += 1
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Reliability probe (issue 29)",
        "",
        f"Command: `{command}`  ",
        f"Date: {date}; {seconds / 60:.1f} min on the shared 2-core CPU (tiny random models, nice -n 15).",
        "",
        f"**{n} cases: {n - len(serious) - len(minor)} passed, {len(serious)} serious, {len(minor)} minor.**",
        "",
        "| category | cases | passed | serious | minor |",
        "|---|---|---|---|---|",
        *[f"| {k} | {a} | {b} | {c} | {d} |" for k, (a, b, c, d) in sorted(cats.items())],
        "",
        "## Failures",
        "",
        "| case | severity | what happened | message |",
        "|---|---|---|---|",
        *[
            f"| {v.case.id} | {v.severity} | {'; '.join(w for _, w in v.problems)} | {summary_line(v.outcome)} |"
            for v in serious + minor
        ],
        "",
        "## Every case",
        "",
        "| case | category | expected | rc | result | message |",
        "|---|---|---|---|---|---|",
        *[
            f"| {v.case.id} | {v.case.category} | {v.case.expect} | {v.outcome.rc} | {v.severity} | "
            f"{summary_line(v.outcome)} |"
            for v in verdicts
        ],
    ]
    payload = {
        "command": command,
        "date": date,
        "total": n,
        "passed": n - len(serious) - len(minor),
        "serious": len(serious),
        "minor": len(minor),
        "cases": [
            {
                "id": v.case.id,
                "category": v.case.category,
                "expect": v.case.expect,
                "mode": v.case.mode,
                "rc": v.outcome.rc,
                "severity": v.severity,
                "problems": [w for _, w in v.problems],
                "message": summary_line(v.outcome),
                "seconds": round(v.outcome.seconds, 2),
            }
            for v in verdicts
        ],
    }
    return payload, lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="/tmp/secateur-probe", help="scratch folder (emptied first)")
    ap.add_argument(
        "--only", help="comma-separated: run only cases of these categories or whose id holds one"
    )
    ap.add_argument("--out", help="write OUT.md / OUT.json (e.g. bench/results/reliability_probe)")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    out = Path(args.out).resolve() if args.out else None  # the probe works inside root
    if root.exists():
        subprocess.run(["bash", "-c", f"grep -F ' {root}/' /proc/mounts | cut -d' ' -f2 | xargs -r umount"])
        shutil.rmtree(root)
    root.mkdir(parents=True)
    registry = root.parent / f"{root.name}-registry"
    shutil.rmtree(registry, ignore_errors=True)
    registry.mkdir()
    env_over = {
        "SECATEUR_PARTIAL_DIR": str(registry),
        "SECATEUR_VARIANTS": str(root.parent / f"{root.name}-variants"),
        "SECATEUR_DATA_ROOT": str(root / "data-root"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    os.environ.update(env_over)
    shutil.rmtree(env_over["SECATEUR_VARIANTS"], ignore_errors=True)
    sys.path.insert(0, str(Path(__file__).parent))
    import probe_cases
    import probe_cases2

    os.chdir(root)
    t0 = time.monotonic()
    ctx = probe_cases.setup(root)
    cases = probe_cases.cases(ctx) + probe_cases2.cases(ctx)
    ids = [c.id for c in cases]
    dup = {i for i in ids if ids.count(i) > 1}
    assert not dup, f"duplicate case ids: {dup}"
    if args.only:
        words = args.only.split(",")
        cases = [c for c in cases if any(w in c.id or w == c.category for w in words)]
    try:
        verdicts = run_cases(cases, root, registry, dict(os.environ))
    finally:
        probe_cases.teardown(ctx)
    seconds = time.monotonic() - t0
    command = (
        "OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python bench/reliability_probe.py"
        + (f" --only {args.only}" if args.only else "")
        + (f" --out {args.out}" if args.out else "")
    )
    payload, lines = table(verdicts, command, seconds)
    print("\n".join(lines[: 16 + len(set(v.case.category for v in verdicts))]))
    for v in verdicts:
        if v.problems:
            print(
                f"  {v.severity}: {v.case.id}: {'; '.join(w for _, w in v.problems)} :: {summary_line(v.outcome)}"
            )
    if out is not None:
        from _results import write_results

        write_results(out, payload, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
