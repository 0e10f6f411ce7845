import pytest
import yaml

from robust_unlearn.config import DEFAULT_RECIPE, DEFAULTS, load_recipe, parse_overrides
from robust_unlearn.errors import UserError


def test_default_recipe_spells_out_the_defaults():
    assert yaml.safe_load(DEFAULT_RECIPE.read_text()) == DEFAULTS
    assert load_recipe(None) == DEFAULTS


def test_overrides_are_typed():
    cfg = load_recipe(None, ["finetune.lr=1e-5", "data.name=tofu", "data.path=/x", "eval.rouge=false",
                             "data.limit=5"])
    assert cfg["finetune"]["lr"] == 1e-5 and cfg["eval"]["rouge"] is False and cfg["data"]["limit"] == 5
    assert parse_overrides(["a.b.c=3"]) == {"a": {"b": {"c": 3}}}


@pytest.mark.parametrize("over,msg", [
    (["finetune.lrr=1"], "unknown recipe key 'finetune.lrr'"),
    (["finetune.epochs=many"], "must be a number"),
    (["finetune.precision=fp8"], "finetune.precision"),
    (["nokey"], "dotted.key=value"),
    (["unlearn.min_steps=-1"], "unlearn.min_steps -1 must be a whole number >= 0"),
    (["unlearn.per_method.Robust_GradDiff.min_steps=2.5"], "min_steps 2.5 must be a whole number >= 0"),
])
def test_bad_recipe_values(over, msg):
    with pytest.raises(UserError, match=msg):
        load_recipe(None, over)
