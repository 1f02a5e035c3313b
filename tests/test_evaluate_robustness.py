"""evaluate_robustness.py on the tiny memorised target: models that hide the facts are caught, the control is not.

Two hiders: an IDK+AP adapter (trained to answer otherwise; relearning brings the facts back far faster than the
control learns them), and a model unlearned by gradient ascent with every quantised weight kept inside its NF4
bucket (Zhang et al.'s failure: it forgets in full precision, and 4-bit weights round back to the target's).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import evaluate_robustness
from tests.conftest import REFUSALS, launch_two_processes, run_script

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Target (forget + retain memorised), a retain-only control with the same tokenizer, an IDK+AP adapter."""
    import forget_idk_ap
    from utils.files import write_jsonl
    from zoo.demo_data import definition_items, pairs_of, privacy_items
    from zoo.tiny import build_target_model

    root = tmp_path_factory.mktemp("robustness")
    facts = privacy_items(32, seed=0)
    forget, holdout, retain = facts[:16], facts[16:], definition_items()[:16]
    vocabulary = pairs_of(forget + retain + holdout)
    build_target_model(root / "target", pairs_of(forget + retain), vocabulary=vocabulary)
    build_target_model(root / "control", pairs_of(retain), vocabulary=vocabulary)
    for name, items in (("forget", forget), ("retain", retain), ("holdout", holdout)):
        write_jsonl(root / f"{name}.jsonl", items)
    (root / "idk.txt").write_text("\n".join(REFUSALS) + "\n")
    adapter = forget_idk_ap.main(["--model_path", str(root / "target"), "--model_family", "tiny",
                                  "--forget_data_path", str(root / "forget.jsonl"),
                                  "--retain_data_path", str(root / "retain.jsonl"),
                                  "--idk_data_path", str(root / "idk.txt"), "--num_epochs", "4", "--bs", "4",
                                  "--lr", "2e-3", "--save_root", str(root / "runs")])
    return {"root": root, "target": root / "target", "control": root / "control", "adapter": adapter}


def sets_args(world: dict) -> list[str]:
    root = world["root"]
    return ["--model_family", "tiny", "--forget", str(root / "forget.jsonl"), "--retain", str(root / "retain.jsonl"),
            "--holdout", str(root / "holdout.jsonl"), "--control_model", str(world["control"])]


