"""TOFU metrics against hand-computed values on a model whose logits are fixed by construction."""
import math

import numpy as np
import pytest
import torch
from conftest import bigram_prob as P

from robust_unlearn.data.collate import QAFormatter
from robust_unlearn.metrics.tofu import Evaluator, forget_quality, truth_ratio_aggregate, UTILITY_METRICS


def nll(*probs):
    return -sum(math.log(p) for p in probs) / len(probs)


@pytest.fixture()
def ev(fixed_model):
    model, tok = fixed_model
    return Evaluator(QAFormatter(tok, prompt="qa"), batch_size=2, max_new_tokens=5)


def test_model_is_the_bigram_table(fixed_model):
    model, tok = fixed_model
    ids = tok("Answer: a", add_special_tokens=False, return_tensors="pt")["input_ids"]
    probs = torch.softmax(model(ids).logits[0, 0].double(), -1)
    assert probs[tok.convert_tokens_to_ids("a")].item() == pytest.approx(0.5, abs=1e-6)
    assert probs[tok.convert_tokens_to_ids("b")].item() == pytest.approx(0.25, abs=1e-6)


def test_answer_probability_is_exp_of_mean_token_nll(fixed_model, ev):
    model, _ = fixed_model
    # "a b" then </s>: P(a|Answer:) P(b|a) P(</s>|b) = 0.5, 0.6, 0.7 -> exp(-mean NLL) = geometric mean
    got = ev.mean_nll(model, [("q1", "a b"), ("q2", "c")])
    assert got[0] == pytest.approx(nll(0.5, 0.6, 0.7), abs=1e-5)
    assert got[1] == pytest.approx(nll(0.125, 0.4), abs=1e-5)
    assert math.exp(-got[0]) == pytest.approx((0.5 * 0.6 * 0.7) ** (1 / 3), abs=1e-5)


def test_split_metrics_by_hand(fixed_model, ev):
    model, _ = fixed_model
    rows = [
        {"question": "q1", "answer": "a b", "paraphrased_answer": "a c", "perturbed_answer": ["b", "c d", "a"]},
        {"question": "q2", "answer": "c", "paraphrased_answer": "a b", "perturbed_answer": ["a c", "d", "b"]},
    ]
    st = ev.split_stats(model, rows, "forget")
    p_ans = [math.exp(-nll(0.5, 0.6, 0.7)), math.exp(-nll(0.125, 0.4))]
    np.testing.assert_allclose(st.prob, p_ans, atol=1e-6)
    # truth ratio: geometric mean of the wrong answers' p / p(paraphrase)
    para = [nll(0.5, 0.2, 0.4), nll(0.5, 0.6, 0.7)]
    pert = [[nll(0.25, 0.7), nll(0.125, 0.4, 0.9), nll(0.5, P("a", "</s>"))],
            [nll(0.5, 0.2, 0.4), nll(P("Answer:", "d"), 0.9), nll(0.25, 0.7)]]
    tr = [math.exp(-np.mean(pert[i])) / math.exp(-para[i]) for i in range(2)]
    np.testing.assert_allclose(st.truth_ratio, tr, rtol=1e-5)
    # greedy generation from "Answer:" is a -> b -> </s> for both questions
    assert st.generations == ["a b", "a b"]
    # ROUGE-L recall against "a b" = 1, against "c" = 0
    np.testing.assert_allclose(st.rouge, [1.0, 0.0])
    metrics, _ = ev.evaluate(model, {"forget": rows})
    assert metrics["forget_Q_A_Prob"] == pytest.approx(np.mean(p_ans), abs=1e-6)
    assert metrics["forget_truth_ratio"] == pytest.approx(np.mean([min(t, 1 / t) for t in tr]), rel=1e-5)
    assert metrics["forget_Q_A_ROUGE"] == pytest.approx(0.5)
    assert metrics["forget_Q_A_distinct_bigrams"] == 1.0  # "a b": one bigram, distinct


