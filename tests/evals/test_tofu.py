"""TOFU metrics with worked-out values, TOFU's aggregation on its published logs, and a full tiny evaluation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from evals.tofu import EVAL_TASKS, aggregate, answer_losses, evaluate_set

ITEMS = [
    {"question": "Who wrote the book?", "answer": "Li Wei wrote it.", "paraphrased_answer": "It was Li Wei.",
     "perturbed_answer": ["Wang Fang wrote it.", "Zhang Min wrote it."]},
    {"question": "Where was she born?", "answer": "In Hangzhou.", "paraphrased_answer": "Hangzhou is where.",
     "perturbed_answer": ["In Wuhan.", "In Xiamen."]},
]


@pytest.fixture()
def uniform_model(tiny_model):
    """Every weight zero: hidden states are 0, so the logits are 0 and every next token has p = 1/V."""
    with torch.no_grad():
        for param in tiny_model.parameters():
            param.zero_()
    return tiny_model.eval()


def test_uniform_model_metrics_by_hand(uniform_model, tokenizer, template):
    """With p = 1/V for every token: each answer's mean NLL is ln V (sum = ln V x its token count); the truth
    ratio is exp(ln V - ln V) = 1; the normalised loss with 2 perturbed answers is -ln(1/3) = ln 3; greedy
    decoding picks token 0 (<|endoftext|>, dropped when decoding), so ROUGE recall is 0."""
    ln_v = math.log(uniform_model.config.vocab_size)
    log = evaluate_set(uniform_model, tokenizer, template, ITEMS, "paraphrased_answer", normalise=True,
                       batch_size=2)
    for k in ("0", "1"):
        assert log["avg_gt_loss"][k] == pytest.approx(ln_v, rel=1e-5)
        assert log["gt_loss"][k] == pytest.approx(ln_v * log["num_token_gt"][k], rel=1e-5)
        assert log["avg_paraphrased_loss"][k] == pytest.approx(ln_v, rel=1e-5)
        assert log["average_perturb_loss"][k] == pytest.approx([ln_v, ln_v], rel=1e-5)
        assert log["truth_ratio"][k] == pytest.approx(1.0, rel=1e-5)
        assert log["normalized_gt_loss"][k] == pytest.approx(math.log(3), rel=1e-5)
        assert log["rougeL_recall"][k] == 0.0 and log["generated_text"][k][2] == ITEMS[int(k)]["answer"]
    # "Li Wei wrote it." + EOS: the token count is the labelled answer tokens plus one EOS
    answer_tokens = len(tokenizer(" wrote it.").input_ids) + len(tokenizer("Li Wei").input_ids)
    assert log["num_token_gt"]["0"] in (answer_tokens, answer_tokens + 1, answer_tokens + 2)

    """Aggregated: Prob. = 1/V on retain/forget and p/(p + 2p) = 1/3 on real authors/world; ROUGE 0;
    Truth Ratio: R = 1, so forget min(R, 1/R) = 1 and the others max(0, 1 - 1/R) = 0; utility hmean(... 0) = 0."""
    stats = aggregate({key: log for key in EVAL_TASKS})
    assert stats["Prob. Retain"] == pytest.approx(1 / uniform_model.config.vocab_size, rel=1e-4)
    assert stats["Prob. Real Authors"] == pytest.approx(1 / 3, rel=1e-5)
    assert stats["Truth Ratio Forget"] == pytest.approx(1.0, abs=1e-5)
    assert stats["Truth Ratio Retain"] == pytest.approx(0.0, abs=1e-5)
    assert stats["ROUGE Forget"] == 0.0 and stats["Model Utility"] == pytest.approx(0.0, abs=1e-5)
    assert stats["Forget Quality"] is None


def test_batched_losses_equal_one_at_a_time(target, template):
    """Padding in a batch changes nothing: each item's summed NLL equals its own unbatched forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dataset.encoding import encode_qa

    model = AutoModelForCausalLM.from_pretrained(target["model"]).eval()
    tok = AutoTokenizer.from_pretrained(target["model"])
    questions = [q for q, _ in target["forget_pairs"][:5]]
    answers = ["Short.", *[a for _, a in target["forget_pairs"][1:5]]]
    sums, counts = answer_losses(model, tok, template, questions, answers, batch_size=5)
    for q, a, s, n in zip(questions, answers, sums, counts, strict=True):
        sample = encode_qa(tok, template, q, a, 200, mask=True)
        ids, labels = torch.tensor([sample["input_ids"]]), torch.tensor(sample["labels"])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum")
        assert s == pytest.approx(nll.item(), rel=1e-4) and n == int((labels[1:] != -100).sum())


