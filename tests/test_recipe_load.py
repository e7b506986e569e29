"""Loading recipes: safe YAML, file:line errors, extends, --set overrides, round trips."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from secateur.recipe.errors import RecipeError
from secateur.recipe.load import (
    dump_recipe,
    load_recipe,
    recipe_from_dict,
    recipe_json_schema,
    resolve_recipe_path,
    resolved_dict,
    validate_file,
)
from secateur.recipe.schema import Recipe


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


FULL = """
version: 1
name: fasp-30-searched
model: {id: smollm2-135m, dtype: bfloat16}
calibration: {dataset: data/calib.jsonl, n_samples: 64, seqlen: 256, seed: 3}
targets:
  attention: kv_group
  layers: [0, "2-5", "re:model\\\\.layers\\\\.1[0-9]"]
  protect: {first: 1, last: 2, layers: [7]}
budget: {params: 0.3, min_keep: 0.1, max_keep: 0.95, multiple_of: 64}
importance: {metric: wanda}
allocation:
  method: table
  table: {0-5: 0.8, 12: 0.9, 0.5: 0.75, "0.75-1.0": 0.6}
restore: {method: least_squares, damping: 0.05}
method: multipruner
passes:
  - {name: blocks, targets: {mlp: false, blocks: true}, share: 0.25, method: blockpruner}
  - {name: mlp, targets: {mlp: true}, share: 0.75}
evaluate:
  perplexity: [{dataset: wikitext2, max_windows: 8}]
  tasks: [piqa, arc_easy]
  limit: 100
  latency: {prefill_len: 128}