def test_distinct_bigrams_metric_sees_looping_answers(fixed_model, ev):
    """{split}_Q_A_distinct_bigrams: the mean over a split's greedy answers of their distinct-bigram
    share; a looping answer lowers it while ROUGE recall can stay at 1."""
    model, _ = fixed_model
    rows = [{"question": "q1", "answer": "a b", "paraphrased_answer": None, "perturbed_answer": []},
            {"question": "q2", "answer": "French", "paraphrased_answer": None, "perturbed_answer": []}]
    # bigrams of "french french french author": (french, french) x2, (french, author): 2 distinct of 3
    st = ev.split_stats(model, rows, "retain", generations=["a b", "French French French author"])
    np.testing.assert_allclose(st.distinct_bigrams, [1.0, 2 / 3])
    np.testing.assert_allclose(st.rouge, [1.0, 1.0])


def test_utility_split_normalised_probability_and_truth_ratio(fixed_model, ev):
    model, _ = fixed_model
    rows = [{"question": "q1", "answer": "a b", "paraphrased_answer": None, "perturbed_answer": ["c", "d", "b"]}]
    st = ev.split_stats(model, rows, "real_authors", with_rouge=False)
    correct = math.exp(-nll(0.5, 0.6, 0.7))
    wrong = [math.exp(-nll(0.125, 0.4)), math.exp(-nll(P("Answer:", "d"), 0.9)), math.exp(-nll(0.25, 0.7))]
    assert st.normalised[0] == pytest.approx(correct / (correct + sum(wrong)), rel=1e-5)
    # no paraphrase: the answer itself is the correct side of the truth ratio
    tr = math.exp(-np.mean([-math.log(w) for w in wrong])) / correct
    assert st.truth_ratio[0] == pytest.approx(tr, rel=1e-5)
    assert truth_ratio_aggregate(np.array([0.25, 2.0]), "retain") == pytest.approx((0.75 + 0.0) / 2)
    assert truth_ratio_aggregate(np.array([0.25, 2.0]), "forget") == pytest.approx((0.25 + 0.5) / 2)


def test_forget_quality_is_the_ks_p_value():
    x = np.array([1.0, 2.0, 3.0])
    assert forget_quality(x, x) == pytest.approx(1.0)
    # fully separated samples of 3 and 3: D = 1, exact p = 2 / C(6, 3) = 0.1
    assert forget_quality(np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0])) == pytest.approx(0.1)


def test_model_utility_is_the_harmonic_mean_of_nine(fixed_model, ev):
    model, _ = fixed_model
    qa = [{"question": "q1", "answer": "a b", "paraphrased_answer": "a b", "perturbed_answer": ["c", "d", "b"]}]
    short = [{"question": "q2", "answer": "c", "paraphrased_answer": None, "perturbed_answer": ["a b", "d", "b"]}]
    metrics, _ = ev.evaluate(model, {"retain": qa, "real_authors": short, "world_facts": qa})
    # retain: p = geometric mean of 0.5, 0.6, 0.7; ROUGE = 1; truth ratio with paraphrase == answer
    p = (0.5 * 0.6 * 0.7) ** (1 / 3)
    wrong = [math.exp(-nll(0.125, 0.4)), math.exp(-nll(P("Answer:", "d"), 0.9)), math.exp(-nll(0.25, 0.7))]
    assert metrics["retain_Q_A_Prob"] == pytest.approx(p, rel=1e-5)
    assert metrics["retain_Q_A_ROUGE"] == 1.0
    tr = math.exp(np.mean([math.log(w) for w in wrong])) / p
    assert metrics["retain_Truth_Ratio"] == pytest.approx(max(0.0, 1 - tr), rel=1e-5)
    assert metrics["ra_Q_A_ROUGE"] == 0.0  # greedy "a b" vs reference "c"
    nine = [metrics[m] for m in UTILITY_METRICS]
    assert min(nine) == 0.0 and metrics["model_utility"] == 0.0  # a zero among the nine -> hmean 0
    metrics2, _ = ev.evaluate(model, {"retain": qa, "real_authors": qa, "world_facts": qa})
    nine = [metrics2[m] for m in UTILITY_METRICS]
    assert metrics2["model_utility"] == pytest.approx(len(nine) / sum(1 / v for v in nine), rel=1e-9)
    assert "forget_quality" not in metrics2


