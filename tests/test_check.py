"""`robust-unlearn check`: every problem of a recipe at once (exit 1), offline; every shipped recipe passes."""
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from robust_unlearn.check import check_recipe
from robust_unlearn.config import load_recipe
from robust_unlearn.errors import UserError

RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml")
                 if p.relative_to(REPO / "recipes").parts[0] not in ("accelerate", "deepspeed"))


def cli(*args, cache):
    return run_cli(*args, cache=cache, cwd=REPO)


BAD = """\
name: bad
finetune:
  lrr: 1.0e-5                # unknown key
  epochs: many               # wrong type
data:
  name: tofu                 # no data.path
unlearn:
  methods: [GradDiff, Forgetful]
  robust_topk: 2.0           # not a fraction
  per_method:
    NPO: {lrr: 1}            # unknown key inside per_method
    RMU: {rmu_params: '('}   # not a regex
sweep:
  compressions: [none, nf3]
"""


def test_check_names_every_problem_and_exits_1(tmp_path, cache_dir):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(BAD)
    res = cli("check", recipe, "eval.max_new_tokens=0", cache=cache_dir)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stdout.splitlines()
    expect = ["unknown recipe key 'finetune.lrr'", "'finetune.epochs' must be a number",
              "data.path must name a TOFU directory", "unknown method 'Forgetful'", "unlearn.robust_topk 2.0",
              "unknown recipe key 'unlearn.per_method.NPO.lrr'", "rmu_params '(' is not a valid regular expression",
              "unknown compression 'nf3'", "eval.max_new_tokens 0 must be a whole number >= 1"]
    for text in expect:
        assert sum(text in line for line in lines) == 1, (text, res.stdout)
    assert all(line.startswith(f"{recipe}: ") for line in lines)
    assert lines[-1] == f"{recipe}: {len(expect)} problems"
    # load_recipe (every other command) still stops at the first one, as one UserError
    with pytest.raises(UserError, match="^unknown recipe key 'finetune.lrr'"):
        load_recipe(recipe, ["eval.max_new_tokens=0"])


def test_unreadable_recipe_is_one_problem(tmp_path, cache_dir):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("data: [unclosed\n")
    res = cli("check", recipe, cache=cache_dir)
    assert res.returncode == 1 and "is not valid YAML" in res.stdout and res.stdout.count("\n") == 2


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_shipped_recipe_loads_and_passes_check(recipe):
    load_recipe(recipe)
    res = check_recipe(recipe)
    assert res.problems == [], res.problems


def test_clean_recipe_prints_a_summary(cache_dir):
    res = cli("check", "recipes/tofu/llama3.2-1b.yaml", cache=cache_dir)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert out.startswith("recipes/tofu/llama3.2-1b.yaml: ok")
    assert "methods:      GradDiff, SimNPO, RMU, SURE_GradDiff, Robust_GradDiff" in out
    assert "prune30" in out and "open-unlearning/tofu_Llama-3.2-1B-Instruct_full (hub id, not checked offline)" in out
    assert "note: data.path 'locuslab/TOFU' is a hub id: not checked offline" in out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from robust_unlearn.models import tiny_base

    return tiny_base(tmp_path_factory.mktemp("tiny"), ["Who wrote the book? Nobody did."] * 4)  # 2 layers


def test_local_model_rmu_layer_and_params_are_checked(tiny_dir):
    models = [f"model.target={tiny_dir}", f"model.oracle={tiny_dir}"]
    res = check_recipe(None, models)  # the default: RMU at layer 7, layers 5-7 trained
    assert any("RMU on model.target" in p and "rmu_layer 7 is out of range: the model has 2 layers" in p
               for p in res.problems), res.problems
    assert any("matches no parameter" in p for p in res.problems), res.problems
    assert "local: llama, 2 layers" in res.models["target"]
    # parameters only after the steered layer get no gradient from RMU's loss
    res = check_recipe(None, models + ["unlearn.rmu_layer=0",
                                       r"unlearn.per_method.RMU.rmu_params=model\.layers\.1\.mlp\.down_proj\.weight"])
    assert len(res.problems) == 1 and "only parameters after layer 0" in res.problems[0], res.problems
    res = check_recipe(None, models + ["unlearn.rmu_layer=1",
                                       r"unlearn.per_method.RMU.rmu_params=model\.layers\.1\.mlp\.down_proj\.weight"])
    assert res.problems == []
    # RMU not run: nothing to check against the model
    assert check_recipe(None, models + ["unlearn.methods=[GradDiff]"]).problems == []
    # SURE_RMU / Robust_RMU choose their parameters by saliency: only rmu_layer is checked
    res = check_recipe(None, models + ["unlearn.methods=[SURE_RMU,Robust_RMU]"])
    assert sorted(p.split(" on ")[0] for p in res.problems) == ["Robust_RMU", "SURE_RMU"], res.problems
    assert all("rmu_layer 7 is out of range" in p for p in res.problems), res.problems
    assert check_recipe(None, models + ["unlearn.methods=[SURE_RMU,Robust_RMU]", "unlearn.rmu_layer=1"]).problems == []