output: {dir: out/fasp30}
"""


# ---- round trip and defaults -------------------------------------------------------------------


def test_minimal_recipe(tmp_path: Path) -> None:
    r = load_recipe(write(tmp_path, "r.yaml", "model: smollm2-135m\nbudget: {params: 0.2}\n"))
    assert r == Recipe.model_validate({"budget": {"params": 0.2}})
    assert r.model.id == "smollm2-135m" and r.budget.params == 0.2


def test_round_trip(tmp_path: Path) -> None:
    first = load_recipe(write(tmp_path, "full.yaml", FULL))
    assert first.allocation.table == {"0-5": 0.8, "12": 0.9, "0.5": 0.75, "0.75-1.0": 0.6}
    assert first.targets.layers == [0, "2-5", r"re:model\.layers\.1[0-9]"]
    text = dump_recipe(first)
    again = load_recipe(write(tmp_path, "dumped.yaml", text))
    assert again == first
    assert dump_recipe(again) == text  # stable
    assert "extends" not in resolved_dict(first)
    assert recipe_from_dict(resolved_dict(first)) == first


def test_dump_follows_schema_order(tmp_path: Path) -> None:
    text = dump_recipe(load_recipe(write(tmp_path, "r.yaml", "budget: {flops: 0.25}\nmodel: m\n")))
    keys = [line.split(":")[0] for line in text.splitlines() if line and not line[0].isspace()]
    assert keys[:4] == ["version", "name", "model", "calibration"]
    assert keys.index("budget") < keys.index("passes") < keys.index("output")


def test_json_schema() -> None:
    schema = recipe_json_schema()
    assert schema["properties"]["budget"]["$ref"].endswith("Budget")


# ---- extends -------------------------------------------------------------------------------------


def test_extends_two_levels(tmp_path: Path) -> None:
    write(
        tmp_path,
        "base.yaml",
        "model: {id: base-model, dtype: float32}\nbudget: {params: 0.2, multiple_of: 64}\n",
    )
    write(
        tmp_path, "team/mid.yaml", "extends: ../base.yaml\nbudget: {params: 0.3}\nevaluate: {tasks: [piqa]}\n"
    )
    top = write(tmp_path, "team/top.yaml", "extends: mid.yaml\nmodel: other\nevaluate: {tasks: [arc_easy]}\n")
    r = load_recipe(top, root=tmp_path)
    assert r.model.id == "other" and r.model.dtype == "float32"  # shorthand merges per key
    assert r.budget.params == 0.3 and r.budget.multiple_of == 64  # mappings merge
    assert r.evaluate.tasks == ["arc_easy"]  # lists replace
    assert r.extends is None


def test_extends_list_in_order(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "budget: {params: 0.2}\ntargets: {attention: q_head}\n")
    write(tmp_path, "b.yaml", "budget: {params: 0.4, min_keep: 0.2}\n")
    top = write(tmp_path, "top.yaml", "extends: [a.yaml, b.yaml]\nbudget: {multiple_of: 16}\n")
    r = load_recipe(top)
    assert (r.budget.params, r.budget.min_keep, r.budget.multiple_of) == (0.4, 0.2, 16)
    assert r.targets.attention == "q_head"


def test_extends_errors_point_at_the_base_file(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", "budget:\n  params: 0.2\n  multipel_of: 8\n")
    top = write(tmp_path, "top.yaml", "extends: base.yaml\nname: x\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(top)
    assert str(
        info.value
    ) == "base.yaml:3: budget.multipel_of: unknown key 'multipel_of'; did you mean 'multiple_of'?".replace(
        "base.yaml", str(tmp_path / "base.yaml")
    )


def test_overridden_base_value_reports_the_overriding_line(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", "budget: {params: 0.2}\n")
    top = write(tmp_path, "top.yaml", "extends: base.yaml\n\nbudget:\n  params: 1.5\n")
    issues = validate_file(top)
    assert [(i.file, i.line, i.key) for i in issues] == [(str(top), 4, "budget.params")]


def test_extends_cycle(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "extends: b.yaml\nbudget: {params: 0.2}\n")
    write(tmp_path, "b.yaml", "extends: c.yaml\n")
    write(tmp_path, "c.yaml", "name: c\nextends: a.yaml\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "a.yaml")
    msg = str(info.value)
    assert "c.yaml:2: extends: extends cycle: a.yaml -> b.yaml -> c.yaml -> a.yaml" in msg


def test_extends_self(tmp_path: Path) -> None:
    top = write(tmp_path, "a.yaml", "budget: {params: 0.2}\nextends: [a.yaml]\n")
    with pytest.raises(RecipeError, match=r"a.yaml:2: extends.0: extends cycle: a.yaml -> a.yaml"):
        load_recipe(top)


@pytest.mark.parametrize("ref", ["../../etc/passwd", "/etc/passwd", "../outside.yaml"])
def test_extends_escape_rejected(tmp_path: Path, ref: str) -> None:
    write(tmp_path, "outside.yaml", "budget: {params: 0.2}\n")
    top = write(tmp_path, "recipes/top.yaml", f"budget: {{params: 0.2}}\nextends: {ref}\n")
    with pytest.raises(RecipeError, match=r"top.yaml:2: extends: base recipe .* outside the recipes root"):
        load_recipe(top)


def test_extends_escape_through_symlink_rejected(tmp_path: Path) -> None:
    write(tmp_path, "outside.yaml", "budget: {params: 0.2}\n")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "link.yaml").symlink_to(tmp_path / "outside.yaml")
    top = write(tmp_path, "recipes/top.yaml", "extends: link.yaml\n")
    with pytest.raises(RecipeError, match="outside the recipes root"):
        load_recipe(top)


def test_extends_missing_base(tmp_path: Path) -> None:
    top = write(tmp_path, "top.yaml", "budget: {params: 0.2}\nextends: [nope.yaml]\n")
    with pytest.raises(RecipeError, match=r"top.yaml:2: extends.0: base recipe 'nope.yaml' not found"):
        load_recipe(top)


# ---- --set overrides -------------------------------------------------------------------------------


def test_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", FULL)
    r = load_recipe(
        path,
        [
            "budget.params=0.35",
            "evaluate.enabled=false",
            "targets.layers=[1, 2]",
            "model.dtype=float16",
            "allocation.table.20=0.5",
            "passes.1.share=0.75",
            "calibration.n_samples=32",
        ],
    )
    assert r.budget.params == 0.35 and isinstance(r.budget.params, float)
    assert r.evaluate.enabled is False
    assert r.targets.layers == [1, 2]
    assert r.model.dtype == "float16" and r.model.id == "smollm2-135m"
    assert r.allocation.table["20"] == 0.5
    assert r.calibration.n_samples == 32


def test_override_on_model_shorthand_and_new_section(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "model: tiny\nbudget: {params: 0.2}\n")
    r = load_recipe(path, ["model.device=cpu", "restore.damping=0.1"])
    assert (r.model.id, r.model.device, r.restore.damping) == ("tiny", "cpu", 0.1)


def test_override_switches_budget_kind(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "budget: {params: 0.2}\n")
    r = load_recipe(path, ["budget.params=null", "budget.flops=0.3"])
    assert r.budget.kind == "flops"


@pytest.mark.parametrize(
    "arg, key, fragment",
    [
        ("budget.multipel_of=64", "budget.multipel_of", "did you mean 'multiple_of'?"),
        ("budjet.params=0.3", "budjet", "did you mean 'budget'?"),
        ("budget.params=1.5", "budget.params", "must be in (0, 1)"),
        ("budget.params", "(recipe)", "expected KEY.PATH=VALUE"),
        ("budget.params.x=1", "budget.params.x", "single value"),
        ("passes.x.share=1", "passes.x", "list index"),
        ("passes.3.share=1", "passes.3", "past the end"),
        ("extends=base.yaml", "extends", "cannot be overridden"),
        ("name=!!python/object/apply:os.system [echo]", "name", "not valid YAML"),
        ("targets.attention=heads", "targets.attention", "is not one of"),
    ],
)
def test_bad_overrides(tmp_path: Path, arg: str, key: str, fragment: str) -> None:
    path = write(tmp_path, "r.yaml", "budget: {params: 0.2}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path, [arg])
    msg = str(info.value)
    assert msg.startswith(f"--set {arg}: {key}: "), msg
    assert fragment in msg


# ---- malformed recipes: exact key path and line ----------------------------------------------------

# one case per line: id, recipe text, key path, line, message fragment
# fmt: off
MALFORMED = [
    ("misspelt key", "budget:\n  params: 0.2\n  multipel_of: 8\n", "budget.multipel_of", 3, "did you mean 'multiple_of'?"),
    ("misspelt section", "model: m\nbudjet: {params: 0.2}\n", "budjet", 2, "did you mean 'budget'?"),
    ("params 1.5", "budget:\n  params: 1.5\n", "budget.params", 2, "must be in (0, 1)"),
    ("params zero count", "budget:\n  params: 0\n", "budget.params", 2, ">= 1"),
    ("params text", "budget:\n  params: 5e6\n", "budget.params", 2, "exponent"),
    ("negative n_samples", "budget: {params: 0.2}\ncalibration:\n  n_samples: -3\n", "calibration.n_samples", 3, "greater than 0"),
    ("n_samples as text", "budget: {params: 0.2}\ncalibration:\n  n_samples: '128'\n", "calibration.n_samples", 3, "valid integer"),
    ("two budget kinds", "model: m\nbudget:\n  params: 0.2\n  flops: 0.3\n", "budget", 2, "got params and flops"),
    ("no budget kind", "model: m\nbudget:\n  min_keep: 0.1\n", "budget", 2, "set exactly one of"),
    ("no budget", "model: m\nname: x\n", "budget", 1, "required key is missing"),
    ("flops 1.0", "budget:\n  flops: 1.0\n", "budget.flops", 2, "less than 1"),
    ("min above max", "budget:\n  params: 0.2\n  min_keep: 0.6\n  max_keep: 0.5\n", "budget.min_keep", 3, "must not exceed"),
    ("multiple_of zero", "budget:\n  params: 0.2\n  multiple_of: 0\n", "budget.multiple_of", 3, "greater than 0"),
    ("unknown attention", "budget: {params: 0.2}\ntargets:\n  attention: kv_groups\n", "targets.attention", 3, "did you mean 'kv_group'?"),
    ("bad regex", "budget: {params: 0.2}\ntargets:\n  layers:\n    - 1\n    - 're:(('\n", "targets.layers.1", 5, "invalid regex"),
    ("reversed range", "budget: {params: 0.2}\ntargets:\n  layers: ['7-3']\n", "targets.layers.0", 3, "7 > 3"),
    ("negative layer", "budget: {params: 0.2}\ntargets:\n  layers:\n    - -2\n", "targets.layers.0", 4, ">= 0"),
    ("bool layer", "budget: {params: 0.2}\ntargets:\n  layers: [true]\n", "targets.layers.0", 3, "layer selector"),
    ("negative protect", "budget: {params: 0.2}\ntargets:\n  protect:\n    first: -1\n", "targets.protect.first", 4, "greater than or equal to 0"),
    ("nothing to prune", "budget: {params: 0.2}\ntargets:\n  mlp: false\n", "targets", 2, "nothing to prune"),
    ("bad dtype", "model:\n  id: m\n  dtype: fp8\n", "model.dtype", 3, "is not one of"),
    ("model number", "budget: {params: 0.2}\nmodel: 5\n", "model", 2, "valid dictionary"),
    ("version 2", "version: 2\nbudget: {params: 0.2}\n", "version", 1, "unsupported recipe version 2"),
    (
        "shares",
        "budget: {params: 0.2}\npasses:\n  - {name: a, targets: {mlp: true}, share: 0.5}\n  - {name: b, targets: {mlp: true}, share: 0.3}\n",
        "passes",
        2,
        "0.5 + 0.3 = 0.8",
    ),
    ("pass missing share", "budget: {params: 0.2}\npasses:\n  - name: a\n    targets: {mlp: true}\n", "passes.0.share", 3, "required key is missing"),
    ("pass misspelt key", "budget: {params: 0.2}\npasses:\n  - name: a\n    targets: {}\n    shar: 1.0\n", "passes.0.shar", 5, "did you mean 'share'?"),
    ("pass method", "budget: {params: 0.2}\npasses:\n  - {name: a, targets: {}, share: 1.0, method: multipruner}\n", "passes.0.method", 3, "is not one of"),
    (
        "duplicate pass names",
        "budget: {params: 0.2}\npasses:\n  - {name: a, targets: {}, share: 0.5}\n  - name: a\n    targets: {}\n    share: 0.5\n",
        "passes.1.name",
        4,
        "duplicate pass name 'a'",
    ),
    ("table missing", "budget: {params: 0.2}\nallocation:\n  method: table\n", "allocation.table", 2, "needs allocation.table"),
    ("table unused", "budget: {params: 0.2}\nallocation:\n  table: {3: 0.5}\n", "allocation.table", 3, "only used by method 'table'"),
    ("table bad key", "budget: {params: 0.2}\nallocation:\n  method: table\n  table:\n    x: 0.5\n", "allocation.table.x", 5, "not a layer index"),
    ("table value", "budget: {params: 0.2}\nallocation:\n  method: table\n  table:\n    3: 1.5\n", "allocation.table.3", 5, "less than or equal to 1"),
    ("table overlap", "budget: {params: 0.2}\nallocation:\n  method: table\n  table:\n    0-5: 0.5\n    3: 0.6\n", "allocation.table.3", 6, "overlaps table key '0-5'"),
    ("table below min_keep", "budget: {params: 0.2}\nallocation:\n  method: table\n  table:\n    0.5: 0.01\n", "allocation.table.0.5", 5, "outside budget.min_keep"),
    ("search unused", "budget: {params: 0.2}\nallocation:\n  search:\n    trials: 10\n", "allocation.search", 3, "no effect"),
    ("blockpruner structure", "budget: {params: 0.2}\nmethod: blockpruner\n", "method", 2, "set one of them to true"),
    ("sprint in a pass", "budget: {params: 0.2}\npasses:\n  - name: a\n    targets: {}\n    share: 1.0\n    method: sprint\n", "passes.0.method", 6, "method 'sprint'"),
    ("bias compensation", "budget: {params: 0.2}\nrestore:\n  method: bias_compensation\n", "restore.method", 3, "needs method 'flap'"),
    ("bonsai metric", "budget: {params: 0.2}\nimportance:\n  metric: bonsai\n", "importance.metric", 3, "only works with method 'bonsai'"),
    ("bonsai options unused", "budget: {params: 0.2}\nimportance:\n  bonsai: {samples: 8}\n", "importance.bonsai", 3, "no effect"),
    ("multipruner no passes", "budget: {params: 0.2}\nmethod: multipruner\n", "method", 2, "list its stages under passes"),
    ("damping zero", "budget: {params: 0.2}\nrestore:\n  damping: 0\n", "restore.damping", 3, "greater than 0"),
    ("limit zero", "budget: {params: 0.2}\nevaluate:\n  limit: 0\n", "evaluate.limit", 3, "greater than 0"),
    ("ppl seqlen", "budget: {params: 0.2}\nevaluate:\n  perplexity:\n    - seqlen: long\n", "evaluate.perplexity.0.seqlen", 4, "valid integer"),
    ("output format", "budget: {params: 0.2}\noutput:\n  format: gguf\n", "output.format", 3, "is not one of"),
    ("extends type", "budget: {params: 0.2}\nextends: {a: 1}\n", "extends", 2, "a path or a list of paths"),
    ("python tag", 'budget:\n  params: !!python/object/apply:os.system ["echo hi"]\n', "budget.params", 2, "'!!python/object/apply:os.system' is not allowed"),
    ("python tag on a key", "budget: {params: 0.2}\n? !!python/name:os.system\n: 1\n", "(recipe)", 2, "is not allowed"),
    ("binary tag", "budget: {params: 0.2}\nname: !!binary aGk=\n", "name", 2, "'!!binary' is not allowed"),
    ("duplicate key", "budget: {params: 0.2}\nname: a\nname: b\n", "name", 3, "duplicate key (first at line 2)"),
    ("list top level", "- budget\n- model\n", "(recipe)", 1, "must be a mapping"),
    ("scalar top level", "\n\nhello\n", "(recipe)", 3, "must be a mapping"),
    ("empty file", "", "(recipe)", 1, "empty"),
    ("invalid yaml", "budget: {params: 0.2\nname: x\n", "(recipe)", 2, "invalid YAML"),
    ("recursive alias", "budget: {params: 0.2}\nname: &a [*a]\n", "(recipe)", 1, "recursive"),
]
# fmt: on


@pytest.mark.parametrize(
    "text, key, line, fragment", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_recipe(tmp_path: Path, text: str, key: str, line: int, fragment: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert f"{path}:{line}: {key}: " in msg, msg
    assert fragment in msg, msg


def test_python_tag_is_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write(
        tmp_path,
        "r.yaml",
        f'budget: {{params: 0.2}}\nname: !!python/object/apply:os.system ["touch {marker}"]\n',
    )
    with pytest.raises(RecipeError, match="not allowed"):
        load_recipe(path)
    assert not marker.exists()


def test_alias_bomb_is_refused(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = write(tmp_path, "r.yaml", "\n".join(lines) + "\nbudget: {params: 0.2}\n")
    with pytest.raises(RecipeError, match="YAML nodes once aliases are expanded"):
        load_recipe(path)


def test_yaml_merge_keys_are_plain_data(tmp_path: Path) -> None:
    text = "x-base: &b {params: 0.2, multiple_of: 16}\nbudget:\n  <<: *b\n  params: 0.3\n"
    with pytest.raises(RecipeError, match="x-base: unknown key"):
        load_recipe(write(tmp_path, "r.yaml", text))
    r = load_recipe(
        write(tmp_path, "s.yaml", "budget:\n  <<: {params: 0.2, multiple_of: 16}\n  params: 0.3\n")
    )
    assert (r.budget.params, r.budget.multiple_of) == (0.3, 16)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_validate_file_collects_every_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "r.yaml",
        """
        model: {id: m, dtype: fp8}
        budget:
          params: 0.2
          multipel_of: 8
        calibration:
          n_samples: -3
        """,
    )
    issues = validate_file(path)
    assert [(i.line, i.key) for i in issues] == [
        (1, "model.dtype"),
        (4, "budget.multipel_of"),
        (6, "calibration.n_samples"),
    ]
    assert all(i.file == str(path) for i in issues)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert len(str(info.value).splitlines()) == 3


def test_validate_file_valid_recipe(tmp_path: Path) -> None:
    assert validate_file(write(tmp_path, "r.yaml", FULL)) == []


def test_recipe_from_dict_reports_key_paths() -> None:
    with pytest.raises(RecipeError, match=r"^lock: budget.params: "):
        recipe_from_dict({"budget": {"params": 2.5}}, source="lock")


# ---- paths inside recipes --------------------------------------------------------------------------


def test_resolve_recipe_path(tmp_path: Path) -> None:
    recipe = write(tmp_path, "recipes/r.yaml", "budget: {params: 0.2}\n")
    write(tmp_path, "recipes/data/calib.jsonl", "{}\n")
    write(tmp_path, "shared/wiki.valid.raw", "text\n")
    assert (
        resolve_recipe_path(recipe, "data/calib.jsonl") == (tmp_path / "recipes/data/calib.jsonl").resolve()
    )
    with pytest.raises(ValueError, match="outside the recipe's folder"):
        resolve_recipe_path(recipe, "../shared/wiki.valid.raw")
    with pytest.raises(ValueError, match="outside"):
        resolve_recipe_path(recipe, "/etc/passwd")
    shared = tmp_path / "shared"
    assert (
        resolve_recipe_path(recipe, "wiki.valid.raw", data_root=shared)
        == (shared / "wiki.valid.raw").resolve()
    )
    assert resolve_recipe_path(recipe, str(shared / "wiki.valid.raw"), data_root=shared).is_file()
    with pytest.raises(ValueError, match="data root"):
        resolve_recipe_path(recipe, "../../etc/passwd", data_root=shared)