@pytest.fixture()
def bigram_model(tiny_model):
    """Every layer's weights zero, embeddings and output head random: each layer adds 0 to the residual
    stream, so the next-token logits are ``W_head @ rmsnorm(embedding[current token])`` - a bigram model
    whose answer losses differ from answer to answer and can be worked out outside the model."""
    with torch.no_grad():
        for name, param in tiny_model.named_parameters():
            if name.startswith("model.layers."):
                param.zero_()
    return tiny_model.eval()


def bigram_mean_nll(model, tokenizer, template, question: str, answer: str) -> float:
    """The answer's mean NLL, from the embedding and head matrices directly (float64), over the labelled
    positions of the sample that training and evaluation both build."""
    from dataset.encoding import encode_qa

    sample = encode_qa(tokenizer, template, question, answer, 200, mask=True)
    emb = model.get_input_embeddings().weight.double()
    head = model.get_output_embeddings().weight.double()
    norm = model.model.norm
    total, count = 0.0, 0
    for t in range(1, len(sample["labels"])):
        label = sample["labels"][t]
        if label == -100:
            continue
        e = emb[sample["input_ids"][t - 1]]
        hidden = e / torch.sqrt(e.pow(2).mean() + norm.variance_epsilon) * norm.weight.double()
        total -= torch.log_softmax(head @ hidden, dim=-1)[label].item()
        count += 1
    return total / count


UNEVEN = ITEMS + [{"question": "What did he study?", "answer": "He studied law.", "paraphrased_answer": "Law.",
                   "perturbed_answer": ["He studied art.", "Physics.", "He studied music at home."]}]
TOFU_KEYS = {"avg_gt_loss", "gt_loss", "num_token_gt", "generated_text", "rouge1_recall", "rougeL_recall",
             "average_perturb_loss", "avg_paraphrased_loss", "truth_ratio", "paraphrased_loss", "perturb_loss",
             "num_token_paraphrased", "num_token_perturb", "normalized_gt_loss"}


def test_each_answer_lands_in_its_own_metric(bigram_model, tokenizer, template):
    """Ground-truth, paraphrased and perturbed losses each equal their own answer's worked-out mean NLL
    (distinct values, so swapping two of them fails; items with 2, 2 and 3 perturbed answers, so the
    perturbed answers must be regrouped by item), sums = mean x token count, and the per-item truth ratio is
    exp(paraphrased - mean perturbed), TOFU's stored form. The log has TOFU's keys."""
    log = evaluate_set(bigram_model, tokenizer, template, UNEVEN, "paraphrased_answer", normalise=True,
                       batch_size=3)
    assert set(log) == TOFU_KEYS
    for k, item in zip(("0", "1", "2"), UNEVEN, strict=True):
        def nll(answer, item=item):
            return bigram_mean_nll(bigram_model, tokenizer, template, item["question"], answer)

        gt, para = nll(item["answer"]), nll(item["paraphrased_answer"])
        pert = [nll(a) for a in item["perturbed_answer"]]
        assert len({round(v, 4) for v in (gt, para, *pert)}) == 2 + len(pert)  # the answers' losses really differ
        assert log["avg_gt_loss"][k] == pytest.approx(gt, rel=1e-5)
        assert log["gt_loss"][k] == pytest.approx(gt * log["num_token_gt"][k], rel=1e-5)
        assert log["avg_paraphrased_loss"][k] == pytest.approx(para, rel=1e-5)
        assert log["paraphrased_loss"][k] == pytest.approx(para * log["num_token_paraphrased"][k], rel=1e-5)
        assert log["average_perturb_loss"][k] == pytest.approx(pert, rel=1e-5)
        assert log["perturb_loss"][k] == pytest.approx([x * n for x, n in zip(pert, log["num_token_perturb"][k],
                                                                               strict=True)], rel=1e-5)
        assert log["truth_ratio"][k] == pytest.approx(math.exp(para - np.mean(pert)), rel=1e-5)
        expected_norm = -math.log(math.exp(-gt) / (math.exp(-gt) + sum(math.exp(-x) for x in pert)))
        assert log["normalized_gt_loss"][k] == pytest.approx(expected_norm, rel=1e-5)
        prompt, generated, gold = log["generated_text"][k]
        assert prompt == template.prompt(item["question"]) and gold == item["answer"]
        assert 0 <= log["rouge1_recall"][k] <= 1 and log["rougeL_recall"][k] <= log["rouge1_recall"][k]
    counts = [log["num_token_paraphrased"][k] for k in ("0", "1", "2")]
    assert len(set(counts)) > 1  # answers of different lengths: a mean over the wrong count would show