def test_gptq_awq_groups_and_floor_formats_are_checked(tiny_dir):
    """The tiny model's layers are 64 and 256 wide: group 128 does not divide the 64-wide ones; the floor
    cannot take a calibrated format."""
    models = [f"model.target={tiny_dir}", f"model.oracle={tiny_dir}", "unlearn.methods=[GradDiff]"]
    res = check_recipe(None, models + ["sweep.compressions=[none,gptq4-g64,awq4-g128]",
                                       "unlearn.robust_floor=[nf4,gptq4-g64]"])
    assert len(res.problems) == 2, res.problems
    assert any("awq4-g128: group 128 does not divide layer" in p and "input width 64" in p for p in res.problems)
    assert any("robust_floor" in p and "cannot place weights for 'gptq4-g64'" in p for p in res.problems)


def test_missing_local_paths_are_problems(tmp_path):
    res = check_recipe(None, [f"model.target={tmp_path / 'no_target'}", "model.oracle=./no_oracle",
                              "data.name=tofu", f"data.path={tmp_path / 'no_data'}"])
    assert any("model.target" in p and "no_target' not found" in p for p in res.problems), res.problems
    assert any("model.oracle './no_oracle' not found" in p for p in res.problems), res.problems
    assert any("data directory" in p and "no_data' not found" in p for p in res.problems), res.problems
    (tmp_path / "empty").mkdir()
    res = check_recipe(None, [f"model.target={tmp_path / 'empty'}"])
    assert any("has no weights" in p for p in res.problems), res.problems


def test_tofu_directory_files_are_checked(tmp_path):
    (tmp_path / "forget10.json").write_text('{"question": "q?", "answer": "a"}\n')
    res = check_recipe(None, ["data.name=tofu", f"data.path={tmp_path}", "data.forget_split=forget05"])
    assert any("split 'forget05' does not exist" in p and "found: forget10" in p for p in res.problems)
    assert any("retain95.json' not found" in p for p in res.problems), res.problems
    res = check_recipe(None, ["data.name=tofu", f"data.path={tmp_path}", "data.forget_split=forget10"])
    assert [p for p in res.problems if "retain90.json" in p]
    assert any("forget10_perturbed.json" in n and "skipped" in n for n in res.notes), res.notes


def _config_only_dir(path: Path, **kw) -> Path:
    """A checkpoint directory holding only config.json (plus empty weight / tokenizer files): check reads
    nothing else."""
    from transformers import LlamaConfig

    path.mkdir()
    LlamaConfig(vocab_size=128256, num_attention_heads=32, num_key_value_heads=8, **kw).save_pretrained(path)
    (path / "model.safetensors").write_bytes(b"")
    (path / "tokenizer_config.json").write_text("{}")
    return path


@pytest.mark.parametrize("recipe,arch", [
    ("tofu/llama3.2-1b.yaml", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   tie_word_embeddings=True)),
    ("tofu/llama3.1-8b.yaml", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   tie_word_embeddings=False)),
])
def test_tofu_recipes_fit_their_architecture(tmp_path, recipe, arch):
    """The RMU layer and parameter regex of the real-model recipes, against the Llama-3.2-1B / 3.1-8B
    layouts (built on the meta device: no memory)."""
    d = _config_only_dir(tmp_path / "m", **arch)
    res = check_recipe(REPO / "recipes" / recipe, [f"model.target={d}", f"model.oracle={d}"])
    assert res.problems == [], res.problems
    assert f"{arch['num_hidden_layers']} layers" in res.models["target"]
    # their gptq4-g128 / awq4-g128 columns' group was checked against these layer widths
    assert "gptq4-g128" in res.cfg["sweep"]["compressions"] and not any("groups of" in n for n in res.notes)
    res = check_recipe(REPO / "recipes" / recipe, [f"model.target={d}", f"model.oracle={d}",
                                                   f"unlearn.per_method.RMU.rmu_layer={arch['num_hidden_layers']}"])
    assert any("is out of range" in p for p in res.problems)