def bucket_bound_unlearning(target: Path, forget: Path, out: Path, steps: int = 40) -> Path:
    """Gradient ascent on the forget answers, every quantised (linear, not the head) weight projected after each
    step into the box that rounds to the same NF4 level as the target's (bitsandbytes' levels, blocks of 64, each
    block's absmax weight fixed so its scale stays)."""
    import bitsandbytes.functional as bnb_f
    import torch

    from dataset.encoding import encode_qa
    from dataset.reading import load_qa_jsonl
    from utils.chat_template import load_chat_template
    from utils.loading import load_model, load_tokenizer

    model, tokenizer = load_model(target, dtype="float32"), load_tokenizer(target)
    levels = bnb_f.get_4bit_type("nf4", device="cpu").float()

    def box(weight: torch.Tensor, share: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = weight.flatten().view(-1, 64)
        absmax = blocks.abs().amax(1, keepdim=True)
        x = blocks / absmax
        idx = (x.unsqueeze(-1) - levels).abs().argmin(-1)
        level = levels[idx]
        lo = torch.where(idx > 0, level + share * (levels[(idx - 1).clamp(min=0)] - level) / 2, level)
        hi = torch.where(idx < 15, level + share * (levels[(idx + 1).clamp(max=15)] - level) / 2, level)
        fixed = blocks.abs() == absmax
        lo, hi = torch.where(fixed, x, lo), torch.where(fixed, x, hi)
        return (lo * absmax).view_as(weight), (hi * absmax).view_as(weight)

    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    boxes = [box(m.weight.detach()) for m in linears]
    for p in model.parameters():
        p.requires_grad_(False)
    for m in linears:
        m.weight.requires_grad_(True)
    template = load_chat_template("tiny")
    samples = [encode_qa(tokenizer, template, it.question, it.answer, 256) for it in load_qa_jsonl(forget)]
    optimizer = torch.optim.Adam([m.weight for m in linears], lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = -sum(model(input_ids=torch.tensor([s["input_ids"]]), labels=torch.tensor([s["labels"]])).loss
                    for s in samples) / len(samples)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for m, (lo, hi) in zip(linears, boxes, strict=True):
                m.weight.copy_(torch.maximum(torch.minimum(m.weight, hi), lo))
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_relearning_and_probes_catch_a_model_trained_to_answer_otherwise(world, tmp_path):
    out = tmp_path / "out"
    report = evaluate_robustness.main(["--model_path", str(world["target"]), "--adapter", str(world["adapter"]),
                                       *sets_args(world), "--attacks", "relearn,rtt,probe", "--relearn_lr", "1e-3",
                                       "--relearn_curve", "2,4,8", "--rtt_folds", "4", "--relearn_epochs", "2",
                                       "--out", str(out)])
    head = "forget_rouge_f"
    base, relearn = report["baseline"], report["attacks"]["relearn"]
    assert base["model"][head] < 0.6 and base["original"][head] > 0.95  # it forgot (part of) the facts
    assert relearn["model"][head] > 0.9 and relearn["control"][head] < 0.2  # back in 8 steps; the control: no
    assert relearn["R"][head] < 0.2 and relearn["steps"] == 8
    assert len(relearn["curve"]["model"]) == 3 and relearn["curve"]["steps"] == [2, 4, 8]
    rtt = report["attacks"]["rtt"]
    assert sorted(i for part in rtt["folds"] for i in part) == list(range(16))  # disjoint, covering
    assert rtt["model"][head] > 0.9 and rtt["control"][head] < 0.2 and rtt["recovery"][head] > 0.9
    probe = report["attacks"]["probe"]
    assert probe["model"]["leak_rate"] > probe["control"]["leak_rate"] + 0.3
    assert min(report["results"]["control"]["minutes"].values()) >= 0  # the control really ran each attack
    written = json.loads((out / "robustness.json").read_text())
    assert written["attacks"]["relearn"]["verdict"] == relearn["verdict"]
    assert "R = " in relearn["verdict"] and "the control" in relearn["verdict"]
    assert (out / "robustness.md").read_text().startswith("| metric |")
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*"))  # no temporary left


def test_four_bits_bring_back_what_a_bucket_bound_unlearning_hid(world, tmp_path):
    hider = bucket_bound_unlearning(world["target"], world["root"] / "forget.jsonl", tmp_path / "hider")
    report = evaluate_robustness.main(["--model_path", str(hider), *sets_args(world),
                                       "--original_model", str(world["target"]), "--attacks", "quant8,quant4",
                                       "--out", str(tmp_path / "out")])
    head = "forget_rouge_f"
    base, q8, q4 = report["baseline"], report["attacks"]["quant8"], report["attacks"]["quant4"]
    assert base["model"][head] < 0.1  # forgotten in full precision
    assert q8["model"][head] < 0.1 and q8["Q"][head] > 0.9  # 8 bits stay close to full precision
    assert q4["model"][head] > 0.9 and q4["Q"][head] < 0.1  # 4 bits: the target's weights again
    assert q4["control"][head] < 0.1 and q4["Q_control"][head] > 0.5  # the control knows no more after 4 bits
    assert q4["type"] == "nf4" and q4["logit_change"]["model"] > 0 and q4["logit_change"]["control"] > 0


def test_a_model_that_never_saw_the_facts_stays_low_under_every_attack(world, tmp_path):
    first = tmp_path / "first"
    report = evaluate_robustness.main(["--model_path", str(world["control"]), *sets_args(world),
                                       "--relearn_lr", "1e-3", "--relearn_steps", "8", "--rtt_folds", "4",
                                       "--out", str(first)])
    head = "forget_rouge_f"
    for attack, entry in report["attacks"].items():
        if attack == "probe":
            assert entry["model"]["leak_rate"] == entry["control"]["leak_rate"] < 0.2
            continue
        assert entry["model"][head] < 0.2, attack
        score = entry.get("R", entry.get("Q"))
        assert score[head] == 1.0, attack  # the same model under the same attack: nothing beyond learning
    # a second model against the same control reuses its results; another setting refuses them
    again = evaluate_robustness.main(["--model_path", str(world["control"]), *sets_args(world), "--relearn_lr",
                                      "1e-3", "--relearn_steps", "8", "--rtt_folds", "4", "--out",
                                      str(tmp_path / "again"), "--reuse_control", str(first / "robustness.json")])
    assert again["results"]["control"] == report["results"]["control"]


def test_two_processes_give_the_one_process_report(world, tmp_path):
    """Under accelerate launch (2 gloo processes) the evaluations split by batch and relearning is one DDP run
    with the same global batch: the report equals the one-process report (relearned weights to float
    rounding)."""
    import math

    common = ["--model_path", str(world["target"]), "--adapter", str(world["adapter"]), *sets_args(world),
              "--attacks", "relearn,quant8,probe", "--relearn_lr", "1e-3", "--relearn_steps", "4",
              "--batch_size", "3"]
    one = evaluate_robustness.main([*common, "--out", str(tmp_path / "one")])
    proc = launch_two_processes("evaluate_robustness.py", [*common, "--out", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "robustness.json").read_text())
    one = json.loads(json.dumps(one))  # the file's types (tuples as lists)
    assert two["attacks"]["relearn"]["steps"] == one["attacks"]["relearn"]["steps"] == 4
    assert one["attacks"]["relearn"]["model"]["forget_rouge_f"] > one["baseline"]["model"]["forget_rouge_f"] + 0.2
    for part in ("baseline", "attacks"):
        flat_one, flat_two = flatten(one[part]), flatten(two[part])
        assert flat_one.keys() == flat_two.keys()
        for key, value in flat_one.items():
            if ".minutes." in key:
                continue
            if isinstance(value, float) and not math.isnan(value):
                assert flat_two[key] == pytest.approx(value, abs=2e-3), key
            elif not key.endswith("verdict"):
                assert flat_two[key] == value, key
    assert not list((tmp_path / "two").glob(".*"))  # no temporary left


def flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def test_bad_inputs_are_one_line_before_any_model_loads(world, tmp_path, capsys):
    code, err = run_script(evaluate_robustness, ["--model_path", str(world["target"]), *sets_args(world),
                                                 "--attacks", "relearn,jailbreak", "--out", str(tmp_path / "o")],
                           capsys)
    assert code == 2 and "--attacks relearn,jailbreak: unknown jailbreak" in err and "Traceback" not in err
    code, err = run_script(evaluate_robustness, ["--model_path", str(world["target"]), *sets_args(world),
                                                 "--rtt_folds", "40", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--rtt_folds must be in [2, 16]" in err
    args = ["--model_path", str(world["target"]), *sets_args(world), "--out", str(tmp_path / "o")]
    args[args.index("--control_model") + 1] = str(tmp_path / "nowhere")
    code, err = run_script(evaluate_robustness, args, capsys)
    assert code == 2 and "--control_model" in err
    assert not (tmp_path / "o").exists()