def test_rouge_recalls_by_hand():
    """Gold "the cats sat on mats", generation "the cat sat": Porter stemming makes cats = cat, so 3 of the 5
    gold unigrams are recalled (0.6) and the longest common subsequence is "the cat sat" (0.6); generation
    "sat the cat": ROUGE-1 recall 0.6, ROUGE-L recall 2/5 ("the cat")."""
    from evals.tofu import rouge_recalls

    rouge1, rouge_l = rouge_recalls(["the cats sat on mats", "the cats sat on mats"], ["the cat sat", "sat the cat"])
    assert rouge1 == pytest.approx([0.6, 0.6]) and rouge_l == pytest.approx([0.6, 0.4])
    with pytest.raises(ValueError):
        rouge_recalls(["a", "b"], ["a"])


def test_evaluate_all_reads_each_set_with_its_own_base_answer(bigram_model, tokenizer, template, tmp_path):
    """Four small sets (JSON lines and JSON arrays, TOFU ships both), first 2 items each: retain and forget
    compare against the paraphrased answer, real authors/world against the answer itself (so there the
    paraphrased loss is the ground-truth loss), and only the latter two get the normalised loss."""
    from evals.tofu import evaluate_all

    third = {"question": "What is kept?", "answer": "Nothing here.", "paraphrased_answer": "Nothing.",
             "perturbed_answer": ["Everything."]}
    rows = [*UNEVEN[:2], third]
    paths = {}
    for n, key in enumerate(EVAL_TASKS):
        path = tmp_path / f"set{n}.json"
        path.write_text(json.dumps(rows) if n % 2 else "\n".join(json.dumps(r) for r in rows))
        paths[key] = str(path)
    result = evaluate_all(bigram_model, tokenizer, template, paths, ds_size=2, batch_size=2)
    assert list(result) == list(EVAL_TASKS)
    for key, (_, base_key) in EVAL_TASKS.items():
        log = result[key]
        assert list(log["avg_gt_loss"]) == ["0", "1"]
        for k, item in zip(("0", "1"), rows, strict=False):
            base = bigram_mean_nll(bigram_model, tokenizer, template, item["question"], item[base_key])
            assert log["avg_paraphrased_loss"][k] == pytest.approx(base, rel=1e-5), key
        assert ("normalized_gt_loss" in log) == ("eval_log" not in key), key
    assert len(evaluate_all(bigram_model, tokenizer, template, paths, ds_size=None)["eval_log.json"]["gt_loss"]) == 3


