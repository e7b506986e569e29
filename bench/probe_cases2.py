"""The other case groups of bench/reliability_probe.py: signals, command-line numbers, recipe YAML,
tokenizers, sequence lengths, resource bombs, read-only paths, datasets, locks, what a hostile new
user tries beyond the issue's list, and the Python API."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from probe_cases import Ctx, no_nan_output, pruned_as_asked, says
from reliability_probe import Case, Outcome

# a recipe's overrides for BlockPruner removing whole sublayers (attention or MLP blocks)
SUBLAYERS: dict[str, Any] = {
    "method": "blockpruner",
    "targets": {"sublayers": True, "mlp": False},
    "budget": {"params": 0.3},
}

LOCKS = Path(__file__).resolve().parents[1] / "tests" / "data" / "locks"

# a real process that is signalled once its temporary output folder exists
SIGNAL = """
import os, signal, subprocess, sys, time
from pathlib import Path
out, sig, args = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
# as from a terminal: a background shell leaves SIGINT ignored, and Python would then ignore Ctrl-C
p = subprocess.Popen([str(Path(sys.executable).with_name("secateur")), *args], stderr=subprocess.PIPE, text=True,
                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
deadline = time.monotonic() + 100
while time.monotonic() < deadline and p.poll() is None:
    if any(q.name.startswith(f".{out.name}.tmp-") for q in out.parent.iterdir()):
        time.sleep(0.05)
        p.send_signal(sig)
        break
    time.sleep(0.01)
err = p.communicate()[1]
sys.stderr.write(err)
if sig == signal.SIGKILL:  # the next command cleans up after it
    c = subprocess.run([str(Path(sys.executable).with_name("secateur")), "clean", "--yes", str(out.parent)],
                       capture_output=True, text=True)
    sys.stderr.write(c.stderr + c.stdout)
sys.exit(p.returncode if p.returncode >= 0 else 128 - p.returncode)
"""

CONCURRENT = """
import subprocess, sys
from pathlib import Path
exe = str(Path(sys.executable).with_name("secateur"))
procs = [subprocess.Popen([exe, *sys.argv[1:]], stderr=subprocess.PIPE, text=True) for _ in range(2)]
errs = [p.communicate()[1] for p in procs]
rcs = [p.returncode for p in procs]
sys.stderr.write("\\n".join(errs))
print("rcs", rcs)
sys.exit(0 if 0 in rcs else 1)
"""


def _signalled(ctx: Ctx, what: str, name: str, sig: int, rc: int | None = None, **kw: Any) -> Case:
    """A streamed prune into `o_sig_NAME` sent `sig` once its temporary folder exists: it must leave
    no output behind (and, for a signal it can catch, exit with `rc`)."""
    out = ctx.p(f"o_sig_{name}")
    argv = ctx.prune(
        f"r_sig_{name}.yaml",
        out.name,
        "--stream",
        calibration={"n_samples": 64, "seqlen": 128},
        evaluate={"enabled": True, "perplexity": [{"dataset": "c.txt", "seqlen": 128, "max_windows": 64}]},
    )
    if rc is not None:
        kw["check"] = lambda o: None if o.rc == rc else ("minor", f"rc {o.rc}")
    return Case(what, "signal", argv, mode="fork", signal_when=(sig, out), absent=(out,), **kw)


def signal_cases(ctx: Ctx) -> list[Case]:
    from secateur.cli import main

    p = ctx.p
    return [
        _signalled(ctx, "SIGTERM during a streamed prune", "term", 15, 143, msg=("SIGTERM",)),
        _signalled(ctx, "SIGINT (Ctrl-C) during a streamed prune", "int", 2, 130),
        _signalled(
            ctx,
            "kill -9 during a streamed prune, then secateur clean --yes",
            "kill",
            9,
            then=lambda: main(["clean", "--yes", str(ctx.root)]),
        ),
        Case(
            "two prunes into one new output at once",
            "hostile-new",
            ["python", "-c", CONCURRENT, *ctx.prune("r_cc.yaml", "o_cc")],
            mode="sub",
            expect="ok",
            timeout=500,
            check=pruned_as_asked(p("o_cc"), 0.2),
        ),
        Case(
            "two exports into one GGUF at once",
            "hostile-new",
            [
                "python",
                "-c",
                CONCURRENT,
                "export",
                str(p("run_g")),
                "--format",
                "gguf",
                "-o",
                str(p("cc.gguf")),
            ],
            mode="sub",
            expect="ok",
            timeout=500,
            check=lambda o: None if p("cc.gguf").is_file() else ("serious", "no GGUF"),
        ),
        Case("secateur with no arguments", "cli-number", [], mode="sub", msg=("usage",)),
        Case("secateur --help through the entry point", "cli-number", ["--help"], mode="sub", expect="ok"),
    ]


def cli_cases(ctx: Ctx) -> list[Case]:
    p, r, run = ctx.p, ctx.recipe("r.yaml"), str(ctx.p("run"))
    sr = ctx.search_recipe("s_cli.yaml")
    s = ["search", sr, "--quiet", "--no-validate", "-o", str(p("s_cli"))]
    ev = ["eval", run, "--tasks", ""]
    sp = ["speed", run, "--engine", "torch"]
    rows: list[tuple[str, list[str], tuple[str, ...]]] = [
        ("search --trials 0", [*s, "--trials", "0"], ("--trials",)),
        ("search --trials -1", [*s, "--trials", "-1"], ("--trials",)),
        ("search --trials abc", [*s, "--trials", "abc"], ("--trials",)),
        ("search --trials 1e3", [*s, "--trials", "1e3"], ("--trials",)),
        ("search --workers 0", [*s, "--workers", "0"], ("--workers",)),
        ("search --workers -3", [*s, "--workers", "-3"], ("--workers",)),
        ("search --workers 100000", [*s, "--workers", "100000"], ("--workers",)),
        ("search --storage 'not a url'", [*s, "--storage", "not a url"], ("--storage",)),
        (
            "search --storage postgresql://nohost/x",
            [*s, "--storage", "postgresql://nohost.invalid/x"],
            ("nohost",),
        ),
        ("eval --ppl-seqlen 0", [*ev, "--ppl-seqlen", "0"], ("--ppl-seqlen",)),
        ("eval --ppl-seqlen -5", [*ev, "--ppl-seqlen", "-5"], ("--ppl-seqlen",)),
        ("eval --ppl-windows 0", [*ev, "--ppl-seqlen", "16", "--ppl-windows", "0"], ("--ppl-windows",)),
        (
            "eval --batch-size 0",
            ["eval", run, "--tasks", "piqa", "--limit", "2", "--batch-size", "0"],
            ("--batch-size",),
        ),
        ("eval --limit -1", ["eval", run, "--limit", "-1"], ("--limit",)),
        ("eval --tasks '' without --ppl-seqlen", ev, ("nothing",)),
        ("eval --dtype float7", [*ev, "--dtype", "float7", "--ppl-seqlen", "16"], ("float7",)),
        ("eval --device tpu9", [*ev, "--device", "tpu9", "--ppl-seqlen", "16"], ("tpu9",)),
        ("eval --device cuda without a GPU", [*ev, "--device", "cuda", "--ppl-seqlen", "16"], ("cuda",)),
        ("eval --tasks nosuchtask", ["eval", run, "--tasks", "nosuchtask", "--limit", "2"], ("nosuchtask",)),
        (
            "eval --data-root missing",
            ["eval", run, "--tasks", "piqa", "--data-root", str(p("nowhere"))],
            ("nowhere",),
        ),
        ("eval --stream with tasks", ["eval", run, "--stream", "--tasks", "piqa"], ("--stream",)),
        ("speed --rounds 0", [*sp, "--rounds", "0"], ("--rounds",)),
        ("speed --prefill -1", [*sp, "--prefill", "-1"], ("--prefill",)),
        ("speed --decode 0", [*sp, "--decode", "0"], ("--decode",)),
        ("speed --threads 0", [*sp, "--threads", "0"], ("--threads",)),
        (
            "speed --prefill 100000 (beyond positions)",
            [*sp, "--prefill", "100000", "--rounds", "10"],
            ("100000",),
        ),
        ("prune with neither recipe nor lock", ["prune", "-o", str(p("o_x"))], ("recipe",)),
        (
            "prune with both recipe and lock",
            ["prune", r, "--lock", str(p("run", "recipe.lock.yaml")), "-o", str(p("o_x"))],
            ("--lock",),
        ),
        (
            "prune --set without '='",
            ["prune", r, "--set", "budget.params", "-o", str(p("o_x"))],
            ("budget.params",),
        ),
        ("prune --set bad value", ["prune", r, "--set", "budget.params=abc", "-o", str(p("o_x"))], ("abc",)),
        (
            "prune --set unknown key",
            ["prune", r, "--set", "budget.parms=0.2", "-o", str(p("o_x"))],
            ("parms",),
        ),
        (
            "prune --set into a scalar",
            ["prune", r, "--set", "budget.params.x=1", "-o", str(p("o_x"))],
            ("budget.params",),
        ),
        (
            "prune --set a YAML tag",
            ["prune", r, "--set", "budget.params=!!python/object:os.system x", "-o", str(p("o_x"))],
            ("budget.params",),
        ),
        ("prune --pick garbage", ["prune", str(p("sdir")), "--pick", "garbage"], ("front.json",)),
        (
            "prune --pick on a folder without a front",
            ["prune", str(p("mine")), "--pick", "latency=0.8"],
            ("mine",),
        ),
        (
            "prune a recipe that does not exist",
            ["prune", str(p("nope.yaml")), "-o", str(p("o_x"))],
            ("nope.yaml",),
        ),
        ("prune a folder as the recipe", ["prune", str(p("mine")), "-o", str(p("o_x"))], ("mine",)),
        ("recipe validate a missing file", ["recipe", "validate", str(p("nope.yaml"))], ("nope.yaml",)),
        ("recipe explain without a recipe", ["recipe", "explain"], ("recipe",)),
        (
            "recipe explain --model a text file",
            ["recipe", "explain", r, "--model", str(p("user.txt"))],
            ("user.txt",),
        ),
        ("clean a path that does not exist", ["clean", str(p("nowhere"))], ("nowhere",)),
        ("export --outtype q2_k", ctx.export(run, "gguf", "--outtype", "q2_k"), ("q2_k",)),
    ]
    out = [Case(label, "cli-number", args, msg=words) for label, args, words in rows]
    for c in out:  # a 100,000-token prefill could take the shared machine's memory: a limited process
        if "100000" in c.id:
            forked(c)
    for c in out:
        if c.id == "clean a path that does not exist":
            c.expect = "any"
        if "nosuchtask" in c.id:  # lm-eval's import alone takes minutes on a loaded 2-core machine
            c.timeout = 600
    return out


def yaml_cases(ctx: Ctx) -> list[Case]:
    p = ctx.p

    def raw(name: str, text: str) -> str:
        p(name).write_text(text)
        return str(p(name))

    base = Path(ctx.recipe("r.yaml")).read_text()
    raw(
        "y_bomb.yaml",
        base + "".join(f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 9) if i else 'lol'}]\n" for i in range(9)),
    )
    rows: list[tuple[str, str, tuple[str, ...]]] = [
        ("an empty recipe", raw("y_empty.yaml", ""), ("y_empty.yaml",)),
        ("only comments", raw("y_comments.yaml", "# nothing\n"), ("y_comments.yaml",)),
        ("a YAML list", raw("y_list.yaml", "- a\n- b\n"), ("y_list.yaml",)),
        ("a YAML scalar", raw("y_scalar.yaml", "42\n"), ("y_scalar.yaml",)),
        ("a syntax error", raw("y_syntax.yaml", "model: {id: [\n"), ("y_syntax.yaml",)),
        ("tabs for indent", raw("y_tabs.yaml", "model:\n\tid: m\n"), ("y_tabs.yaml",)),
        ("a duplicate key", raw("y_dup.yaml", base + "budget: {params: 0.5}\n"), ("budget",)),
        ("unknown top-level key", raw("y_top.yaml", base + "budgets: {params: 0.2}\n"), ("budgets",)),
        (
            "unknown nested key",
            raw("y_nest.yaml", base.replace("multiple_of", "multipel_of")),
            ("multipel_of",),
        ),
        ("version 2", raw("y_v2.yaml", base.replace("version: 1", "version: 2")), ("version",)),
        (
            "n_samples as text",
            raw("y_ns.yaml", base.replace("n_samples: 4", "n_samples: four")),
            ("n_samples",),
        ),
        ("n_samples 4.5", raw("y_ns2.yaml", base.replace("n_samples: 4", "n_samples: 4.5")), ("n_samples",)),
        (
            "n_samples true",
            raw("y_ns3.yaml", base.replace("n_samples: 4", "n_samples: true")),
            ("n_samples",),
        ),
        ("seqlen negative", raw("y_sl.yaml", base.replace("seqlen: 32", "seqlen: -32")), ("seqlen",)),
        (
            "targets a list",
            raw("y_tl.yaml", base.replace("  attention: none\n  mlp: true\n", "  - mlp\n")),
            ("targets",),
        ),
        ("method unknown", raw("y_meth.yaml", base + "method: magic\n"), ("method",)),
        (
            "attention: all",
            raw("y_att.yaml", base.replace("attention: none", "attention: all")),
            ("attention",),
        ),
        ("dtype int8", raw("y_dt.yaml", base.replace("dtype: float32", "dtype: int8")), ("dtype",)),
        ("output.dtype float8", raw("y_odt.yaml", base + "output: {dtype: float8}\n"), ("output.dtype",)),
        ("model.id missing", raw("y_noid.yaml", base.replace("  id: ", "  idx: ")), ("model",)),
        (
            "model.id a missing folder",
            raw("y_mid.yaml", base.replace(str(p("m")), str(p("no-model")))),
            ("no-model",),
        ),
        (
            "model.id a URL",
            raw("y_url.yaml", base.replace(str(p("m")), "https://example.com/model")),
            ("https://example.com/model",),
        ),
        (
            "a python tag",
            raw("y_tag.yaml", base + "name: !!python/object/apply:os.system ['true']\n"),
            ("python",),
        ),
        ("a 10 MB string", raw("y_long.yaml", base + "name: " + "a" * 10_000_000 + "\n"), ("y_long.yaml",)),
        (
            "n_samples 1e30",
            raw("y_huge.yaml", base.replace("n_samples: 4", "n_samples: 1000000000000000000000000000000")),
            ("n_samples",),
        ),
        ("a float exponent without dot", raw("y_exp.yaml", base.replace("params: 0.2", "params: 2e-1")), ()),
    ]
    out = [
        Case(
            f"recipe {label}",
            "recipe-yaml",
            ["prune", f, "-o", str(p("o_y")), "--quiet"],
            msg=w,
            absent=(p("o_y"),),
        )
        for label, f, w in rows
    ]
    out[-1].expect = "any"
    # extends
    raw("ext_a.yaml", "extends: ext_b.yaml\n")
    raw("ext_b.yaml", "extends: ext_a.yaml\n")
    raw("ext_self.yaml", "extends: ext_self.yaml\n")
    raw("ext_missing.yaml", "extends: nowhere.yaml\n")
    raw("ext_list.yaml", "extends: [r.yaml, r.yaml]\n")
    raw("ext_dir.yaml", f"extends: {p('mine')}\n")
    raw("ext_bad.yaml", "extends: y_list.yaml\n")
    raw("ext_ok.yaml", "extends: r.yaml\nbudget: {params: 0.3}\n")
    raw("ext_etc.yaml", "extends: /etc/passwd\n")
    for label, f, w, expect in [
        ("extends loop a->b->a", "ext_a.yaml", ("cycle",), "fail"),
        ("extends itself", "ext_self.yaml", ("cycle",), "fail"),
        ("extends a missing file", "ext_missing.yaml", ("nowhere.yaml",), "fail"),
        ("extends a folder", "ext_dir.yaml", ("mine",), "fail"),
        ("extends a YAML list", "ext_bad.yaml", ("y_list.yaml",), "fail"),
        ("extends /etc/passwd", "ext_etc.yaml", ("passwd",), "fail"),
        ("extends the same base twice", "ext_list.yaml", (), "any"),
    ]:
        out.append(
            Case(
                f"recipe {label}",
                "recipe-yaml",
                ["prune", str(p(f)), "-o", str(p("o_y")), "--quiet"],
                expect=expect,
                msg=w,
                absent=(p("o_y"),) if expect == "fail" else (),
            )
        )
    out.append(
        Case(
            "recipe extends a base and overrides its budget",
            "recipe-yaml",
            ["prune", str(p("ext_ok.yaml")), "-o", str(p("o_ext")), "--quiet"],
            expect="ok",
            check=pruned_as_asked(p("o_ext"), 0.3),
        )
    )
    out.append(
        Case(
            "recipe validate lists every error",
            "recipe-yaml",
            ["recipe", "validate", str(p("y_nest.yaml"))],
            msg=("multipel_of",),
        )
    )
    out.append(
        Case(
            "recipe show with a --set",
            "recipe-yaml",
            ["recipe", "show", str(p("r.yaml")), "--set", "budget.params=0.4"],
            expect="ok",
            check=says("0.4"),
        )
    )
    return out


def _tok_bigger(folder: Path) -> None:
    """A tokenizer with 200 tokens beside a 128-row embedding."""
    from secateur.testing import tiny_tokenizer

    tiny_tokenizer(128).save_pretrained(str(folder))
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    for i in range(128, 200):
        vocab[f"tok{i}"] = i
    (folder / "tokenizer.json").write_text(json.dumps(tok))


def tokenizer_cases(ctx: Ctx) -> list[Case]:
    from secateur.testing import save_tiny

    p = ctx.p
    save_tiny(str(p("m_bigtok")), "llama")
    _tok_bigger(p("m_bigtok"))
    p("uni.txt").write_text(" ".join(["ünïcödé", "模型", "剪枝", "😀"] * 3000))
    save_tiny(str(p("m_smalltok")), "llama", vocab_size=256)
    shutil.copytree(p("m"), p("m_onlyvocab"))
    (p("m_onlyvocab") / "tokenizer.json").unlink()
    return [
        Case(
            "tokenizer larger than the embedding (ASCII text)",
            "tokenizer",
            ctx.prune("r_bt.yaml", "o_bt", model="m_bigtok"),
            msg=("200",),
            absent=(p("o_bt"),),
        ),
        Case(
            "tokenizer larger than the embedding (non-ASCII text)",
            "tokenizer",
            ctx.prune("r_bt2.yaml", "o_bt2", model="m_bigtok", calibration={"dataset": "uni.txt"}),
            msg=("200",),
            absent=(p("o_bt2"),),
        ),
        Case(
            "eval a model whose tokenizer is larger than its embedding",
            "tokenizer",
            ["eval", str(p("m_bigtok")), "--tasks", "", "--ppl-seqlen", "16"],
            msg=("200",),
        ),
        Case(
            "tokenizer smaller than the embedding",
            "tokenizer",
            ctx.prune("r_st2.yaml", "o_smalltok", model="m_smalltok"),
            expect="ok",
            check=pruned_as_asked(p("o_smalltok"), 0.2),
        ),
        Case(
            "non-ASCII calibration text",
            "tokenizer",
            ctx.prune("r_uni.yaml", "o_uni", calibration={"dataset": "uni.txt"}),
            expect="any",
        ),
        Case(
            "model folder without tokenizer files (prune)",
            "tokenizer",
            ctx.prune("r_nt.yaml", "o_nt", model="m_notok"),
            msg=("m_notok", "tokenizer"),
            check=_not_sentencepiece,
            absent=(p("o_nt"),),
        ),
        Case(
            "model folder without tokenizer files (eval)",
            "tokenizer",
            ["eval", str(p("m_notok")), "--tasks", "", "--ppl-seqlen", "16"],
            msg=("m_notok", "tokenizer"),
            check=_not_sentencepiece,
        ),
        Case(
            "model folder with tokenizer_config but no tokenizer.json",
            "tokenizer",
            ctx.prune("r_ov.yaml", "o_ov", model="m_onlyvocab"),
            msg=("m_onlyvocab", "tokenizer"),
            check=_not_sentencepiece,
        ),
        Case(
            "graph of a model folder without tokenizer files",
            "tokenizer",
            ["graph", str(p("m_notok"))],
            expect="ok",
        ),
    ]


def _not_sentencepiece(o: Outcome) -> tuple[str, str] | None:
    return ("minor", "blames sentencepiece") if "sentencepiece" in o.err.lower() else None


def seqlen_cases(ctx: Ctx) -> list[Case]:
    p = ctx.p
    return [
        Case(
            "calibration seqlen 300 beyond 256 positions",
            "seqlen",
            ctx.prune("r_sl.yaml", "o_sl", calibration={"seqlen": 300, "n_samples": 2}),
            expect="any",
            msg=("300", "256"),
        ),
        Case(
            "heldout_seqlen 5000 beyond positions",
            "seqlen",
            ctx.prune(
                "r_hsl.yaml",
                "o_hsl",
                **SUBLAYERS,
                calibration={"heldout_seqlen": 5000},
            ),
            expect="any",
            msg=("heldout_seqlen",),
        ),
        Case(
            "evaluate seqlen 9999 beyond positions",
            "seqlen",
            ctx.prune(
                "r_esl.yaml",
                "o_esl",
                evaluate={
                    "enabled": True,
                    "perplexity": [{"dataset": "c.txt", "seqlen": 9999, "max_windows": 1}],
                },
            ),
            expect="any",
            msg=("9999",),
            check=no_nan_output,
        ),
        Case(
            "eval --ppl-seqlen 5000 beyond positions",
            "seqlen",
            ["eval", str(p("run")), "--tasks", "", "--ppl-seqlen", "5000"],
            expect="any",
            msg=("5000",),
            check=no_nan_output,
        ),
        Case(
            "calibration seqlen longer than the text",
            "seqlen",
            ctx.prune("r_slt.yaml", "o_slt", calibration={"seqlen": 100000, "n_samples": 1}),
            msg=("seqlen",),
            absent=(p("o_slt"),),
        ),
    ]


def forked(case: Case, gib: float = 3) -> Case:
    """The case in a forked child that may add only `gib` of address space: a case that would read
    /dev/zero or expand an alias bomb into memory must not take the shared machine down with it."""
    case.mode, case.memory_gib = "fork", gib
    return case


def resource_cases(ctx: Ctx) -> list[Case]:
    p = ctx.p

    def case(label: str, args: list[str], words: tuple[str, ...] = (), expect: str = "fail") -> Case:
        return forked(Case(label, "resource", args, msg=words, expect=expect))

    return [
        case(
            "calibration n_samples 1e9",
            ctx.prune("r_ns.yaml", "o_ns", calibration={"n_samples": 10**9}),
            ("n_samples",),
        ),
        case(
            "calibration seqlen 1e9",
            ctx.prune("r_sq.yaml", "o_sq", calibration={"seqlen": 10**9}),
            ("seqlen",),
        ),
        case(
            "heldout_windows 1e9",
            ctx.prune(
                "r_hw.yaml",
                "o_hw",
                **SUBLAYERS,
                calibration={"heldout_windows": 10**9},
            ),
            expect="any",
        ),
        case(
            "evaluate max_windows 1e12",
            ctx.prune(
                "r_mw.yaml",
                "o_mw",
                evaluate={
                    "enabled": True,
                    "perplexity": [{"dataset": "c.txt", "seqlen": 32, "max_windows": 10**12}],
                },
            ),
            expect="any",
        ),
        case(
            "eval --ppl-windows 1e12",
            ["eval", str(p("run")), "--tasks", "", "--ppl-seqlen", "16", "--ppl-windows", str(10**12)],
            expect="any",
        ),
        case(
            "calibration from /dev/zero",
            ctx.prune("r_zero.yaml", "o_z", calibration={"dataset": "/dev/zero"}),
            ("/dev/zero",),
        ),
        case(
            "calibration from /dev/urandom",
            ctx.prune("r_rand.yaml", "o_ur", calibration={"dataset": "/dev/urandom"}),
            ("/dev/urandom",),
        ),
        case(
            "model.id /dev/zero",
            ctx.prune("r_mz.yaml", "o_mz", model="/dev/zero"),
            ("/dev/zero",),
        ),
        case(
            "a billion-laughs alias bomb in a recipe",
            ["prune", str(p("y_bomb.yaml")), "-o", str(p("o_y"))],
            ("y_bomb.yaml",),
        ),
    ]


def readonly_cases(ctx: Ctx) -> list[Case]:
    if ctx.ro is None:
        return []
    p, ro, run = ctx.p, ctx.ro, str(ctx.p("run"))
    return [
        Case(
            "prune into a read-only folder",
            "read-only",
            ["prune", ctx.recipe("r.yaml"), "-o", str(ro / "out"), "--quiet"],
            msg=(str(ro),),
            keep=(ro,),
        ),
        Case(
            "export gguf into a read-only folder",
            "read-only",
            ctx.export("run_g", "gguf", out=ro / "x.gguf"),
            msg=(str(ro),),
            keep=(ro,),
        ),
        Case(
            "export decilm into a read-only folder",
            "read-only",
            ctx.export(run, "decilm", out=ro / "x"),
            msg=(str(ro),),
            keep=(ro,),
        ),
        Case(
            "search into a read-only folder",
            "read-only",
            ["search", ctx.search_recipe("s_ro.yaml"), "-o", str(ro / "s"), "--quiet", "--no-validate"],
            msg=(str(ro),),
            keep=(ro,),
        ),
        Case(
            "search with its SQLite storage in a read-only folder",
            "read-only",
            [
                "search",
                ctx.search_recipe("s_ro2.yaml"),
                "-o",
                str(p("s_ro2")),
                "--storage",
                str(ro / "x.db"),
                "--quiet",
                "--no-validate",
            ],
            msg=(str(ro),),
            keep=(ro,),
        ),
        Case(
            "prune from a recipe in a read-only folder",
            "read-only",
            ["prune", str(ro / "kept.txt"), "-o", str(p("o_rok"))],
            msg=("kept.txt",),
            keep=(ro,),
        ),
        Case(
            "export with the default name beside a read-only run",
            "read-only",
            ctx.export(ro, "gguf"),
            msg=(str(ro),),
            keep=(ro,),
        ),
    ]


def dataset_cases(ctx: Ctx) -> list[Case]:
    p = ctx.p
    return [
        Case(
            "calibration from an unreachable hub dataset",
            "dataset",
            ctx.prune("r_hub.yaml", "o_hub", calibration={"dataset": "someone/no-such-dataset"}),
            msg=("someone/no-such-dataset",),
            timeout=90,
        ),
        Case(
            "calibration wikitext2 without the data root",
            "dataset",
            ctx.prune(
                "r_wt.yaml", "o_wt", calibration={"dataset": "wikitext2", "data_root": str(p("nowhere"))}
            ),
            msg=("nowhere",),
        ),
        Case(
            "calibration file missing",
            "dataset",
            ctx.prune("r_cm.yaml", "o_cm", quiet=False, calibration={"dataset": "nope.txt"}),
            msg=("nope.txt",),
        ),
        Case(
            "evaluate set missing",
            "dataset",
            ctx.prune(
                "r_em.yaml",
                "o_em",
                evaluate={"enabled": True, "perplexity": [{"dataset": "nope2.txt", "seqlen": 32}]},
            ),
            msg=("nope2.txt",),
            absent=(p("o_em"),),
        ),
        Case(
            "evaluate task file missing",
            "dataset",
            ctx.prune("r_tm.yaml", "o_tm", evaluate={"enabled": True, "tasks": ["piqa"]}),
            msg=("piqa",),
            absent=(p("o_tm"),),
        ),
        Case(
            "calibration dataset an unknown short name",
            "dataset",
            ctx.prune("r_sn.yaml", "o_sn", calibration={"dataset": "wikitext-9"}),
            msg=("wikitext-9",),
            timeout=90,
        ),
    ]


def lock_cases(ctx: Ctx) -> list[Case]:
    from secateur.testing import save_tiny

    p = ctx.p
    lockdir = p("locks")
    save_tiny(str(lockdir / "tiny"), "llama", seed=0)
    (lockdir / "c.txt").write_text("pruning makes models smaller and faster. " * 400)
    for v in (1, 2):
        shutil.copy(LOCKS / f"lock-v{v}.yaml", lockdir / f"lock-v{v}.yaml")
    good = (p("run") / "recipe.lock.yaml").read_text()
    data = yaml.safe_load(good)

    def variant(name: str, edit: Any) -> str:
        d = json.loads(json.dumps(data))
        edit(d)
        p(name).write_text(yaml.safe_dump(d))
        return str(p(name))

    p("lock_trunc.yaml").write_text(good[: len(good) // 3])
    p("lock_garbage.yaml").write_text("{{{{")
    p("lock_tag.yaml").write_text(good + "x: !!python/object/apply:os.system ['true']\n")
    shutil.copytree(p("m"), p("m_other"))
    save_tiny(str(p("m_other")), "llama", seed=5)
    rows = [
        ("lock version 1 re-applies", lockdir / "lock-v1.yaml", "o_l1", "ok", ("bit-identical",)),
        ("lock version 2 re-applies", lockdir / "lock-v2.yaml", "o_l2", "ok", ("bit-identical",)),
        ("a run's own lock re-applies", p("run", "recipe.lock.yaml"), "o_l3", "ok", ("bit-identical",)),
        ("lock truncated", "lock_trunc.yaml", "o_lt", "fail", ("lock_trunc.yaml",)),
        ("lock garbage", "lock_garbage.yaml", "o_lg", "fail", ("lock_garbage.yaml",)),
        ("lock with a python tag", "lock_tag.yaml", "o_ltag", "fail", ("lock_tag.yaml",)),
        (
            "lock version 99",
            variant("lock_v99.yaml", lambda d: d.update(lock_version=99)),
            "o_l99",
            "fail",
            ("lock_version",),
        ),
        (
            "lock kept index out of range",
            variant("lock_idx.yaml", lambda d: next(iter(d["kept"][0].values())).update(mlp=[0, 1, 5000])),
            "o_lidx",
            "fail",
            ("5000",),
        ),
        (
            "lock of another model",
            variant("lock_other.yaml", lambda d: d["recipe"]["model"].update(id=str(p("m_other")))),
            "o_lo",
            "fail",
            ("another model",),
        ),
        (
            "lock with a missing calibration file",
            variant(
                "lock_nocal.yaml", lambda d: d["recipe"]["calibration"].update(dataset=str(p("gone.txt")))
            ),
            "o_lnc",
            "fail",
            ("gone.txt",),
        ),
        (
            "lock onto its own run without --overwrite",
            p("run", "recipe.lock.yaml"),
            "run",
            "fail",
            ("recipe.lock.yaml",),
        ),
    ]
    return [
        Case(
            label,
            "lock",
            ["prune", "--lock", str(p(str(lock))), "-o", str(p(out))],
            expect=e,
            msg=w if e == "fail" else (),
            check=says(*w) if e == "ok" else None,
            keep=(p("run"),),
        )
        for label, lock, out, e, w in rows
    ]


def hostile_cases(ctx: Ctx) -> list[Case]:
    from secateur.testing import save_tiny

    p = ctx.p
    uni = p("modèle ü 模型")
    save_tiny(str(uni), "llama")
    r_uni = ctx.recipe("dossier é/recette 😀.yaml", model=str(uni))
    os.symlink(p("m"), p("link-to-m"))
    os.symlink(p("mine"), p("link-to-mine"))
    os.symlink(p("m", "model.safetensors"), p("link-weights.safetensors"))
    os.symlink(p("nowhere-target"), p("dangling"))
    os.symlink(p("r.yaml"), p("link-recipe.yaml"))
    p("nl").mkdir()
    r = ctx.recipe("r.yaml")
    return [
        Case(
            "unicode and spaces in model, recipe and output paths",
            "hostile-new",
            ["prune", r_uni, "-o", str(p("sortie 😀 é")), "--quiet"],
            expect="ok",
            check=pruned_as_asked(p("sortie 😀 é"), 0.2),
        ),
        Case(
            "export a unicode-named run",
            "hostile-new",
            ctx.export("sortie 😀 é", "decilm", out="export ü"),
            expect="ok",
        ),
        Case(
            "output a symlink to the source model --overwrite",
            "hostile-new",
            ["prune", r, "-o", str(p("link-to-m")), "--overwrite", "--quiet"],
            keep=(p("m"),),
        ),
        Case(
            "output a symlink to a user folder --overwrite",
            "hostile-new",
            ["prune", r, "-o", str(p("link-to-mine")), "--overwrite", "--quiet"],
            keep=(p("mine"),),
        ),
        Case(
            "export -o a symlink to the source weights --overwrite",
            "hostile-new",
            ctx.export("run", "decilm", "--overwrite", out="link-weights.safetensors"),
            keep=(p("m"),),
        ),
        Case(
            "output a dangling symlink",
            "hostile-new",
            ["prune", r, "-o", str(p("dangling")), "--quiet"],
            expect="any",
            keep=(p("m"), p("r.yaml")),
            check=lambda o: (
                ("serious", "wrote through a dangling link") if p("nowhere-target").exists() else None
            ),
        ),
        Case(
            "model.id through a symlink",
            "hostile-new",
            ctx.prune("r_link.yaml", "o_link", model="link-to-m"),
            expect="ok",
            check=pruned_as_asked(p("o_link"), 0.2),
        ),
        Case(
            "recipe through a symlink, output beside it",
            "hostile-new",
            ["prune", str(p("link-recipe.yaml")), "-o", str(p("o_lr")), "--quiet"],
            expect="ok",
        ),
        Case(
            "output path with a newline",
            "hostile-new",
            ["prune", r, "-o", str(p("nl", "a\nb")), "--quiet"],
            expect="any",
            keep=(p("m"),),
        ),
        Case(
            "output path '-'", "hostile-new", ["prune", r, "-o", "-", "--quiet"], expect="any", keep=(p("m"),)
        ),
        Case(
            "output '..' (the parent of the working folder)",
            "hostile-new",
            ["prune", r, "-o", "..", "--overwrite", "--quiet"],
            keep=(p("m"), p("r.yaml")),
        ),
        Case(
            "output a relative path to the source",
            "hostile-new",
            ["prune", r, "-o", "./m/../m", "--overwrite", "--quiet"],
            keep=(p("m"),),
        ),
        Case(
            "output with a trailing slash onto the source",
            "hostile-new",
            ["prune", r, "-o", str(p("m")) + "/", "--overwrite", "--quiet"],
            keep=(p("m"),),
        ),
        Case(
            "model.id given with ~",
            "hostile-new",
            ctx.prune("r_tilde.yaml", "o_t", model="~/no-such-model-here"),
            msg=("no-such-model-here",),
        ),
        Case(
            "the recipe's output.dir is the source model",
            "hostile-new",
            ["prune", ctx.recipe("r_od.yaml", output={"dir": str(p("m"))}), "--overwrite", "--quiet"],
            keep=(p("m"),),
        ),
        Case(
            "layers selector 'abc'",
            "hostile-new",
            ctx.prune("r_abc.yaml", "o_abc", targets={"layers": ["abc"]}),
            msg=("abc",),
        ),
        Case(
            "seed a negative number",
            "hostile-new",
            ctx.prune("r_seed.yaml", "o_seed", calibration={"seed": -1}),
            expect="any",
        ),
        Case(
            "seed 2**70",
            "hostile-new",
            ctx.prune("r_seed2.yaml", "o_seed2", calibration={"seed": 2**70}),
            msg=("seed",),
        ),
        Case(
            "a recipe that is a symlink loop",
            "hostile-new",
            ["prune", _loop(p), "-o", str(p("o_loop"))],
            msg=("loop.yaml",),
        ),
        Case(
            "max_shard_size 1 byte",
            "hostile-new",
            ctx.prune("r_shard.yaml", "o_shard", output={"max_shard_size": 1}),
            expect="any",
            check=pruned_as_asked(p("o_shard"), 0.2),
        ),
        Case(
            "max_shard_size '10KB' (sharded output)",
            "hostile-new",
            ctx.prune("r_shard2.yaml", "o_shard2", output={"max_shard_size": "10KB"}),
            expect="ok",
            check=pruned_as_asked(p("o_shard2"), 0.2),
        ),
        Case(
            "prune a pruned run again",
            "hostile-new",
            ctx.prune("r_again.yaml", "o_again", model="run"),
            expect="any",
            keep=(p("run"),),
        ),
        Case(
            "a read-only variant cache folder",
            "hostile-new",
            ["search", ctx.search_recipe("s_hro.yaml"), "-o", str(p("s_hro")), "--quiet", "--no-validate"],
            mode="fork",
            env={"SECATEUR_VARIANTS": str(ctx.ro or p("mine"))},
            expect="any",
            keep=(ctx.ro or p("mine"),),
        ),
    ]


def _loop(p: Any) -> str:
    os.symlink(p("loop.yaml"), p("loop2.yaml"))
    os.symlink(p("loop2.yaml"), p("loop.yaml"))
    return str(p("loop.yaml"))


def api_cases(ctx: Ctx) -> list[Case]:
    import torch

    import secateur
    from secateur.api import prune

    p = ctx.p
    r = ctx.recipe("r.yaml")
    q = dict(progress=False, log=lambda s: None)

    def concrete_class_refuses() -> None:
        from transformers import LlamaForCausalLM

        LlamaForCausalLM.from_pretrained(str(p("o_sub")))

    prune(
        ctx.recipe("r_sub.yaml", **SUBLAYERS),
        output=p("o_sub"),
        **q,
    )

    def roundtrip() -> None:
        lm = secateur.load_pruned(str(p("run")))
        model = lm
        model.save_pretrained(str(p("rt")))
        again = secateur.load_pruned(str(p("rt")))
        ids = torch.arange(1, 9)[None]
        a, b = model(ids).logits, again(ids).logits
        assert torch.equal(a, b), "save cycle changed the logits"

    def keep_oob() -> None:
        lm = secateur.load_model(str(p("m")), dtype="float32", device="cpu")
        secateur.apply_keep(lm.model, lm.adapter, {0: secateur.LayerKeep(mlp=[0, 1, 999])})

    def keep_empty() -> None:
        lm = secateur.load_model(str(p("m")), dtype="float32", device="cpu")
        secateur.apply_keep(lm.model, lm.adapter, {0: secateur.LayerKeep(mlp=[])})

    def keep_layer() -> None:
        lm = secateur.load_model(str(p("m")), dtype="float32", device="cpu")
        secateur.apply_keep(lm.model, lm.adapter, {9: secateur.LayerKeep(mlp=[0, 1])})

    def save_into(target: Path, overwrite: bool) -> Any:
        def f() -> None:
            lm = secateur.load_pruned(str(p("run")))
            secateur.save_pruned(lm, str(target), overwrite=overwrite)

        return f

    def api_prune_result() -> Any:
        out = prune(r, output=p("o_api"), **q)
        assert out.output == p("o_api") or str(out.output) == str(p("o_api"))
        return out

    rows: list[tuple[str, Any, str, tuple[str, ...], tuple[Path, ...], tuple[type[BaseException], ...]]] = [
        (
            "prune() a missing recipe",
            lambda: prune(str(p("nope.yaml")), output=p("o_a1"), **q),
            "fail",
            ("nope.yaml",),
            (),
            (ValueError, OSError),
        ),
        (
            "prune() with no recipe at all",
            lambda: prune(output=p("o_a2"), **q),
            "fail",
            ("recipe",),
            (),
            (ValueError, TypeError),
        ),
        (
            "prune() output = source model, overwrite",
            lambda: prune(r, output=p("m"), overwrite=True, **q),
            "fail",
            ("m",),
            (p("m"),),
            (ValueError, OSError),
        ),
        (
            "prune() overrides given as one string",
            lambda: prune(r, output=p("o_a3"), overrides="budget.params=0.3", **q),
            "any",
            (),
            (),
            (ValueError, TypeError),
        ),
        (
            "prune() recipe= a dict",
            lambda: prune(recipe={"version": 1}, output=p("o_a4"), **q),
            "fail",
            ("budget",),
            (),
            (ValueError, TypeError),
        ),
        ("prune() a good recipe", api_prune_result, "ok", (), (), (ValueError,)),
        (
            "load_pruned() a missing folder",
            lambda: secateur.load_pruned(str(p("nothing"))),
            "fail",
            ("nothing",),
            (),
            (ValueError, OSError),
        ),
        (
            "load_pruned() a user folder",
            lambda: secateur.load_pruned(str(p("mine"))),
            "fail",
            ("mine",),
            (),
            (ValueError, OSError),
        ),
        (
            "load_pruned() a truncated run",
            lambda: secateur.load_pruned(str(p("run_trunc"))),
            "fail",
            ("model.safetensors",),
            (),
            (ValueError, OSError),
        ),
        (
            "load_model() a garbage safetensors",
            lambda: secateur.load_model(str(p("m_garb"))),
            "fail",
            ("model.safetensors",),
            (),
            (ValueError, OSError),
        ),
        (
            "load_model() dtype float7",
            lambda: secateur.load_model(str(p("m")), dtype="float7"),
            "fail",
            ("float7",),
            (),
            (ValueError,),
        ),
        (
            "load_model() a folder without tokenizer",
            lambda: secateur.load_model(str(p("m_notok"))),
            "fail",
            ("m_notok",),
            (),
            (ValueError, OSError),
        ),
        ("apply_keep() an index out of range", keep_oob, "fail", ("999",), (), (ValueError,)),
        ("apply_keep() an empty MLP keep-set", keep_empty, "any", (), (), (ValueError,)),
        ("apply_keep() a layer that does not exist", keep_layer, "fail", ("9",), (), (ValueError,)),
        (
            "save_pruned() into a user folder",
            save_into(p("mine"), True),
            "fail",
            ("mine",),
            (p("mine"),),
            (ValueError, OSError),
        ),
        (
            "save_pruned() onto the source model",
            save_into(p("m"), True),
            "fail",
            ("m",),
            (p("m"),),
            (ValueError, OSError),
        ),
        ("save_pruned() into a new folder", save_into(p("o_save"), False), "ok", (), (), (ValueError,)),
        ("load -> save_pretrained -> load keeps the logits", roundtrip, "ok", (), (), (ValueError,)),
        (
            "LlamaForCausalLM.from_pretrained refuses a removed-branch output",
            concrete_class_refuses,
            "fail",
            (),
            (),
            (ValueError, OSError, RuntimeError),
        ),
        (
            "build_graph() of a string",
            lambda: secateur.build_graph("m", None),
            "fail",
            (),
            (),
            (ValueError, TypeError),
        ),
    ]
    return [
        Case(label, "api", fn, expect=e, msg=w, keep=k, raises=ex, mode="api")
        for label, fn, e, w, k, ex in rows
    ]


def cases(ctx: Ctx) -> list[Case]:
    return (
        signal_cases(ctx)
        + cli_cases(ctx)
        + yaml_cases(ctx)
        + tokenizer_cases(ctx)
        + seqlen_cases(ctx)
        + resource_cases(ctx)
        + readonly_cases(ctx)
        + dataset_cases(ctx)
        + lock_cases(ctx)
        + hostile_cases(ctx)
        + api_cases(ctx)
    )
