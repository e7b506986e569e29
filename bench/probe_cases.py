"""Fixtures and the first case groups of bench/reliability_probe.py: where outputs go (prune, export,
search, eval), damaged inputs, non-finite weights, budgets at and beyond their limits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reliability_probe import Case, Outcome


@dataclass
class Ctx:
    root: Path
    mounts: list[Path] = field(default_factory=list)
    ro: Path | None = None  # a read-only folder (bind mount), when the machine allows one

    def p(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def recipe(self, name: str, model: str | Path = "m", **over: Any) -> str:
        """A small fasp recipe (mlp channels, 20%) with `over` merged one level deep."""
        from secateur.testing import write_tiny_recipe

        mid = str(model) if str(model).startswith("/") else str(self.p(str(model)))
        return str(write_tiny_recipe(self.p(name), mid, **over))

    def prune(self, recipe: str, out: str, *flags: str, quiet: bool = True, **over: Any) -> list[str]:
        """argv of `prune` of `self.recipe(recipe, **over)` into the folder `out` under the root."""
        return [
            "prune",
            self.recipe(recipe, **over),
            "-o",
            str(self.p(out)),
            *(["--quiet"] if quiet else []),
            *flags,
        ]

    def export(self, src: str | Path, fmt: str, *flags: str, out: str | Path | None = None) -> list[str]:
        """argv of `export` of `src` as `fmt` into `out` (each a name under the root, or a path)."""
        where = [] if out is None else ["-o", str(self.p(str(out)))]
        return ["export", str(self.p(str(src))), "--format", fmt, *flags, *where]

    def search_recipe(self, name: str, **over: Any) -> str:
        """A small search recipe (2 trials) on the 4-layer model `m4`, written into `srun`."""
        from secateur.testing import tiny_search_recipe

        search = {"search": {"trials": 2, "heldout_tokens": 256, "pruner": False}}
        return str(
            tiny_search_recipe(
                self.root,
                name,
                model="m4",
                name=None,
                targets={"attention": "none"},
                allocation=search,
                output={"dir": str(self.p("srun"))},
                **over,
            )
        )


def _quiet(fn: Any, *a: Any, **k: Any) -> Any:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*a, **k)


def _poison(folder: Path, key: str, value: float, rows: slice | int = 3) -> None:
    from safetensors.torch import load_file, save_file

    st = load_file(str(folder / "model.safetensors"))
    t = st[key]
    if t.dim() == 2:
        t[rows, :3] = value
    else:
        t[rows] = value
    save_file(st, str(folder / "model.safetensors"), metadata={"format": "pt"})


def setup(root: Path) -> Ctx:
    """Tiny models, text, a good run of each kind, damaged copies, a read-only folder."""
    from secateur.api import prune
    from secateur.export import export
    from secateur.testing import CALIBRATION_WORDS, calibration_text, save_tiny, save_tiny_gguf

    ctx = Ctx(root)
    ctx.p("c.txt").write_text(calibration_text())
    (ctx.p("data-root", "wikitext2")).mkdir(parents=True)
    text = "\n".join(" ".join(CALIBRATION_WORDS[(i * j) % 10] for j in range(40)) for i in range(400))
    for f in ("wiki.test.raw", "wiki.train.raw", "wiki.valid.raw"):
        ctx.p("data-root", "wikitext2", f).write_text(text)
    save_tiny(str(ctx.p("m")), "llama")
    save_tiny(str(ctx.p("m4")), "llama", num_hidden_layers=4)
    save_tiny_gguf(str(ctx.p("tiny.gguf")))
    log = lambda s: None  # noqa: E731
    _quiet(prune, ctx.recipe("r.yaml"), output=ctx.p("run"), progress=False, log=log)
    _quiet(prune, ctx.recipe("rg.yaml", model="tiny.gguf"), output=ctx.p("run_g"), progress=False, log=log)
    _quiet(
        prune,
        ctx.recipe("rg88.yaml", model="tiny.gguf", budget={"params": 0.1}),
        output=ctx.p("run_g88"),
        progress=False,
        log=log,
    )  # MLP widths no quantised block divides
    _quiet(export, str(ctx.p("run")), "decilm", output=str(ctx.p("own-decilm")))
    _quiet(export, str(ctx.p("run_g")), "gguf", outtype="f32", output=str(ctx.p("own.gguf")))
    # a user's things
    ctx.p("mine").mkdir()
    ctx.p("mine", "notes.txt").write_text("my notes")
    ctx.p("user.txt").write_text("user data")
    ctx.p("hf").mkdir()
    save_tiny(str(ctx.p("hf")), "llama", seed=3)  # a user's own Hugging Face folder
    # damaged models
    for name, damage in DAMAGES.items():
        save_tiny(str(ctx.p(name)), "llama")
        damage(ctx.p(name))
    ctx.p("g100.gguf").write_bytes(b"GGUF" + os.urandom(96))
    ctx.p("gtrunc.gguf").write_bytes(ctx.p("tiny.gguf").read_bytes()[:3000])
    ctx.p("gempty.gguf").write_bytes(b"")
    ctx.p("notgguf.gguf").write_text("hello, I am text")
    for name, (key, value) in POISON.items():
        save_tiny(str(ctx.p(name)), "llama")
        _poison(ctx.p(name), key, value)
    save_tiny(str(ctx.p("m_big")), "llama")
    _poison(ctx.p("m_big"), "model.layers.0.mlp.down_proj.weight", 1e6, 0)
    # damaged runs
    for name, damage in RUN_DAMAGES.items():
        shutil.copytree(ctx.p("run"), ctx.p(name))
        damage(ctx.p(name))
    # a read-only folder (bind mount; chmod does not stop root)
    ctx.p("ro-src").mkdir()
    ctx.p("ro-src", "kept.txt").write_text("read-only content")
    ctx.p("ro").mkdir()
    r = subprocess.run(["mount", "--bind", str(ctx.p("ro-src")), str(ctx.p("ro"))], capture_output=True)
    if r.returncode == 0:
        ctx.mounts.append(ctx.p("ro"))
        r = subprocess.run(["mount", "-o", "remount,bind,ro", str(ctx.p("ro"))], capture_output=True)
        ctx.ro = ctx.p("ro") if r.returncode == 0 else None
    return ctx


def teardown(ctx: Ctx) -> None:
    for m in reversed(ctx.mounts):
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def _trunc(f: Path, n: int = 5000) -> None:
    f.write_bytes(f.read_bytes()[:n])


DAMAGES = {
    "m_trunc": lambda d: _trunc(d / "model.safetensors"),
    "m_garb": lambda d: (d / "model.safetensors").write_bytes(os.urandom(100)),
    "m_empty_sf": lambda d: (d / "model.safetensors").write_bytes(b""),
    "m_cfg": lambda d: (d / "config.json").write_text("{not json"),
    "m_nocfg": lambda d: (d / "config.json").unlink(),
    "m_cfg_type": lambda d: (d / "config.json").write_text(
        json.dumps({**json.loads((d / "config.json").read_text()), "model_type": "nosuchmodel"})
    ),
    "m_cfg_list": lambda d: (d / "config.json").write_text("[1, 2, 3]"),
    "m_tok": lambda d: (d / "tokenizer.json").write_text("garbage"),
    "m_tokcfg": lambda d: (d / "tokenizer_config.json").write_text("{{{"),
    "m_notok": lambda d: [p.unlink() for p in list(d.iterdir()) if "token" in p.name],
    "m_noweights": lambda d: (d / "model.safetensors").unlink(),
    "m_shape": lambda d: _reshape(d),
}


def _reshape(d: Path) -> None:
    """config.json says a wider MLP than the weights hold."""
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))


POISON = {
    "m_nan": ("model.layers.1.mlp.up_proj.weight", float("nan")),
    "m_inf": ("model.layers.1.mlp.up_proj.weight", float("inf")),
    "m_nan_norm": ("model.layers.0.input_layernorm.weight", float("nan")),
    "m_ninf_emb": ("model.embed_tokens.weight", float("-inf")),
}

RUN_DAMAGES = {
    "run_trunc": lambda d: _trunc(d / "model.safetensors"),
    "run_nojson": lambda d: (d / "secateur.json").write_text("{oops"),
    "run_nocfg": lambda d: (d / "config.json").unlink(),
    "run_noweights": lambda d: (d / "model.safetensors").unlink(),
}


# ---- checks -------------------------------------------------------------------------------


def pruned_as_asked(out: Path, frac: float, tol: float = 0.35) -> Any:
    """The output exists, loads, has finite logits and removed about `frac` of the decoder."""

    def check(o: Outcome) -> tuple[str, str] | None:
        if o.rc != 0:
            return None
        import torch

        from secateur import load_pruned

        rep = json.loads((out / "report.json").read_text())
        d, p = rep["size"]["dense"], rep["size"]["pruned"]
        removed = 1 - p["decoder_linear_params"] / d["decoder_linear_params"]
        if abs(removed - frac) > tol * frac:
            return ("serious", f"removed {removed:.3f} of the decoder, asked {frac}")
        model = load_pruned(str(out))
        n = sum(p.numel() for p in model.parameters())
        if n != rep["size"]["pruned"]["params"]:
            return ("serious", f"model has {n} parameters, report says {rep['size']['pruned']['params']}")
        with torch.no_grad():
            logits = model(torch.arange(1, 17)[None]).logits
        if not torch.isfinite(logits).all():
            return ("serious", "non-finite logits in the saved model")
        return None

    return check


def says(*words: str) -> Any:
    """stdout (not stderr) must contain these words, e.g. a number that must be printed."""

    def check(o: Outcome) -> tuple[str, str] | None:
        miss = [w for w in words if w.lower() not in o.out.lower()]
        return ("minor", f"output lacks {miss}") if miss else None

    return check


def no_nan_output(o: Outcome) -> tuple[str, str] | None:
    low = o.out.lower()
    if o.rc == 0 and (" nan" in low or "inf" in low.replace("info", "")):
        return ("serious", "a NaN/inf number printed with exit 0")
    return None


# ---- case groups ------------------------------------------------------------------------


def output_cases(ctx: Ctx) -> list[Case]:
    p, r = ctx.p, ctx.recipe("r.yaml")
    run = p("run")
    out = []
    prune_targets = [
        ("source model folder", p("m"), ("m",)),
        ("source weights file", p("m", "model.safetensors"), ("model.safetensors",)),
        ("source GGUF", p("tiny.gguf"), ("tiny.gguf",)),
        ("recipe file", p("r.yaml"), ("r.yaml",)),
        ("working folder", ctx.root, ()),
        ("calibration file", p("c.txt"), ("c.txt",)),
        ("user folder", p("mine"), ("mine",)),
        ("user file", p("user.txt"), ("user.txt",)),
        ("user HF folder", p("hf"), ("hf",)),
        ("run weights file", run / "model.safetensors", ("model.safetensors",)),
        ("inside the run", run / "sub", ()),
        ("root /", Path("/"), ()),
        ("home", Path.home(), ()),
        ("under a file", p("user.txt", "x"), ("user.txt",)),
    ]
    for label, target, words in prune_targets:
        keep = (target,) if target not in (Path("/"), Path.home(), ctx.root) else (p("m"), p("r.yaml"))
        if label in ("under a file", "inside the run"):
            keep = (p("user.txt"),) if label == "under a file" else (run,)
        out.append(
            Case(
                f"prune -o {label} --overwrite",
                "output-prune",
                ["prune", r, "-o", str(target), "--overwrite", "--quiet"],
                msg=words,
                keep=keep,
            )
        )
    shutil.copytree(run, p("run_added"))
    (p("run_added") / "my-notes.md").write_text("mine")
    shutil.copytree(run, p("run_edited"))
    (p("run_edited") / "report.md").write_text("my edits")
    out += [
        Case(
            "prune onto a run holding a user's file --overwrite",
            "output-prune",
            ["prune", r, "-o", str(p("run_added")), "--overwrite", "--quiet"],
            msg=("my-notes.md",),
            keep=(p("run_added"),),
        ),
        Case(
            "prune onto an existing run without --overwrite",
            "output-prune",
            ["prune", r, "-o", str(run), "--quiet"],
            msg=("--overwrite",),
            keep=(run,),
        ),
        Case(
            "prune onto its own earlier run --overwrite",
            "output-prune",
            ["prune", r, "-o", str(p("run2")), "--quiet"],
            expect="ok",
            check=pruned_as_asked(p("run2"), 0.2),
        ),
        Case(
            "prune again onto that run --overwrite",
            "output-prune",
            ["prune", r, "-o", str(p("run2")), "--overwrite", "--quiet"],
            expect="ok",
            check=pruned_as_asked(p("run2"), 0.2),
        ),
        Case(
            "prune -o a Secateur export folder --overwrite (its own output)",
            "output-prune",
            ["prune", r, "-o", str(p("own-decilm")), "--overwrite", "--quiet"],
            expect="ok",
            check=pruned_as_asked(p("own-decilm"), 0.2),
        ),
        Case(
            "prune -o an empty existing folder",
            "output-prune",
            ["prune", r, "-o", str(p("emptydir")), "--quiet"],
            expect="any",
            keep=(p("m"),),
        ),
        Case(
            "prune -o '' (empty string)",
            "output-prune",
            ["prune", r, "-o", "", "--quiet"],
            keep=(ctx.root / "r.yaml",),
        ),
        Case(
            "prune -o a 300-character name",
            "output-prune",
            ["prune", r, "-o", str(p("x" * 300)), "--quiet"],
            msg=("x" * 20,),
        ),
    ]
    p("emptydir").mkdir()
    # export
    export_targets = [
        ("source model folder", p("m")),
        ("source GGUF", p("tiny.gguf")),
        ("run folder", run),
        ("run weights", run / "model.safetensors"),
        ("recipe", p("r.yaml")),
        ("user file", p("user.txt")),
        ("user folder", p("mine")),
        ("user HF folder", p("hf")),
        ("working folder", ctx.root),
        ("inside the run", run / "x"),
    ]
    for label, target in export_targets:
        keep = (target,) if target != ctx.root else (p("r.yaml"), p("c.txt"))
        if label == "inside the run":
            keep = (run,)
        for fmt, extra in (("decilm", []), ("gguf", ["--tokenizer-gguf", str(p("tiny.gguf"))])):
            src = run if fmt == "decilm" else p("run_g")
            if label == "run folder" and fmt == "gguf":
                target, keep = p("run_g"), (p("run_g"),)
            if label == "run weights" and fmt == "gguf":
                target, keep = p("run_g", "model.safetensors"), (p("run_g", "model.safetensors"),)
            if label == "inside the run" and fmt == "gguf":
                target, keep = p("run_g", "x.gguf"), (p("run_g"),)
            out.append(
                Case(
                    f"export {fmt} -o {label} --overwrite",
                    "output-export",
                    ctx.export(src, fmt, *extra, "--overwrite", out=target),
                    keep=keep,
                )
            )
    shutil.copy(p("own.gguf"), p("edited.gguf"))
    out += [
        Case(
            "export gguf onto its own earlier GGUF without --overwrite",
            "output-export",
            ctx.export("run_g", "gguf", "--outtype", "f32", out="own.gguf"),
            msg=("--overwrite",),
            keep=(p("own.gguf"),),
        ),
        Case(
            "export gguf onto its own earlier GGUF --overwrite",
            "output-export",
            ctx.export("run_g", "gguf", "--outtype", "f32", "--overwrite", out="own.gguf"),
            expect="ok",
        ),
        Case(
            "export decilm onto its own earlier folder --overwrite",
            "output-export",
            ctx.export(run, "decilm", "--overwrite", out="own-decilm"),
            expect="ok",
        ),
        Case(
            "export gguf default name beside the run",
            "output-export",
            ctx.export("run_g", "gguf"),
            expect="ok",
            check=lambda o: None if p("run_g-f16.gguf").is_file() else ("serious", "no run_g-f16.gguf"),
        ),
        Case(
            "export gguf of a dense HF folder",
            "output-export",
            ctx.export("hf", "gguf", "--tokenizer-gguf", str(p("tiny.gguf")), out="hf.gguf"),
            expect="any",
            keep=(p("hf"),),
        ),
        Case("export --format onnx", "output-export", ctx.export(run, "onnx")),
        Case(
            "export a folder that is not a run",
            "output-export",
            ctx.export("mine", "decilm", out="x-decilm"),
            keep=(p("mine"),),
        ),
        Case(
            "export gguf q4_0 of MLP widths that are no multiple of 32",
            "output-export",
            ctx.export("run_g88", "gguf", "--outtype", "q4_0", out="q.gguf"),
            msg=("32",),
            absent=(p("q.gguf"),),
        ),
        Case(
            "export gguf with a 100-byte tokenizer GGUF",
            "output-export",
            ctx.export("run_g", "gguf", "--tokenizer-gguf", str(p("g100.gguf")), out="t.gguf"),
            msg=("g100.gguf",),
            absent=(p("t.gguf"),),
        ),
        Case(
            "export gguf with a tokenizer GGUF of another vocabulary",
            "output-export",
            ctx.export(run, "gguf", "--tokenizer-gguf", str(p("tiny.gguf")), out="t2.gguf"),
            msg=("tiny.gguf",),
            absent=(p("t2.gguf"),),
        ),
        Case(
            "export gguf -o a name without .gguf",
            "output-export",
            ctx.export("run_g", "gguf", out="noext"),
            expect="any",
        ),
    ]
    # search outputs
    sr = ctx.search_recipe("s.yaml")
    p("sdir").mkdir()
    p("sdir", "winner.yaml").write_text("my winner")
    p("sdir2").mkdir()
    p("sdir2", "history.png").write_bytes(b"my png")
    out += [
        Case(
            f"search -o {label}",
            "output-search",
            ["search", sr, "-o", str(t), "--quiet", "--no-validate"],
            keep=(t,) if t != ctx.root else (p("s.yaml"),),
        )
        for label, t in [
            ("source model", p("m4")),
            ("working folder", ctx.root),
            ("user file", p("user.txt")),
            ("folder with a user's winner.yaml", p("sdir")),
            ("folder with a user's history.png", p("sdir2")),
            ("a prune run", run),
            ("calibration file", p("c.txt")),
        ]
    ]
    out.append(
        Case(
            "search into a new folder",
            "output-search",
            ["search", sr, "-o", str(p("sgood")), "--quiet", "--no-validate"],
            expect="ok",
            timeout=300,
            check=lambda o: None if p("sgood", "winner.yaml").is_file() else ("serious", "no winner.yaml"),
        )
    )
    out.append(
        Case(
            "search again into that folder (resume)",
            "output-search",
            ["search", sr, "-o", str(p("sgood")), "--quiet", "--no-validate", "--trials", "3"],
            expect="ok",
            timeout=300,
        )
    )
    # eval and report: read-only commands on odd paths
    out += [
        Case(
            "eval a plain text file",
            "output-eval",
            ["eval", str(p("user.txt")), "--tasks", "", "--ppl-seqlen", "16"],
            msg=("user.txt",),
        ),
        Case(
            "eval a folder that does not exist",
            "output-eval",
            ["eval", str(p("nothing")), "--tasks", ""],
            msg=("nothing",),
        ),
        Case(
            "eval a recipe",
            "output-eval",
            ["eval", str(p("r.yaml")), "--tasks", "", "--ppl-seqlen", "16"],
            msg=("r.yaml",),
        ),
        Case(
            "eval a run",
            "output-eval",
            ["eval", str(run), "--tasks", "", "--ppl-seqlen", "32", "--ppl-windows", "2"],
            expect="ok",
            check=says("perplexity"),
        ),
        Case(
            "eval a GGUF",
            "output-eval",
            ["eval", str(p("tiny.gguf")), "--tasks", "", "--ppl-seqlen", "32", "--ppl-windows", "2"],
            expect="ok",
            check=says("perplexity"),
        ),
        Case(
            "report of a folder that is not a run", "output-eval", ["report", str(p("mine"))], msg=("mine",)
        ),
        Case("report of nothing", "output-eval", ["report", str(p("nothing"))], msg=("nothing",)),
        Case("graph of a plain text file", "output-eval", ["graph", str(p("user.txt"))], msg=("user.txt",)),
    ]
    return out


def damaged_cases(ctx: Ctx) -> list[Case]:
    p = ctx.p
    out = []
    for name, words in [
        ("m_trunc", ("model.safetensors",)),
        ("m_garb", ("model.safetensors",)),
        ("m_empty_sf", ("model.safetensors",)),
        ("m_cfg", ("config.json",)),
        ("m_nocfg", ("config.json",)),
        ("m_cfg_type", ("nosuchmodel",)),
        ("m_cfg_list", ("config.json",)),
        ("m_tok", ("tokenizer",)),
        ("m_tokcfg", ("tokenizer_config.json",)),
        ("m_notok", ("m_notok", "tokenizer")),
        ("m_noweights", ("m_noweights",)),
        ("m_shape", ("config.json", "_proj")),
        ("g100.gguf", ("g100.gguf",)),
        ("gtrunc.gguf", ("gtrunc.gguf",)),
        ("gempty.gguf", ("gempty.gguf",)),
        ("notgguf.gguf", ("notgguf.gguf",)),
    ]:
        out.append(
            Case(
                f"prune a damaged source {name}",
                "damaged-file",
                ctx.prune(f"r_{name}.yaml", f"o_{name}", model=name),
                msg=words,
                keep=(p(name),),
                absent=(p(f"o_{name}"),),
            )
        )
    for name in ("m_trunc", "m_cfg", "m_notok", "gtrunc.gguf", "m_shape"):
        out.append(
            Case(
                f"eval a damaged source {name}",
                "damaged-file",
                ["eval", str(p(name)), "--tasks", "", "--ppl-seqlen", "16", "--ppl-windows", "1"],
                msg=(name.split(".")[0],),
            )
        )
    out.append(
        Case("graph of a 100-byte GGUF", "damaged-file", ["graph", str(p("g100.gguf"))], msg=("g100.gguf",))
    )
    out.append(
        Case(
            "prune --stream a truncated safetensors",
            "damaged-file",
            ctx.prune("r_st.yaml", "o_st", "--stream", model="m_trunc"),
            msg=("model.safetensors",),
            absent=(p("o_st"),),
        )
    )
    for name, words in [
        ("run_trunc", ("model.safetensors",)),
        ("run_nojson", ("secateur.json",)),
        ("run_nocfg", ("config.json",)),
        ("run_noweights", ("run_noweights",)),
    ]:
        out.append(
            Case(
                f"export decilm of a damaged run {name}",
                "damaged-file",
                ctx.export(name, "decilm", out=f"x_{name}"),
                msg=words,
                absent=(p(f"x_{name}"),),
            )
        )
        out.append(
            Case(
                f"eval a damaged run {name}",
                "damaged-file",
                ["eval", str(p(name)), "--tasks", "", "--ppl-seqlen", "16"],
                msg=words,
            )
        )
    out.append(
        Case(
            "speed of a damaged run",
            "damaged-file",
            ["speed", str(p("run_trunc")), "--engine", "torch", "--prefill", "8", "--decode", "2"],
            msg=("model.safetensors",),
        )
    )
    p("bin.yaml").write_bytes(os.urandom(300))
    p("latin1.yaml").write_bytes("model:\n  id: caf\xe9\n".encode("latin-1"))
    p("binc.txt").write_bytes(os.urandom(4000))
    p("empty.txt").write_text("")
    out += [
        Case(
            "prune a binary recipe",
            "damaged-file",
            ["prune", str(p("bin.yaml")), "-o", str(p("o_bin"))],
            msg=("bin.yaml",),
        ),
        Case(
            "validate a latin-1 recipe",
            "damaged-file",
            ["recipe", "validate", str(p("latin1.yaml"))],
            msg=("latin1.yaml",),
        ),
        Case(
            "prune with an empty calibration file",
            "damaged-file",
            ctx.prune("r_e.yaml", "o_e", calibration={"dataset": "empty.txt"}),
            msg=("empty.txt",),
            absent=(p("o_e"),),
        ),
        Case(
            "prune with binary calibration text",
            "damaged-file",
            ctx.prune("r_bc.yaml", "o_bc", calibration={"dataset": "binc.txt"}),
            expect="any",
            msg=("binc.txt",),
        ),
        Case(
            "prune with a calibration folder",
            "damaged-file",
            ctx.prune("r_cd.yaml", "o_cd", calibration={"dataset": str(p("mine"))}),
            msg=("mine",),
            absent=(p("o_cd"),),
        ),
    ]
    return out


def nonfinite_cases(ctx: Ctx) -> list[Case]:
    p = ctx.p
    out = []
    for name, words in [
        ("m_nan", ("up_proj",)),
        ("m_inf", ("up_proj",)),
        ("m_nan_norm", ("input_layernorm",)),
        ("m_ninf_emb", ("embed_tokens",)),
    ]:
        out.append(
            Case(
                f"prune a source with {name[2:]}",
                "nonfinite",
                ctx.prune(f"r_{name}.yaml", f"o_{name}", model=name),
                msg=words,
                absent=(p(f"o_{name}"),),
            )
        )
    out += [
        Case(
            "prune --stream a NaN source",
            "nonfinite",
            ctx.prune("r_nans.yaml", "o_nans", "--stream", model="m_nan"),
            msg=("up_proj",),
            absent=(p("o_nans"),),
        ),
        Case(
            "prune to float16 with weights beyond its range",
            "nonfinite",
            ctx.prune("r_big.yaml", "o_big", model="m_big", output={"dtype": "float16"}),
            msg=("float16",),
            absent=(p("o_big"),),
        ),
        Case(
            "prune --stream to float16 with weights beyond its range",
            "nonfinite",
            ctx.prune("r_bigs.yaml", "o_bigs", "--stream", model="m_big", output={"dtype": "float16"}),
            msg=("float16",),
            absent=(p("o_bigs"),),
        ),
        Case(
            "prune to bfloat16 with the same weights",
            "nonfinite",
            ctx.prune("r_bigb.yaml", "o_bigb", model="m_big", output={"dtype": "bfloat16"}),
            expect="any",
            check=no_nan_output,
        ),
        Case(
            "eval a NaN source",
            "nonfinite",
            ["eval", str(p("m_nan")), "--tasks", "", "--ppl-seqlen", "16", "--ppl-windows", "2"],
            expect="any",
            check=no_nan_output,
        ),
        Case(
            "prune with perplexity on in float16 working dtype",
            "nonfinite",
            ctx.prune(
                "r_f16.yaml",
                "o_f16",
                model={"id": str(p("m_big")), "dtype": "float16", "device": "cpu"},
                evaluate={
                    "enabled": True,
                    "perplexity": [{"dataset": "c.txt", "seqlen": 32, "max_windows": 2}],
                },
            ),
            expect="any",
            check=no_nan_output,
        ),
    ]
    return out


def budget_cases(ctx: Ctx) -> list[Case]:
    p = ctx.p
    rows: list[tuple[str, dict[str, Any], str, tuple[str, ...]]] = [
        ("params 0", {"budget": {"params": 0, "multiple_of": 4}}, "fail", ("budget.params",)),
        ("params -0.2", {"budget": {"params": -0.2}}, "fail", ("budget.params",)),
        ("params 1.5", {"budget": {"params": 1.5}}, "fail", ("budget.params",)),
        ("params 1.0", {"budget": {"params": 1.0, "multiple_of": 4}}, "fail", ("budget.params",)),
        ("params 0.999", {"budget": {"params": 0.999, "multiple_of": 4}}, "fail", ("min_keep",)),
        ("params 1e-9", {"budget": {"params": 1e-9, "multiple_of": 4}}, "fail", ("budget",)),
        ("params 0.001", {"budget": {"params": 0.001, "multiple_of": 4}}, "fail", ("budget",)),
        ("params .nan", {"budget": {"params": float("nan")}}, "fail", ("budget.params",)),
        ("params .inf", {"budget": {"params": float("inf")}}, "fail", ("budget.params",)),
        (
            "params 3 (a count below one unit)",
            {"budget": {"params": 3, "multiple_of": 4}},
            "fail",
            ("budget",),
        ),
        ("params 10**30", {"budget": {"params": 10**30, "multiple_of": 4}}, "fail", ("budget",)),
        ("params '20%'", {"budget": {"params": "20%"}}, "fail", ("budget.params",)),
        ("params true", {"budget": {"params": True}}, "fail", ("budget.params",)),
        ("multiple_of 0", {"budget": {"params": 0.2, "multiple_of": 0}}, "fail", ("multiple_of",)),
        ("multiple_of 1000", {"budget": {"params": 0.2, "multiple_of": 1000}}, "fail", ("multiple_of",)),
        (
            "multiple_of 96 (the whole width)",
            {"budget": {"params": 0.2, "multiple_of": 96}},
            "fail",
            ("budget",),
        ),
        (
            "min_keep 0.99",
            {"budget": {"params": 0.5, "multiple_of": 4, "min_keep": 0.99}},
            "fail",
            ("min_keep",),
        ),
        (
            "min_keep 1.5",
            {"budget": {"params": 0.2, "multiple_of": 4, "min_keep": 1.5}},
            "fail",
            ("min_keep",),
        ),
        (
            "max_keep < min_keep",
            {"budget": {"params": 0.2, "min_keep": 0.5, "max_keep": 0.3}},
            "fail",
            ("max_keep",),
        ),
        ("two budget kinds", {"budget": {"params": 0.2, "flops": 0.9}}, "fail", ("budget",)),
        ("no budget at all", {"budget": None}, "fail", ("budget",)),
        ("flops 0.1", {"budget": {"params": None, "flops": 0.1, "multiple_of": 4}}, "ok", ()),
        ("flops 0.9", {"budget": {"params": None, "flops": 0.9, "multiple_of": 4}}, "fail", ("flops",)),
        ("flops 1.2", {"budget": {"params": None, "flops": 1.2, "multiple_of": 4}}, "fail", ("flops",)),
        ("latency 0", {"budget": {"params": None, "latency": 0.0}}, "fail", ("latency",)),
        (
            "table keeps everything",
            {"allocation": {"method": "table", "table": {"0-2": 1.0}}},
            "fail",
            (),
        ),
        ("table keeps nothing", {"allocation": {"method": "table", "table": {"0-2": 0.0}}}, "any", ()),
        ("table key 'all'", {"allocation": {"method": "table", "table": {"all": 0.5}}}, "fail", ("table",)),
        (
            "table with method uniform",
            {"allocation": {"method": "uniform", "table": {"0-2": 0.5}}},
            "fail",
            ("table",),
        ),
        (
            "blockpruner at 0.01",
            {
                "method": "blockpruner",
                "targets": {"sublayers": True, "mlp": False},
                "budget": {"params": 0.01, "multiple_of": 4},
            },
            "fail",
            ("budget",),
        ),
        (
            "blockpruner at 0.3",
            {
                "method": "blockpruner",
                "targets": {"sublayers": True, "mlp": False},
                "budget": {"params": 0.3, "multiple_of": 4},
            },
            "ok",
            (),
        ),
        ("layers out of range", {"targets": {"mlp": True, "layers": [7]}}, "fail", ("targets.layers",)),
        ("protect every layer", {"targets": {"mlp": True, "protect": {"first": 3}}}, "fail", ("protect",)),
        ("nothing targeted", {"targets": {"mlp": False, "attention": "none"}}, "fail", ("targets",)),
        (
            "attention kv_group at 0.2",
            {"targets": {"mlp": False, "attention": "kv_group"}, "budget": {"params": 0.2, "multiple_of": 1}},
            "any",
            (),
        ),
    ]
    out = []
    for i, (label, over, expect, words) in enumerate(rows):
        name = f"b{i}"
        frac = over.get("budget", {}) or {}
        frac = frac.get("params") if isinstance(frac, dict) else None
        check = pruned_as_asked(p(f"o_{name}"), frac) if expect == "ok" and isinstance(frac, float) else None
        out.append(
            Case(
                f"budget {label}",
                "budget",
                ctx.prune(f"r_{name}.yaml", f"o_{name}", **over),
                expect=expect,
                msg=words,
                check=check,
                absent=(p(f"o_{name}"),) if expect == "fail" else (),
            )
        )
    return out


def cases(ctx: Ctx) -> list[Case]:
    return output_cases(ctx) + damaged_cases(ctx) + nonfinite_cases(ctx) + budget_cases(ctx)