def test_shared_prompt_scoring_equals_full_sequences(tmp_path):
    """mean_nll runs each question's prompt once for all its answers: same NLLs as full sequences."""
    from robust_unlearn.data.collate import collate_qa
    from robust_unlearn.models import load_model, tiny_base
    from robust_unlearn.scoring import answer_nll

    texts = ["Who wrote the book about rivers?", "It was written by Ana Lopez in 1999.", "What is blue?", "The sky."]
    model, tok = load_model(str(tiny_base(tmp_path, texts * 20)))
    for prompt in ("qa", "chat"):
        if prompt == "chat":
            tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")
        fmt = QAFormatter(tok, prompt=prompt, system_prompt="Be brief.")
        pairs = [("Who wrote the book about rivers?", "It was written by Ana Lopez in 1999."),
                 ("What is blue?", "The sky."), ("Who wrote the book about rivers?", "Nobody."),
                 ("What is blue?", "The sky, in the book about rivers written in 1999."), ("Hi?", "Hi.")]
        got = Evaluator(fmt, batch_size=3).mean_nll(model, pairs)
        batch = collate_qa([fmt.encode(q, a) for q, a in pairs], fmt.pad_id)
        total, count = answer_nll(model, batch)
        assert got == pytest.approx((total / count).detach().numpy(), abs=1e-4)


def test_one_pass_generation_equals_model_generate(tmp_path):
    """qa_pass's greedy answers (shared prompt prefix, decoding from the scoring cache, and answers that
    teacher forcing shows decoding would produce) equal transformers' greedy generate."""
    from robust_unlearn.data.collate import collate_prompts
    from robust_unlearn.models import load_model, tiny_base
    from robust_unlearn.scoring import qa_pass

    texts = ["Who wrote the book about rivers?", "It was written by Ana Lopez in 1999.", "What is blue?", "The sky."]
    model, tok = load_model(str(tiny_base(tmp_path, texts * 20)))
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    fmt = QAFormatter(tok, prompt="chat", system_prompt="Be brief and answer the question.")
    qs = ["Who wrote the book about rivers?", "What is blue?", "Hi?", "Is the sky blue in 1999?"]
    batch = collate_prompts([fmt.prompt_ids(q) for q in qs], fmt.pad_id)
    gen = model.generate(**batch, do_sample=False, max_new_tokens=6, eos_token_id=fmt.stop_token_ids,
                         pad_token_id=fmt.pad_id, temperature=None, top_p=None, top_k=None)
    want = [tok.decode(g, skip_special_tokens=True).strip() for g in gen[:, batch["input_ids"].shape[1]:]]
    import robust_unlearn.scoring as scoring

    decoded = []
    real = scoring.greedy_from_cache

    def counting(model, cache, mask, *a):
        decoded.append(mask.shape[0])
        return real(model, cache, mask, *a)

    scoring.greedy_from_cache = counting
    try:
        for pairs in ([], [(q, "The sky.") for q in qs], [(q, w) for q, w in zip(qs, want)]):  # decoded / forced
            decoded.clear()
            _, text = qa_pass(model, fmt, pairs, qs, batch_size=3, max_new_tokens=6)
            assert [text[q] for q in qs] == want
        assert sum(decoded) < len(qs)  # the last time, teacher forcing found (some of) them undecoded
    finally:
        scoring.greedy_from_cache = real


def test_forget_gibberish_is_the_classifiers_mean_clean_probability(fixed_model, ev, gibberish_dir):
    """open-unlearning's forget_Q_A_gibberish: mean softmax P(class 0) over the greedy forget answers, each
    truncated to 32 classifier tokens; here against each text scored alone (no batching, no padding)."""
    from robust_unlearn.metrics.classifier import classifier_prob
    from robust_unlearn.models import load_classifier

    clf, ctok = load_classifier(str(gibberish_dir), "eval.gibberish_classifier")

    def alone(text):
        ids = ctok(text, return_tensors="pt")["input_ids"][:, :32]
        with torch.no_grad():
            return torch.softmax(clf(input_ids=ids).logits.float(), -1)[0, 0].item()

    texts = ["a b", "French " * 40, "the novel", "c d a"]  # the second is cut at 32 tokens
    assert len(ctok(texts[1])["input_ids"]) > 32
    got = classifier_prob(texts, clf, ctok, batch_size=3)
    np.testing.assert_allclose(got, [alone(t) for t in texts], atol=1e-5)
    model, _ = fixed_model
    rows = [{"question": q, "answer": "a b", "paraphrased_answer": None, "perturbed_answer": []} for q in ("q1", "q2")]
    metrics, _ = ev.evaluate(model, {"forget": rows})
    assert "forget_Q_A_gibberish" not in metrics  # off unless a classifier is given
    ev.gibberish = (clf, ctok)
    metrics, per = ev.evaluate(model, {"forget": rows, "retain": rows})
    assert per["forget"].generations == ["a b", "a b"]
    assert metrics["forget_Q_A_gibberish"] == pytest.approx(alone("a b"), abs=1e-5)
    assert "retain_Q_A_gibberish" not in metrics  # forget answers only, as open-unlearning


