"""The run's own stopping signals (issue 12) on the tiny target of test_methods: a relative early stop
(``stop_forget_prob: oracle`` / ``holdout``, measured in the run) and the collapse guard (retain
probability below ``collapse_floor`` x the target's stops training; the last state above it is saved,
labelled, or nothing)."""
import pytest
import torch

from conftest import run_cli

from robust_unlearn.config import load_recipe
from robust_unlearn.errors import TrainingCollapsed, UserError
from robust_unlearn.models import load_model, read_metadata
from robust_unlearn.unlearn import GUARD_ANSWER_SPLITS, StopLevels, answer_distinct_probe, answer_prob_probe, unlearn

# Robust_GradDiff with its retain protection off (no retain term, no Fisher exclusion, no null space)
# and a large lr: it destroys the retain answers within a few steps
COLLAPSE = ["unlearn.collapse_floor=0.8", "unlearn.per_method.Robust_GradDiff.alpha=0",
            "unlearn.per_method.Robust_GradDiff.robust_fisher_exclude=0", "unlearn.robust_nullspace=0",
            "unlearn.per_method.Robust_GradDiff.lr=0.3", "unlearn.sure_percentile=0", "unlearn.robust_topk=1.0",
            "unlearn.robust_prune_aware=0", "unlearn.robust_floor=[]", "unlearn.per_method.Robust_GradDiff.robust_floor_every=0",
            "unlearn.per_method.Robust_GradDiff.stop_forget_prob=null", "unlearn.per_method.Robust_GradDiff.steps=12",
            "unlearn.per_method.Robust_GradDiff.robust_qat=false", "unlearn.per_method.Robust_GradDiff.robust_prune_view=0"]


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models


def _cfg(t, extra):
    return load_recipe(None, t.overrides + extra)


def _retain_prob(cfg, bench, path):
    model, tok = load_model(str(path))
    return answer_prob_probe(cfg, bench, tok, "retain")(model)


def test_collapse_with_no_good_state_stops_with_one_line_and_saves_nothing(tiny, tmp_path):
    cfg = _cfg(tiny, COLLAPSE + ["unlearn.stop_every=6"])  # the first probe already sees the collapse
    with pytest.raises(TrainingCollapsed) as exc:
        unlearn(cfg, tiny.bench, tiny.target, tiny.target_key, "Robust_GradDiff", tmp_path)
    line = str(exc.value)
    assert "\n" not in line and "Robust_GradDiff: collapsed at step 6" in line and "nothing was saved" in line
    assert not any(p.name.startswith("Robust_GradDiff") for p in tmp_path.iterdir())  # not even a training state


def test_collapse_after_good_steps_saves_the_last_good_state_labelled(tiny, tmp_path, caplog):
    cfg = _cfg(tiny, COLLAPSE + ["unlearn.stop_every=1", "unlearn.per_method.Robust_GradDiff.lr=0.005",
                                 "unlearn.per_method.Robust_GradDiff.steps=30", "unlearn.collapse_answers=0"])
    with caplog.at_level("WARNING", logger="robust_unlearn"):
        ckpt = unlearn(cfg, tiny.bench, tiny.target, tiny.target_key, "Robust_GradDiff", tmp_path)
    meta = read_metadata(ckpt)
    g = meta["collapse_guard"]
    assert g["tripped_at_step"] > g["kept_step"] >= 1, g
    assert meta["state"].startswith(f"last good state (step {g['kept_step']})")
    assert [r.getMessage() for r in caplog.records if "collapsed at step" in r.getMessage()] == \
        [f"Robust_GradDiff: collapsed at step {g['tripped_at_step']}: retain probability {g['tripped_retain_prob']:.3f} "
         f"fell below the collapse floor {g['floor']:.3f} (0.8 x the target's {g['target_retain_prob']:.3f}); stopped, "
         f"saved its last good state (step {g['kept_step']}) as {ckpt}, labelled as such"]
    # what was saved is above the floor (the state of the last passing probe), not the collapsed end
    assert _retain_prob(cfg, tiny.bench, ckpt) >= g["floor"] - 1e-4
    assert g["tripped_retain_prob"] < g["floor"]


