"""The recipe schema on its own: defaults, strictness, layer selectors, table keys, stage rules."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from secateur.recipe.errors import FieldProblems, RecipeError, RecipeIssue
from secateur.recipe.schema import STAGE_RULES, Budget, Recipe, Targets
from secateur.recipe.selectors import TableKey, parse_table_key, select_layers


def test_minimal_recipe_fills_every_default() -> None:
    r = Recipe.model_validate({"model": "smollm2-135m", "budget": {"params": 0.2}})
    assert r.version == 1 and r.name is None and r.extends is None
    assert (r.model.id, r.model.dtype, r.model.device) == ("smollm2-135m", "auto", "auto")
    c = r.calibration
    assert (c.dataset, c.split, c.n_samples, c.seqlen, c.seed, c.data_root) == (
        "wikitext2",
        "validation",
        128,
        512,
        0,
        None,
    )
    t = r.targets
    assert (t.mlp, t.attention, t.sublayers, t.blocks, t.layers) == (True, "none", False, False, ["all"])
    assert (t.protect.first, t.protect.last, t.protect.layers) == (0, 0, [])
    b = r.budget
    assert (b.params, b.flops, b.latency, b.kind) == (0.2, None, None, "params")
    assert (b.min_keep, b.max_keep, b.multiple_of, b.phase) == (0.05, 1.0, "auto", "both")
    assert r.importance.metric == "fasp" and r.importance.bonsai.samples == 64
    assert r.allocation.method == "uniform" and r.allocation.table is None
    assert r.allocation.search.trials == 100 and r.allocation.search.sampler == "tpe"  # no levels
    assert (r.restore.method, r.restore.damping) == ("least_squares", 0.01)
    assert r.method == "fasp" and r.passes == []
    assert len(r.evaluate.perplexity) == 1 and r.evaluate.perplexity[0].seqlen == 2048
    assert r.evaluate.enabled and r.evaluate.latency.repeats == 5
    assert r.output.dir is None and r.output.format == "safetensors"


def test_defaults_are_not_shared_between_recipes() -> None:
    a = Recipe.model_validate({"budget": {"params": 0.2}})
    b = Recipe.model_validate({"budget": {"params": 0.2}})
    a.targets.layers.append(3)
    assert b.targets.layers == ["all"]


def test_budget_params_fraction_or_count() -> None:
    assert Budget(params=0.3).params == 0.3
    assert Budget(params=5_000_000).params == 5_000_000
    assert isinstance(Budget(params=5_000_000).params, int)
    for bad in (1.5, 1.0, 0.0, 0, -3, True, "0.2"):
        with pytest.raises(ValidationError):
            Budget(params=bad)


def test_strict_types_reject_text_numbers() -> None:
    with pytest.raises(ValidationError):
        Recipe.model_validate({"budget": {"params": 0.2}, "calibration": {"n_samples": "128"}})
    with pytest.raises(ValidationError):
        Recipe.model_validate({"budget": {"params": 0.2}, "targets": {"mlp": 1}})


def test_unknown_keys_are_rejected_at_every_level() -> None:
    with pytest.raises(ValidationError, match="extra"):
        Recipe.model_validate({"budget": {"params": 0.2, "multipel_of": 8}})
    with pytest.raises(ValidationError, match="extra"):
        Recipe.model_validate({"budget": {"params": 0.2}, "surprise": 1})


def test_field_problems_carry_exact_paths() -> None:
    with pytest.raises(ValidationError) as info:
        Recipe.model_validate({"budget": {"params": 0.2, "min_keep": 0.5, "max_keep": 0.4}})
    err = info.value.errors()[0]
    assert err["loc"] == ("budget",)
    assert isinstance(err["ctx"]["error"], FieldProblems)
    assert err["ctx"]["error"].problems[0][0] == ("min_keep",)


@pytest.mark.parametrize(
    "selectors, expected",
    [
        (["all"], list(range(10))),
        ([0, "3-5", 9], [0, 3, 4, 5, 9]),
        (["2-2", "2"], [2]),
        ([r"re:model\.layers\.[1-3]"], [1, 2, 3]),
        ([r"re:model\.layers\.1"], [1]),  # whole-name match: 1 is not 10..19
    ],
)
def test_select_layers(selectors: list, expected: list[int]) -> None:
    assert select_layers(selectors, 10) == expected


def test_select_layers_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        select_layers(["8-12"], 10)


@pytest.mark.parametrize("bad", ["7-3", "re:((", "re:", "-2", "first", "1-", 1.5, -1, True])
def test_bad_layer_selectors(bad: object) -> None:
    with pytest.raises(ValidationError):
        Targets(layers=[bad])


def test_single_layer_selector_is_a_list() -> None:
    assert Targets(layers="3-7").layers == ["3-7"]


@pytest.mark.parametrize(
    "key, parsed",
    [
        ("12", TableKey("layers", 12, 12)),
        ("0-5", TableKey("layers", 0, 5)),
        ("0.5", TableKey("depth", 0.5, 0.5)),
        ("0.25-0.5", TableKey("depth", 0.25, 0.5)),
        ("1.0", TableKey("depth", 1.0, 1.0)),
    ],
)
def test_parse_table_key(key: str, parsed: TableKey) -> None:
    assert parse_table_key(key) == parsed


@pytest.mark.parametrize("bad", ["x", "5-2", "1.5", "0.5-0.25", "-1", "0.2-1.7"])
def test_parse_table_key_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_table_key(bad)


def test_table_accepts_yaml_number_keys() -> None:
    r = Recipe.model_validate(
        {
            "budget": {"params": 0.2},
            "allocation": {"method": "table", "table": {12: 0.5, 0.5: 0.7, "0-3": 1.0}},
        }
    )
    assert r.allocation.table == {"12": 0.5, "0.5": 0.7, "0-3": 1.0}


def test_stage_rules_apply_to_each_pass() -> None:
    passes = [
        {"name": "blocks", "targets": {"mlp": False, "blocks": True}, "share": 0.5, "method": "blockpruner"},
        {"name": "mlp", "targets": {"mlp": True}, "share": 0.5, "method": "blockpruner"},
    ]
    with pytest.raises(ValidationError) as info:
        Recipe.model_validate({"budget": {"params": 0.3}, "method": "multipruner", "passes": passes})
    problems = info.value.errors()[0]["ctx"]["error"].problems
    assert [p for p, _ in problems] == [("passes", 1, "method")]


def test_rules_table_names_its_keys() -> None:
    keys = {rule.key for rule in STAGE_RULES}
    assert keys == {
        ("method",),
        ("restore", "method"),
        ("importance", "metric"),
        ("importance", "selection"),
        ("restore", "error_correction"),
        ("restore", "refine_steps"),
    }


def test_valid_multi_stage_recipe() -> None:
    r = Recipe.model_validate(
        {
            "budget": {"params": 0.3},
            "method": "multipruner",
            "passes": [
                {
                    "name": "blocks",
                    "targets": {"mlp": False, "blocks": True},
                    "share": 0.2,
                    "method": "blockpruner",
                },
                {"name": "mlp", "targets": {"mlp": True}, "share": 0.5},
                {"name": "heads", "targets": {"mlp": False, "attention": "q_head"}, "share": 0.3},
            ],
        }
    )
    assert [s.path for s in r.stages()] == [("passes", 0), ("passes", 1), ("passes", 2)]


def test_flap_bias_compensation_is_allowed() -> None:
    r = Recipe.model_validate(
        {"budget": {"params": 0.2}, "method": "flap", "restore": {"method": "bias_compensation"}}
    )
    assert r.stages()[0].path == ()


def test_recipe_error_reads_one_issue_per_line() -> None:
    err = RecipeError(
        [
            RecipeIssue("r.yaml", 3, ("budget", "params"), "too big"),
            RecipeIssue("--set x=1", None, ("x",), "unknown key 'x'"),
        ]
    )
    assert str(err) == "r.yaml:3: budget.params: too big\n--set x=1: x: unknown key 'x'"
    assert isinstance(err, ValueError)


def test_json_schema_describes_sections() -> None:
    schema = Recipe.model_json_schema()
    assert schema["required"] == ["budget"]
    assert schema["additionalProperties"] is False
    assert {"model", "budget", "passes", "allocation"} <= set(schema["properties"])


def test_default_sampler_is_evolution_in_a_level_space() -> None:
    """The measured best sampler where it applies; TPE where evolution has no levels to move."""
    search = {"levels": 9}
    r = Recipe.model_validate(
        {"budget": {"params": 0.3}, "allocation": {"method": "search", "search": search}}
    )
    assert r.allocation.search.sampler == "evolution"
    knots = {"levels": 9, "knots": 3}
    r = Recipe.model_validate(
        {"budget": {"params": 0.3}, "allocation": {"method": "search", "search": knots}}
    )
    assert r.allocation.search.sampler == "tpe"