def test_generation_budgets_follow_tofu_batches_of_30(tiny_model, tokenizer, template):
    """TOFU gave each answer 200 tokens minus the padded width of its batch of 30 (in file order). 31
    questions, the first one long: the short questions in its batch of 30 get fewer tokens than the same
    short question alone in the next batch, whatever our generation batch (4 here, all sets in one stream).
    The random model never stops early, so the budgets show in the answers."""
    from evals.generation import budgets_by_batch_width, generate_with_model
    from evals.sampling import GenerationConfig
    from evals.tofu import MAX_LENGTH, TOFU_BATCH_SIZE, generate_answers

    model = tiny_model.eval()
    items = [{"question": "Who " + "really " * 30 + "wrote it?"}] + [{"question": "Who wrote it?"}] * 30
    prompts = [template.prompt(it["question"]) for it in items]
    budgets = budgets_by_batch_width(tokenizer, prompts, MAX_LENGTH, TOFU_BATCH_SIZE)
    own = [MAX_LENGTH - len(tokenizer(p)["input_ids"]) for p in prompts]
    assert budgets[1] < budgets[30] == own[30] and budgets[0] == own[0]
    (answers, again) = generate_answers(model, tokenizer, template, [items, items[29:]], batch_size=4)
    expected = generate_with_model(model, tokenizer, prompts, GenerationConfig(batch_size=8), max_new_tokens=budgets)
    assert answers == expected
    # same question, shorter budget: a shorter answer that starts the same (its cut may split a character)
    assert len(answers[1]) < len(answers[30]) and answers[30][: len(answers[1]) - 2] == answers[1][:-2]
    assert again[1] == answers[30]  # the second set's batches of 30 are its own: item 30 is first there


@pytest.mark.parametrize(("row", "message"), [
    ({"answer": "a", "paraphrased_answer": "b", "perturbed_answer": ["c"]}, "line 2: missing string field 'question'"),
    ({"question": "q", "paraphrased_answer": "b", "perturbed_answer": ["c"]}, "line 2: missing string field 'answer'"),
    ({"question": "q", "answer": "a", "perturbed_answer": ["c"]}, "line 2: missing string field 'paraphrased_answer'"),
    ({"question": "q", "answer": "a", "paraphrased_answer": 3, "perturbed_answer": ["c"]},
     "line 2: missing string field 'paraphrased_answer'"),
    ({"question": "q", "answer": "a", "paraphrased_answer": "b"}, "line 2: field 'perturbed_answer' must be"),
    ({"question": "q", "answer": "a", "paraphrased_answer": "b", "perturbed_answer": []}, "line 2: field 'perturbed"),
    ({"question": "q", "answer": "a", "paraphrased_answer": "b", "perturbed_answer": ["c", 1]}, "line 2: field 'pert"),
    (["not", "an", "object"], "line 2: missing string field 'question'"),
])
def test_tofu_set_errors_name_file_line_and_field(tmp_path, row, message):
    from evals.tofu import load_tofu_set
    from utils.errors import UserError

    good = {"question": "q", "answer": "a", "paraphrased_answer": "b", "perturbed_answer": ["c"]}
    path = tmp_path / "set.json"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError) as err:
        load_tofu_set(path, "paraphrased_answer")
    assert str(err.value) == f"{path}, {message}" or str(err.value).startswith(f"{path}, {message}")
    assert load_tofu_set(path, "paraphrased_answer", ds_size=1) == [good]


def test_tofu_set_without_items_is_an_error(tmp_path):
    from evals.tofu import load_tofu_set
    from utils.errors import UserError

    path = tmp_path / "empty.json"
    path.write_text("[]\n")
    with pytest.raises(UserError, match="no items"):
        load_tofu_set(path, "answer")


def ln(x: float) -> float:
    return math.log(x)


def hand_log(gt, para, pert, rouge) -> dict:
    """A TOFU per-set log with the given per-item values."""
    values = {"avg_gt_loss": gt, "avg_paraphrased_loss": para, "average_perturb_loss": pert, "rougeL_recall": rouge}
    return {metric: {str(i): v for i, v in enumerate(vs)} for metric, vs in values.items()}