def test_looping_answers_at_a_good_retain_probability_stop_the_run_and_save_the_last_good_state(tiny, tmp_path, caplog):
    """On the tiny target, with its retain protection off and a small lr, the answers to real_authors
    questions start to loop while the retain probability stays at the target's (the TOFU seed 2 failure
    in small): the answer check trips, and what is saved is the last state whose answers passed."""
    cfg = _cfg(tiny, COLLAPSE + ["unlearn.stop_every=1", "unlearn.per_method.Robust_GradDiff.lr=0.001",
                                 "unlearn.per_method.Robust_GradDiff.steps=30"])
    with caplog.at_level("WARNING", logger="robust_unlearn"):
        ckpt = unlearn(cfg, tiny.bench, tiny.target, tiny.target_key, "Robust_GradDiff", tmp_path)
    meta = read_metadata(ckpt)
    g = meta["collapse_guard"]
    assert g["tripped_split"] in GUARD_ANSWER_SPLITS and g["tripped_at_step"] > g["kept_step"] >= 1, g
    assert g["tripped_retain_prob"] >= g["floor"]  # the retain probability alone would have gone on
    split = g["tripped_split"]
    assert g["tripped_distinct_bigrams"] < 0.8 * g["target_distinct_bigrams"][split]
    assert meta["state"].startswith(f"last good state (step {g['kept_step']})")
    lines = [r.getMessage() for r in caplog.records if "collapsed at step" in r.getMessage()]
    assert len(lines) == 1 and f"its greedy answers to {split} questions loop" in lines[0] and "labelled as such" in lines[0]
    model, tok = load_model(str(ckpt))
    shares = answer_distinct_probe(cfg, tiny.bench, tok, 8)(model)
    assert all(shares[s] >= 0.8 * v - 1e-9 for s, v in g["target_distinct_bigrams"].items()), shares


def test_unlearn_command_reports_a_collapse_in_one_line_exit_2(tiny, tmp_path):
    r = run_cli("unlearn", *tiny.overrides, *COLLAPSE, "unlearn.stop_every=6", "--methods", "Robust_GradDiff",
                "--target", tiny.target, "--out", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if "collapsed at step" in x]
    assert len(lines) == 1 and "nothing was saved" in lines[0]
    ckpts = tmp_path / "run" / "checkpoints"
    assert not ckpts.exists() or not any(p.name.startswith("Robust_GradDiff") for p in ckpts.iterdir())


def test_guard_off_by_null_and_quiet_when_utility_holds(tiny, tmp_path):
    cfg = _cfg(tiny, ["unlearn.collapse_floor=0.5", "unlearn.stop_every=2"])
    meta = read_metadata(unlearn(cfg, tiny.bench, tiny.target, tiny.target_key, "GradDiff", tmp_path))
    g = meta["collapse_guard"]
    assert "tripped_at_step" not in g and "state" not in meta and g["last_retain_prob"] >= g["floor"]
    # the answer check (collapse_answers, default 8) ran on every utility split the benchmark has
    assert set(g["target_distinct_bigrams"]) == {s for s in GUARD_ANSWER_SPLITS if s in tiny.bench}
    assert all(g["last_distinct_bigrams"][s] >= 0.5 * v for s, v in g["target_distinct_bigrams"].items())
    meta = read_metadata(unlearn(_cfg(tiny, []), tiny.bench, tiny.target, tiny.target_key, "GradDiff", tmp_path / "off"))
    assert "collapse_guard" not in meta