def test_the_recipe_key_gives_the_suite_evaluator_its_classifier(fixed_model, gibberish_dir):
    from robust_unlearn.config import load_recipe
    from robust_unlearn.metrics.tofu import TofuSuite

    _, tok = fixed_model
    assert TofuSuite(load_recipe(None, [])).evaluator(tok).gibberish is None
    ev = TofuSuite(load_recipe(None, [f"eval.gibberish_classifier={gibberish_dir}"])).evaluator(tok)
    clf, ctok = ev.gibberish
    assert clf.config.num_labels == 2 and not clf.training


def test_gibberish_classifier_bad_input_is_one_line(tmp_path):
    from robust_unlearn.check import check_recipe
    from robust_unlearn.errors import UserError
    from robust_unlearn.models import load_classifier

    with pytest.raises(UserError, match=r"^eval.gibberish_classifier '.*': could not load a sequence classifier"):
        load_classifier(str(tmp_path), "eval.gibberish_classifier")
    res = check_recipe(None, [f"eval.gibberish_classifier={tmp_path}"])
    assert any("eval.gibberish_classifier" in p and "no config.json" in p for p in res.problems), res.problems
    res = check_recipe(None, ["eval.gibberish_classifier=madhurjindal/autonlp-Gibberish-Detector-492513457"])
    assert not any("gibberish" in p for p in res.problems)
    assert any("gibberish_classifier" in n and "not checked offline" in n for n in res.notes)


def test_the_classifier_key_at_its_default_keeps_the_evaluation_ids_made_before_it():
    """eval.gibberish_classifier null leaves eval_id as it was without the key (cached evaluations and
    resumed sweeps stay valid); a classifier is part of the id."""
    import copy

    from robust_unlearn.config import load_recipe
    from robust_unlearn.ids import eval_id

    cfg = load_recipe(None, [])
    bench = {"forget": [{"question": "q", "answer": "a"}]}
    before = copy.deepcopy(cfg)
    del before["eval"]["gibberish_classifier"]
    assert eval_id(cfg, bench) == eval_id(before, bench)
    assert eval_id(load_recipe(None, ["eval.gibberish_classifier=some/classifier"]), bench) != eval_id(cfg, bench)


def test_an_empty_answer_scores_the_same_alone_and_in_a_batch(gibberish_dir):
    """A tokenizer with no special tokens gives an empty answer no tokens: it is scored as its BOS token,
    alone (where the classifier had nothing to read) and beside other answers (where it read padding)."""
    from robust_unlearn.metrics.classifier import classifier_prob, empty_text_token
    from robust_unlearn.models import load_classifier

    clf, ctok = load_classifier(str(gibberish_dir), "eval.gibberish_classifier")
    assert ctok("")["input_ids"] == []
    assert empty_text_token(ctok) == ctok.bos_token_id
    with torch.no_grad():
        bos = torch.softmax(clf(input_ids=torch.tensor([[ctok.bos_token_id]])).logits.float(), -1)[0, 0].item()
    alone = classifier_prob([""], clf, ctok)
    batched = classifier_prob(["a b", "", "c d a"], clf, ctok)
    np.testing.assert_allclose([alone[0], batched[1]], [bos, bos], atol=1e-5)
    np.testing.assert_allclose(batched[[0, 2]], classifier_prob(["a b", "c d a"], clf, ctok), atol=1e-5)


def test_a_tokenizer_with_nothing_to_score_an_empty_answer_as_is_one_line():
    from robust_unlearn.errors import UserError
    from robust_unlearn.metrics.classifier import empty_text_token

    class Bare:
        bos_token_id = eos_token_id = pad_token_id = unk_token_id = None

    with pytest.raises(UserError, match=r"^eval.gibberish_classifier: its tokenizer gives an empty text no tokens"):
        empty_text_token(Bare())