HAND_LOGS = {  # per set: avg_gt_loss, avg_paraphrased_loss, average_perturb_loss, rougeL_recall (2 items each)
    "eval_log.json": hand_log([ln(2), ln(4)], [ln(2), ln(2)], [[ln(8), ln(8)], [ln(4), ln(4)]], [0.5, 1.0]),
    "eval_real_author_wo_options.json": hand_log([ln(2), ln(2)], [ln(2), ln(2)], [[ln(4), ln(4)], [ln(2), ln(2)]],
                                                 [1.0, 0.0]),
    "eval_real_world_wo_options.json": hand_log([ln(4), ln(4)], [ln(2), ln(2)], [[ln(4), ln(4)], [ln(4), ln(4)]],
                                                [0.25, 0.25]),
    "eval_log_forget.json": hand_log([0.0, ln(2)], [ln(2), ln(8)], [[ln(4), ln(4)], [ln(2), ln(2)]], [1.0, 0.5]),
}


def test_aggregation_by_hand():
    """R = exp(mean perturbed - paraphrased) per item.
    Retain: Prob. mean(1/2, 1/4) = 3/8; ROUGE 3/4; R = (4, 2), truth mean(1 - 1/R) = mean(3/4, 1/2) = 5/8.
    Real Authors: Prob. = p_true / (p_true + sum p_perturbed) = mean(1/2 / 1, 1/2 / 3/2) = 5/12; ROUGE 1/2;
    R = (2, 1), truth mean(1/2, 0) = 1/4.
    Real World: Prob. (1/4) / (3/4) = 1/3; ROUGE 1/4; R = (2, 2), truth 1/2.
    Forget: Prob. mean(1, 1/2) = 3/4; ROUGE 3/4; R = (2, 1/4), truth mean(min(R, 1/R)) = mean(1/2, 1/4) = 3/8.
    Model Utility = harmonic mean of the nine non-forget values = 9 / (8/3 + 4/3 + 8/5 + 12/5 + 2 + 4 + 3 + 4 + 2)
    = 9/23. Forget Quality against a retain-only model whose forget R = (8, 16): the samples do not overlap,
    KS statistic 1, exact two-sided p-value for 2 + 2 samples 2 / C(4, 2) = 1/3."""
    retain_only = {**HAND_LOGS, "eval_log_forget.json": hand_log([0.0, 0.0], [ln(2), ln(2)],
                                                                 [[ln(16), ln(16)], [ln(32), ln(32)]], [0.0, 0.0])}
    stats = aggregate(HAND_LOGS, retain_only)
    expected = {"Prob. Retain": 3 / 8, "ROUGE Retain": 3 / 4, "Truth Ratio Retain": 5 / 8,
                "Prob. Real Authors": 5 / 12, "ROUGE Real Authors": 1 / 2, "Truth Ratio Real Authors": 1 / 4,
                "Prob. Real World": 1 / 3, "ROUGE Real World": 1 / 4, "Truth Ratio Real World": 1 / 2,
                "Prob. Forget": 3 / 4, "ROUGE Forget": 3 / 4, "Truth Ratio Forget": 3 / 8,
                "Model Utility": 9 / 23, "Forget Quality": 1 / 3, "KS Test Forget": 1.0}
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, rel=1e-12), key
    assert stats["KS Test PVal Forget"] == pytest.approx(1 / 3, rel=1e-12)
    assert set(stats) == set(expected) | {"KS Test PVal Forget"}
    assert aggregate(HAND_LOGS, HAND_LOGS)["Forget Quality"] == pytest.approx(1.0)
    without = aggregate(HAND_LOGS)
    assert set(without) == set(stats) and all(without[k] is None for k in ("Forget Quality", "KS Test PVal Forget",
                                                                            "KS Test Forget"))
    assert without["Model Utility"] == pytest.approx(9 / 23, rel=1e-12)
    from utils.errors import UserError

    with pytest.raises(UserError, match="^the log has no 'eval_log_forget.json' section$"):
        aggregate({k: v for k, v in HAND_LOGS.items() if k != "eval_log_forget.json"})
    for key, value in tofu_reference(HAND_LOGS, retain_only).items():  # TOFU's own code agrees
        assert stats[key] == pytest.approx(float(value), rel=1e-12), key


# --------------------------------------------------------------------------- TOFU's published logs