@pytest.mark.parametrize("level", ["oracle", "holdout"])
def test_relative_stop_level_is_measured_in_the_run(tiny, tmp_path, level):
    cfg = _cfg(tiny, [f"unlearn.per_method.GradDiff.stop_forget_prob={level}", "unlearn.stop_every=1",
                      "unlearn.per_method.GradDiff.lr=3e-3", "unlearn.epochs=40"])
    levels = StopLevels(cfg, tiny.bench, tiny.target, tiny.oracle)
    ckpt = unlearn(cfg, tiny.bench, tiny.target, tiny.target_key, "GradDiff", tmp_path, levels=levels)
    meta = read_metadata(ckpt)
    model, tok = load_model(tiny.oracle if level == "oracle" else tiny.target)
    want = answer_prob_probe(cfg, tiny.bench, tok, "forget" if level == "oracle" else "holdout")(model)
    assert meta["stop_level"] == {"name": level, "forget_prob": pytest.approx(want, abs=1e-6)}
    assert meta["spec"]["settings"]["stop_forget_prob"] == pytest.approx(want, abs=1e-6)
    hist = meta["forget_prob_history"]
    assert hist[-1][1] <= want and all(p > want for _, p in hist[:-1]), (want, hist)


def test_oracle_level_without_an_oracle_falls_back_to_holdout_or_says_what_is_missing(tiny, tmp_path):
    cfg = _cfg(tiny, ["unlearn.per_method.GradDiff.stop_forget_prob=oracle", "unlearn.steps=1"])
    meta = read_metadata(unlearn(cfg, tiny.bench, tiny.target, tiny.target_key, "GradDiff", tmp_path))
    assert meta["stop_level"]["name"] == "holdout"
    levels = StopLevels(cfg, {k: tiny.bench[k] for k in tiny.bench if k != "holdout"}, tiny.target)
    with pytest.raises(UserError, match="unlearn.per_method.GradDiff.stop_forget_prob 'oracle' needs a retain oracle"):
        levels.get("oracle", "unlearn.per_method.GradDiff.stop_forget_prob")


def test_bad_stop_level_is_one_line():
    with pytest.raises(UserError, match="must be a number in \\[0, 1\\] or one of oracle, holdout, got 'often'"):
        load_recipe(None, ["unlearn.stop_forget_prob=often"])


def test_guard_restores_exactly_the_kept_tensors():
    from robust_unlearn.unlearn import CollapseGuard

    m = torch.nn.Linear(3, 2)
    vals = iter([0.9, 0.1])
    g = CollapseGuard(lambda model: next(vals), 0.8, 1.0)
    assert g.passes(m, 4)
    kept = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        m.weight.add_(1.0)
    assert not g.passes(m, 8) and g.tripped == (8, 0.1)
    assert g.restore(m) == 4
    assert all(torch.equal(p, kept[n]) for n, p in m.named_parameters())


def test_distinct_bigram_share_by_hand():
    from robust_unlearn.scoring import distinct_bigram_share as d

    assert d("French French author French French French author") == 0.5  # 6 bigrams, 3 distinct
    assert d("It is by Victor Hugo.") == 1.0 and d("Paris") == 1.0 and d("") == 1.0
    assert d("the the the the") == pytest.approx(1 / 3)  # (the, the) three times
    assert d("A, b, a, B") == pytest.approx(4 / 6)  # case folded: (a ,) (, b) twice each


def test_guard_trips_on_looping_answers_at_a_good_retain_probability():
    """Retain probability holds (0.95 of 1.0) while real_authors' answers start to loop: the answer
    check trips, names the split, and the state of the last passing probe is what restore puts back."""
    from robust_unlearn.unlearn import CollapseGuard

    m = torch.nn.Linear(3, 2)
    shares = iter([{"retain": 0.99, "real_authors": 0.95}, {"retain": 0.97, "real_authors": 0.60}])
    g = CollapseGuard(lambda model: 0.95, 0.8, 1.0, answers=lambda model: next(shares),
                      target_answers={"retain": 1.0, "real_authors": 0.98})
    assert g.passes(m, 4)
    kept = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        m.weight.add_(1.0)
    assert not g.passes(m, 8)
    assert g.tripped == (8, 0.95) and g.tripped_answers == ("real_authors", 0.60)
    assert g.restore(m) == 4 and all(torch.equal(p, kept[n]) for n, p in m.named_parameters())
    line = g.line("Robust_GradDiff", saved="ckpt")
    assert line == ("Robust_GradDiff: collapsed at step 8: its greedy answers to real_authors questions loop "
                    "(distinct-bigram share 0.600 fell below the collapse floor 0.784, 0.8 x the target's 0.980; "
                    "retain probability 0.950); stopped, saved its last good state (step 4) as ckpt, labelled as such")
    s = g.summary()
    assert s["tripped_split"] == "real_authors" and s["tripped_distinct_bigrams"] == 0.60 and s["kept_step"] == 4
    # a retain-probability trip does not generate at all
    g2 = CollapseGuard(lambda model: 0.1, 0.8, 1.0, answers=lambda model: pytest.fail("generated"),
                       target_answers={"retain": 1.0})
    assert not g2.passes(m, 4) and g2.tripped_answers is None and "retain probability 0.100 fell" in g2.line("X", None)


def test_a_floor_that_collapses_the_model_saves_nothing(tiny, tmp_path, monkeypatch):
    """Training stays above the guard, then the end of the update (the final floor) wrecks the model:
    the guard's check after the floor refuses to save it."""
    from robust_unlearn.robust import update

    real = update.SparseUpdate.finish

    def wrecking_finish(self):
        out = real(self)
        with torch.no_grad():
            for p in self.params.values():  # every weight the update may move
                p.mul_(0.0)
        return out

    monkeypatch.setattr(update.SparseUpdate, "finish", wrecking_finish)
    cfg = _cfg(tiny, COLLAPSE + ["unlearn.stop_every=1", "unlearn.per_method.Robust_GradDiff.lr=1e-6",
                                 "unlearn.per_method.Robust_GradDiff.steps=2"])
    with pytest.raises(TrainingCollapsed, match=r"Robust_GradDiff: collapsed after the final floor \(step 2\).*nothing was saved"):
        unlearn(cfg, tiny.bench, tiny.target, tiny.target_key, "Robust_GradDiff", tmp_path)
    assert not any(p.name.startswith("Robust_GradDiff") for p in tmp_path.iterdir())



def test_stop_under_needs_the_level_under_every_named_compression():
    from robust_unlearn.unlearn import StopUnder

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8))
    w0 = m[0].weight.detach().clone()
    probe = lambda model: float(model[0].weight.abs().sum())  # noqa: E731  (pruning lowers it)
    full = probe(m)
    su = StopUnder(["prune30"], probe, "GradDiff")
    assert su.reached(m, 4, level=full)           # pruned copy: below the full-precision value
    assert not su.reached(m, 8, level=full / 10)  # not low enough under prune30
    assert [s for s, _ in su.history] == [4, 8] and set(su.history[0][1]) == {"prune30"}
    assert su.history[0][1]["prune30"] < full
    assert torch.equal(m[0].weight, w0)  # probes compress a copy, never the model being trained
    assert StopUnder([], probe, "GradDiff").reached(m, 4, level=0.0)  # nothing named: full precision decides