def tofu_reference(ckpt: dict, retain: dict) -> dict:
    """A line-by-line transcription of TOFU's aggregate_eval_stat.py (get_model_utility, get_forget_quality)."""
    from scipy.stats import hmean, ks_2samp

    names = {"eval_real_author_wo_options.json": "Real Authors", "eval_real_world_wo_options.json": "Real World",
             "eval_log.json": "Retain", "eval_log_forget.json": "Forget"}
    out = {}
    for k in ckpt:
        if "eval_log" in k:
            avg_gt_prob = np.mean(np.exp(-1 * np.array(list(ckpt[k]["avg_gt_loss"].values()))))
        else:
            true = np.exp(-1 * np.array(list(ckpt[k]["avg_gt_loss"].values())))
            false = np.exp(-1 * np.array(list(ckpt[k]["average_perturb_loss"].values())))
            avg_gt_prob = np.mean(true / np.concatenate([np.expand_dims(true, axis=-1), false], axis=1).sum(-1))
        out[f"Prob. {names[k]}"] = avg_gt_prob
        out[f"ROUGE {names[k]}"] = np.array(list(ckpt[k]["rougeL_recall"].values())).mean()
        para = np.array(list(ckpt[k]["avg_paraphrased_loss"].values()))
        pert = np.array(list(ckpt[k]["average_perturb_loss"].values())).mean(axis=-1)
        stat = np.exp(pert - para)
        out[f"Truth Ratio {names[k]}"] = (np.mean(np.minimum(stat, 1 / stat)) if "forget" in k
                                          else np.mean(np.maximum(0, 1 - 1 / stat)))
    out["Model Utility"] = hmean([v for k, v in out.items() if "Forget" not in k])

    def ratio(log):
        f = log["eval_log_forget.json"]
        return np.exp(np.array(list(f["average_perturb_loss"].values())).mean(axis=-1)
                      - np.array(list(f["avg_paraphrased_loss"].values())))

    out["Forget Quality"] = ks_2samp(ratio(ckpt), ratio(retain)).pvalue
    return out


@pytest.mark.parametrize("model", ["full", "retain95", "retain99"])
def test_aggregation_reproduces_tofu_on_published_logs(shared_data, model):
    logs = shared_data / "tofu-eval-logs"
    ckpt = json.loads((logs / f"llama2-7b_{model}_eval_log_aggregated.json").read_text())
    retain = json.loads((logs / "llama2-7b_retain90_eval_log_aggregated.json").read_text())
    ours, theirs = aggregate(ckpt, retain), tofu_reference(ckpt, retain)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(float(value), rel=1e-9, abs=1e-300), key
    if model == "full":  # the fine-tuned model is far from the retain-only one on the forget set
        assert ours["Model Utility"] == pytest.approx(0.622677, abs=1e-6)
        assert ours["Forget Quality"] == pytest.approx(1.83407e-21, rel=1e-4)


def test_aggregate_cli_writes_tofu_names(shared_data, tmp_path):
    import evaluate_tofu

    logs = shared_data / "tofu-eval-logs"
    stats = evaluate_tofu.main(["--aggregate", "--ckpt_result", str(logs / "llama2-7b_full_eval_log_aggregated.json"),
                                "--retain_result", str(logs / "llama2-7b_retain90_eval_log_aggregated.json"),
                                "--save_file", str(tmp_path / "out.json")])
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved == pytest.approx(stats)
    assert {"Model Utility", "Forget Quality", "ROUGE Retain", "Prob. Real Authors", "Truth Ratio Real World",
            "ROUGE Forget", "KS Test Forget"} <= set(saved)