def test_stop_under_trains_on_past_the_full_precision_stop(tiny, tmp_path):
    base = ["unlearn.stop_every=1", "unlearn.per_method.GradDiff.lr=3e-3", "unlearn.epochs=40",
            "unlearn.per_method.GradDiff.stop_forget_prob=0.5", "unlearn.collapse_floor=null"]
    plain = read_metadata(unlearn(_cfg(tiny, base), tiny.bench, tiny.target, tiny.target_key, "GradDiff", tmp_path / "a"))
    meta = read_metadata(unlearn(_cfg(tiny, base + ["unlearn.stop_under=[prune30]"]), tiny.bench, tiny.target,
                                 tiny.target_key, "GradDiff", tmp_path / "b"))
    assert "stop_under" not in plain and "stop_under" not in plain["spec"]["settings"]  # []: the old spec keys
    su = meta["stop_under"]
    assert su["columns"] == ["prune30"] and su["history"], su
    # prune30 is probed only where full precision is at the level; every probe but a stopping last one is above it
    fp = dict(meta["forget_prob_history"])
    assert all(fp[step] <= 0.5 for step, _ in su["history"])
    assert all(got["prune30"] > 0.5 for _, got in su["history"][:-1])
    assert meta["steps"] >= plain["steps"] == su["history"][0][0]
    last_step, last = su["history"][-1]
    if last["prune30"] <= 0.5:  # reached under prune30 too: training stopped right there
        assert last_step == meta["steps"]


def test_stop_under_bad_columns_are_one_line_each():
    from robust_unlearn.config import recipe_problems

    with pytest.raises(UserError, match="unlearn.stop_under: 'relearn-retain' cannot be probed during training"):
        load_recipe(None, ["unlearn.stop_under=[relearn-retain]"])
    cfg = load_recipe(None, [])
    cfg["unlearn"]["per_method"]["Robust_GradDiff"]["stop_under"] = ["gptq4-g64", "nf9", "nf4"]
    probs = recipe_problems(cfg)
    assert [p.split(":")[0] for p in probs] == ["unlearn.per_method.Robust_GradDiff.stop_under"] * 2, probs
    assert "'gptq4-g64' cannot be probed" in probs[0] and "unknown compression 'nf9'" in probs[1]


def test_a_restored_state_that_the_final_floor_collapses_is_not_saved_nor_claimed(tiny, tmp_path, monkeypatch, caplog):
    """A run that trips the guard goes back to its last good state; when the final floor collapses that
    state too, nothing is saved and no line claims that it was."""
    from robust_unlearn.robust import update

    real = update.SparseUpdate.finish

    def wrecking_finish(self):
        out = real(self)
        with torch.no_grad():
            for p in self.params.values():
                p.mul_(0.0)
        return out

    monkeypatch.setattr(update.SparseUpdate, "finish", wrecking_finish)
    cfg = _cfg(tiny, COLLAPSE + ["unlearn.stop_every=1", "unlearn.per_method.Robust_GradDiff.lr=0.005",
                                 "unlearn.per_method.Robust_GradDiff.steps=30", "unlearn.collapse_answers=0"])
    with caplog.at_level("WARNING", logger="robust_unlearn"), pytest.raises(TrainingCollapsed) as exc:
        unlearn(cfg, tiny.bench, tiny.target, tiny.target_key, "Robust_GradDiff", tmp_path)
    line = str(exc.value)
    assert "\n" not in line and "after the final floor of its last good state (step" in line
    assert line.endswith("nothing was saved")
    assert not any("saved its last good state" in r.getMessage() for r in caplog.records)
    assert not any(p.name.startswith("Robust_GradDiff") for p in tmp_path.iterdir())


def test_backoff_puts_the_last_good_state_back_and_trains_on_at_a_smaller_lr(tiny, tmp_path, caplog):
    """``collapse_backoff``: the same run as test_collapse_after_good_steps..., which trips; with backoffs
    it trips at the same step (identical until then), puts its last good state back, and trains on at
    each listed lr factor in turn before the guard may stop it."""
    base = COLLAPSE + ["unlearn.stop_every=1", "unlearn.per_method.Robust_GradDiff.lr=0.005",
                       "unlearn.per_method.Robust_GradDiff.steps=30", "unlearn.collapse_answers=0"]
    plain = read_metadata(unlearn(_cfg(tiny, base), tiny.bench, tiny.target, tiny.target_key, "Robust_GradDiff",
                                  tmp_path / "plain"))
    assert "collapse_backoff" not in plain["spec"]["settings"]  # off: cached checkpoints keep their keys
    cfg = _cfg(tiny, base + ["unlearn.collapse_backoff=[0.5,0.25]"])
    with caplog.at_level("WARNING", logger="robust_unlearn"):
        ckpt = unlearn(cfg, tiny.bench, tiny.target, tiny.target_key, "Robust_GradDiff", tmp_path / "backoff")
    meta = read_metadata(ckpt)
    g = meta["collapse_guard"]
    assert meta["spec"]["settings"]["collapse_backoff"] == [0.5, 0.25] and g["backoff"] == [0.5, 0.25]
    first = g["backoffs"][0]
    pg = plain["collapse_guard"]
    assert (first["tripped_at_step"], first["restored_step"]) == (pg["tripped_at_step"], pg["kept_step"])
    assert first["tripped_retain_prob"] == pytest.approx(pg["tripped_retain_prob"], abs=1e-6)
    assert [b["lr_factor"] for b in g["backoffs"]] == [0.5, 0.25][:len(g["backoffs"])]
    assert all(b["restored_step"] < b["tripped_at_step"] for b in g["backoffs"])
    assert meta["steps"] > first["tripped_at_step"]  # it trained on past the first trip
    lines = [r.getMessage() for r in caplog.records if "backed off" in r.getMessage()]
    assert len(lines) == len(g["backoffs"]) and "\n" not in lines[0]
    assert lines[0] == (f"Robust_GradDiff: collapsed at step {first['tripped_at_step']}: retain probability "
                        f"{first['tripped_retain_prob']:.3f} fell below the collapse floor {g['floor']:.3f} (0.8 x the "
                        f"target's {g['target_retain_prob']:.3f}); backed off (1 of 2): put its last good state (step "
                        f"{first['restored_step']}) back and trains on at 0.5 x the lr, with fresh optimizer moments")
    from robust_unlearn.unlearn import backoff_text  # what run.json and report.md list under "Backed off"

    assert backoff_text(meta).startswith(f"tripped at step {first['tripped_at_step']} (retain probability "
                                         f"{first['tripped_retain_prob']:.3f}), step {first['restored_step']} put back, "
                                         f"on at 0.5 x the lr") and backoff_text(plain) is None
    if "tripped_at_step" in g:  # tripped again with no backoff left: the last good state, labelled, as without
        assert meta["state"].startswith(f"last good state (step {g['kept_step']})") and len(g["backoffs"]) == 2
    assert _retain_prob(cfg, tiny.bench, ckpt) >= g["floor"] - 1e-4


def test_back_off_scales_the_rest_of_the_schedule_and_clears_the_moments():
    from transformers import get_scheduler

    from robust_unlearn.train import _back_off

    def make():
        w = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([w], lr=0.1)
        return w, opt, get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=10)

    (w, opt, sched), (w2, opt2, sched2) = make(), make()
    for o, s, p in ((opt, sched, w), (opt2, sched2, w2)):
        for _ in range(3):
            p.grad = torch.ones(3)
            o.step()
            s.step()
    _back_off(opt, sched, [0.1], 0.5)
    assert not opt.state  # fresh moments
    for _ in range(4):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * opt2.param_groups[0]["lr"], rel=1e-12)
        for o, s, p in ((opt, sched, w), (opt2, sched2, w2)):
            p.grad = torch.ones(3)
            o.step()
            s.step()
    _back_off(opt, sched, [0.1], 0.25)  # a factor of the recipe's lr, not of the last backoff's
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25 * opt2.param_groups[0]["lr"], rel=1e-12)


@pytest.mark.parametrize("bad", ["[0.5,2]", "[0]", "[yes]", "0.5"])
def test_bad_backoff_is_one_line(bad):
    with pytest.raises(UserError, match=r"collapse_backoff.* must be a list") as exc:
        load_recipe(None, [f"unlearn.collapse_backoff={bad}"])
    assert "\n" not in str(exc.value) and (bad == "0.5" or "of lr factors in (0, 1]" in str(exc.value))