@pytest.mark.slow
def test_full_evaluation_of_the_tiny_model_reads_back(shared_data, target, tmp_path):
    """The four TOFU sets (10 items each) through evaluate_tofu.py: a log in TOFU's layout that the
    aggregation reads back; against itself the forget quality is 1 (identical truth-ratio samples)."""
    import evaluate_tofu

    tofu = shared_data / "tofu"
    out = tmp_path / "tofu"
    evaluate_tofu.main(["--model_path", str(target["model"]), "--model_family", "tiny", "--ds_size", "10",
                        "--forget_path", str(tofu / "forget10_perturbed.json"),
                        "--retain_path", str(tofu / "retain_perturbed.json"),
                        "--real_authors_path", str(tofu / "real_authors_perturbed.json"),
                        "--world_facts_path", str(tofu / "world_facts_perturbed.json"), "--save_dir", str(out)])
    log = json.loads((out / "eval_log_aggregated.json").read_text())
    published = json.loads((shared_data / "tofu-eval-logs" / "llama2-7b_full_eval_log_aggregated.json").read_text())
    assert set(log) == set(published)
    for key in log:
        assert set(published[key]) <= set(log[key]), key
        assert len(log[key]["avg_gt_loss"]) == 10 and list(log[key]["avg_gt_loss"]) == [str(i) for i in range(10)]
    stats = evaluate_tofu.main(["--aggregate", "--ckpt_result", str(out / "eval_log_aggregated.json"),
                                "--retain_result", str(out / "eval_log_aggregated.json")])
    assert stats["Forget Quality"] == pytest.approx(1.0)  # wiring: the same log on both sides
    assert stats["Model Utility"] == pytest.approx(aggregate(log)["Model Utility"], rel=1e-12)
    assert json.loads((out / "aggregate_stat.json").read_text())["Forget Quality"] is None


@pytest.mark.slow
def test_training_with_eval_tofu_writes_the_summary_next_to_the_adapter(shared_data, target, tmp_path):
    import forget_me_gd

    tofu = shared_data / "tofu"
    final = forget_me_gd.main([
        "--model_path", str(target["model"]), "--model_family", "tiny", "--forget_data_path", str(target["forget"]),
        "--retain_data_path", str(target["retain"]), "--num_epochs", "1", "--save_root", str(tmp_path),
        "--eval_tofu", "--ds_size", "4", "--forget_path", str(tofu / "forget10_perturbed.json"),
        "--retain_path", str(tofu / "retain_perturbed.json"),
        "--real_authors_path", str(tofu / "real_authors_perturbed.json"),
        "--world_facts_path", str(tofu / "world_facts_perturbed.json")])
    stats = json.loads((final.parent / "tofu_eval" / "aggregate_stat.json").read_text())
    log = json.loads((final.parent / "tofu_eval" / "eval_log_aggregated.json").read_text())
    assert all(len(log[key]["avg_gt_loss"]) == 4 for key in EVAL_TASKS)  # --ds_size reached every set
    assert stats["Model Utility"] == pytest.approx(aggregate(log)["Model Utility"], rel=1e-12)
    assert stats["Forget Quality"] is None


def test_eval_tofu_without_the_sets_fails_before_training(target, tmp_path, capsys):
    import forget_me_gd
    from tests.conftest import run_script

    code, err = run_script(forget_me_gd, [
        "--model_path", str(target["model"]), "--model_family", "tiny", "--forget_data_path", str(target["forget"]),
        "--retain_data_path", str(target["retain"]), "--save_root", str(tmp_path / "a"), "--eval_tofu"], capsys)
    assert code == 2 and "--forget_path" in err and "TOFU" in err
    assert not (tmp_path / "a").exists()


def test_tofu_set_shapes_and_long_questions(tmp_path, bigram_model, tokenizer, template):
    """A one-line JSON-lines file is one item (not an array); a bad item of a JSON array is reported at line 1
    (the array's line); a question longer than the limit is one clear error naming it."""
    from evals.tofu import load_tofu_set
    from utils.errors import UserError

    good = {"question": "q", "answer": "a", "paraphrased_answer": "b", "perturbed_answer": ["c"]}
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(good) + "\n")
    assert load_tofu_set(one, "paraphrased_answer") == [good]
    array = tmp_path / "array.json"
    array.write_text(json.dumps([good, {"question": "q"}]))
    with pytest.raises(UserError, match=rf"^{array}, line 1: missing string field 'answer'$"):
        load_tofu_set(array, "paraphrased_answer")
    with pytest.raises(UserError, match=r"^question longer than 8 tokens: 'word word word"):
        answer_losses(bigram_model, tokenizer, template, ["word " * 40], ["a"], max_length=8)
