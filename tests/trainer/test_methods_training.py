"""The new methods through the training path on the tiny memorised model: each forgets while the retain set
stays; RMU's hook and layers; PDU's dual weight; full fine-tuning; random retain sampling; the reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import forget_me_gd
from dataset.data_module import ForgetRetainCollator, ForgetRetainDataset
from dataset.reading import QAItem
from tests.conftest import REFUSALS, base_args
from trainer import recipe


def answer_nll(model_dir: Path, run_final: Path | None, pairs) -> float:
    """Mean answer-token NLL (question masked) of ``pairs`` under the target model (+ adapter or full model)."""
    from evals.tofu import answer_losses
    from utils.chat_template import load_chat_template
    from utils.loading import load_for_eval

    lora = run_final is not None and (run_final / "adapter_config.json").is_file()
    model, tokenizer = load_for_eval(model_dir, run_final) if lora else load_for_eval(run_final or model_dir)
    sums, counts = answer_losses(model, tokenizer, load_chat_template("tiny"), [q for q, _ in pairs],
                                 [a for _, a in pairs])
    return sum(sums) / sum(counts)


@pytest.fixture(scope="module")
def before(target) -> tuple[float, float]:
    return answer_nll(target["model"], None, target["forget_pairs"]), answer_nll(target["model"], None,
                                                                                 target["retain_pairs"])


# Measured with this budget (10 epochs, bs 4, lr 5e-3, --mask true; bench/bench_methods.py): forget NLL
# 0.005 -> SimNPO 3.1, UNDIAL 2.2, WGA 11.5, CE-U 13.7, PDU 9.4, RMU 4.6, SatImp 0.024 (its weight
# p^5 (1 - p) vanishes on memorised tokens, p ~ 0.995); retain NLL 0.006 -> at most 0.07.
@pytest.mark.parametrize(("loss_type", "forget_floor"), [
    ("SimNPO+GD", 1.0), ("UNDIAL+GD", 1.0), ("WGA+GD", 1.0), ("SatImp+GD", 0.015), ("CE-U+GD", 1.0), ("PDU", 1.0),
    ("RMU", 1.0),
])
def test_each_method_forgets_and_keeps_the_retain_set(target, before, tmp_path, loss_type, forget_floor):
    forget0, retain0 = before
    final = forget_me_gd.main(base_args(target, tmp_path, "--loss_type", loss_type, "--num_epochs", "10", "--bs", "4",
                                        "--lr", "5e-3", "--mask", "true", "--rmu_layer", "1"))
    forget, retain = answer_nll(target["model"], final, target["forget_pairs"]), answer_nll(
        target["model"], final, target["retain_pairs"])
    print(f"{loss_type}: forget NLL {forget0:.3f} -> {forget:.3f}; retain NLL {retain0:.3f} -> {retain:.3f}")
    assert forget0 < 0.01 and forget > forget_floor
    assert retain < retain0 + 0.25


def test_seed_options_run_with_a_new_method(target, tmp_path):
    """The seed's command line with --loss_type SimNPO+GD (the other options unchanged)."""
    final = forget_me_gd.main(base_args(
        target, tmp_path, "--num_epochs", "1", "--bs", "1", "--max_length", "400", "--loss_type", "SimNPO+GD",
        "--mask", "false", "--lr", "3e-5", "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.05",
        "--forget_coeff", "1.0", "--regularization_coeff", "1.0"))
    assert (final / "adapter_model.safetensors").is_file()
    assert json.loads((final.parent / "run_args.json").read_text())["simnpo_beta"] == 4.5


# --------------------------------------------------------------------------- RMU


def rmu_trainer(target, tmp_path, *extra: str):
    from trainer.unlearn_trainer import UnlearnTrainer

    args = recipe.build_parser("me_gd", "").parse_args(base_args(target, tmp_path, "--loss_type", "RMU", *extra))
    template = recipe.load_chat_template("tiny")
    tokenizer = recipe.load_tokenizer(args, template)
    dataset = recipe.build_dataset(args, tokenizer, template)
    model = recipe.build_model(args, template, False)
    trainer = UnlearnTrainer(model=model, args=recipe.build_training_args(args, tmp_path / "run", False),
                             train_dataset=dataset)
    batch = ForgetRetainCollator(tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    return trainer, model, batch


def test_rmu_reads_the_chosen_layer_and_trains_only_up_to_it(target, tmp_path):
    """--rmu_layer 0 on the 2-layer model: LoRA on layer 0 only; the hooked hidden states are layer 0's output
    (hidden_states[1] of a plain forward); the forget term is RMU's distance to c*u with |c*u| = 6.5."""
    trainer, model, batch = rmu_trainer(target, tmp_path, "--rmu_layer", "0")
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all(".layers.0." in n for n in lora)
    model.eval()  # no LoRA dropout: the two forwards must agree
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    forget = batch["forget"]
    with torch.no_grad():
        expected = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"],
                         output_hidden_states=True).hidden_states[1]
    assert torch.allclose(outputs["forget"].hidden, expected, atol=1e-6)
    assert outputs["forget"].logits.size(1) == 1  # the output head ran on one position only
    steering = trainer.params.steering
    assert steering.norm().item() == pytest.approx(6.5, rel=1e-5)
    mask = (forget["labels"] != -100).float()
    per_row = ((expected - steering) ** 2).mean(-1).mul(mask).sum(-1) / mask.sum(-1)
    # LoRA B = 0: the retain term compares the model with itself (0), so the loss is the forget term alone, weighted
    # by the script's --forget_coeff (0.9 for forget_me_gd.py), which the config carries to the trainer
    assert torch.equal(outputs["retain"].ref_hidden, outputs["retain"].hidden)
    assert trainer.forget_coeff == 0.9
    assert loss.item() == pytest.approx(0.9 * per_row.mean().item(), rel=1e-5)


def test_rmu_reference_stays_while_the_model_moves(target, tmp_path):
    """RMU's retain term compares layer-l states with the reference's: exactly 0 at the first step (LoRA B = 0,
    the model is its own reference), then positive once the adapter moved and the reference did not."""
    final = forget_me_gd.main(base_args(target, tmp_path, "--loss_type", "RMU", "--rmu_layer", "1", "--num_epochs",
                                        "3", "--bs", "8", "--lr", "5e-3"))
    rows = [r for r in (json.loads(line) for line in (final.parent / "train_log.jsonl").read_text().splitlines())
            if "retain_loss" in r]
    assert rows[0]["retain_loss"] == 0.0
    assert rows[-1]["retain_loss"] > 1e-4 and rows[-1]["forget_loss"] < rows[0]["forget_loss"]


def test_rmu_layer_out_of_range_is_a_clear_error(target, tmp_path, capsys):
    from tests.conftest import run_script

    code, err = run_script(forget_me_gd, base_args(target, tmp_path, "--loss_type", "RMU"), capsys)
    assert code == 2 and "--rmu_layer 7: the model has 2 decoder layers" in err


# --------------------------------------------------------------------------- PDU


def test_pdu_dual_weight_rises_while_the_retain_loss_breaks_its_bound_and_resumes(target, tmp_path):
    """With a bound of 0 every retain loss exceeds it: the weight grows by step * loss each step (logged
    before the update), and a checkpoint keeps it for --resume_from_checkpoint."""
    args = base_args(target, tmp_path, "--loss_type", "PDU", "--num_epochs", "2", "--bs", "8", "--lr", "5e-3",
                     "--pdu_epsilon", "0", "--pdu_dual_step_size", "2", "--save_steps", "1")
    final = forget_me_gd.main(args)
    rows = [json.loads(line) for line in (final.parent / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "retain_weight" in r]
    assert len(steps) == 4 and steps[0]["retain_weight"] == 1.0
    for prev, cur in zip(steps, steps[1:], strict=False):
        assert cur["retain_weight"] == pytest.approx(prev["retain_weight"] + 2 * prev["retain_loss"], rel=1e-4)
        assert cur["loss"] == pytest.approx(0.9 * cur["forget_loss"] + cur["retain_weight"] * cur["retain_loss"],
                                            rel=1e-4)
    state = json.loads((final.parent / "checkpoint-epoch-1" / "dual_state.json").read_text())
    assert state["epsilon"] == 0 and state["weight"] == pytest.approx(steps[2]["retain_weight"], rel=1e-6)


def test_pdu_default_bound_is_the_first_retain_loss(target, tmp_path):
    final = forget_me_gd.main(base_args(target, tmp_path, "--loss_type", "PDU", "--num_epochs", "1", "--bs", "4"))
    rows = [r for r in (json.loads(line) for line in (final.parent / "train_log.jsonl").read_text().splitlines())
            if "retain_weight" in r]
    # step 1 sets epsilon to its own retain loss: the update is 0, the second step still weighs 1
    assert rows[1]["retain_weight"] == pytest.approx(1.0, abs=1e-9)
    assert rows[2]["retain_weight"] == pytest.approx(max(0.0, 1.0 + rows[1]["retain_loss"] - rows[0]["retain_loss"]),
                                                     rel=1e-4)


# --------------------------------------------------------------------------- full fine-tuning


def test_full_fine_tuning_trains_every_weight_against_a_frozen_reference(target, tmp_path):
    """--lora_r 0 with NPO+GD: the first NPO loss is its no-change value 20 ln 2 (the frozen copy equals the
    model), later ones fall below it (the copy stayed); the whole model is saved in final_model and reloads."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    final = forget_me_gd.main(base_args(target, tmp_path, "--loss_type", "NPO+GD", "--lora_r", "0", "--num_epochs",
                                        "3", "--bs", "16", "--lr", "1e-3"))
    assert final.name == "final_model" and (final / "model.safetensors").is_file()
    assert (final / "tokenizer_config.json").is_file()
    rows = [r for r in (json.loads(line) for line in (final.parent / "train_log.jsonl").read_text().splitlines())
            if "forget_loss" in r]
    assert rows[0]["forget_loss"] == pytest.approx(20 * math.log(2), rel=1e-4)
    assert rows[-1]["forget_loss"] < 20 * math.log(2) - 0.5
    trained = load_file(final / "model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(target["model"]).state_dict()
    changed = [k for k, v in trained.items() if not torch.equal(v, base[k])]
    assert any("layers.0" in k for k in changed) and any("layers.1" in k for k in changed)
    assert AutoModelForCausalLM.from_pretrained(final) is not None


def test_full_fine_tuning_rmu_trains_only_its_layers(target, tmp_path):
    args = recipe.build_parser("me_gd", "").parse_args(base_args(target, tmp_path, "--loss_type", "RMU",
                                                                 "--lora_r", "0", "--rmu_layer", "0"))
    model = recipe.build_model(args, recipe.load_chat_template("tiny"), False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.0." in n for n in trainable)


# --------------------------------------------------------------------------- the reference


def test_reference_forward_is_dropout_free(target, tmp_path):
    """A model whose config has dropout 0.1, in train mode: two reference forwards on the same batch are
    bitwise equal (and the model is back in train mode after them); two training forwards differ."""
    from trainer.unlearn_trainer import UnlearnTrainer

    args = recipe.build_parser("me_gd", "").parse_args(base_args(target, tmp_path, "--loss_type", "NPO",
                                                                 "--model_path", str(target["model"])))
    template = recipe.load_chat_template("tiny")
    tokenizer = recipe.load_tokenizer(args, template)
    dataset = recipe.build_dataset(args, tokenizer, template)
    peft_model = recipe.build_model(args, template, False)
    for module in peft_model.modules():  # Qwen2 has no hidden dropout: add one where the MLP output lands
        if module.__class__.__name__ == "Qwen2MLP":
            module.down_proj = torch.nn.Sequential(module.down_proj, torch.nn.Dropout(0.1))
        if module.__class__.__name__ == "Qwen2Attention":
            module.attention_dropout = 0.1
    trainer = UnlearnTrainer(model=peft_model, args=recipe.build_training_args(args, tmp_path / "run", False),
                             train_dataset=dataset)
    part = ForgetRetainCollator(tokenizer.pad_token_id)([dataset[i] for i in range(4)])["forget"]
    peft_model.train()
    first, _ = trainer._reference(peft_model, part, None, False)
    second, _ = trainer._reference(peft_model, part, None, False)
    assert torch.equal(first, second) and peft_model.training
    a, _ = trainer._run(peft_model, part, None, None)
    b, _ = trainer._run(peft_model, part, None, None)
    assert not torch.equal(a, b)  # the dropout is real: training forwards differ


# --------------------------------------------------------------------------- retain sampling


def qa(n: int, prefix: str) -> list[QAItem]:
    return [QAItem(f"{prefix} question {i}?", f"{prefix} answer {i}.") for i in range(n)]


@pytest.fixture(scope="module")
def sampling_dataset(tokenizer, template):
    def make(mode: str, seed: int = 5, n_forget: int = 6, n_retain: int = 24, idk=None) -> ForgetRetainDataset:
        return ForgetRetainDataset(qa(n_forget, "forget"), qa(n_retain, "retain"), tokenizer, template, 64,
                                   idk_lines=idk, retain_sampling=mode, seed=seed)
    return make


def retain_ids(dataset: ForgetRetainDataset, indices) -> list[tuple[int, ...]]:
    return [tuple(dataset[i]["retain"]["input_ids"]) for i in indices]


def test_fixed_sampling_is_the_original_pairing_in_every_epoch(sampling_dataset):
    fixed = sampling_dataset("fixed")
    first = retain_ids(fixed, range(6))
    fixed.set_epoch(3)
    assert retain_ids(fixed, range(6)) == first
    assert len(set(first)) <= 6


def test_random_sampling_draws_afresh_each_epoch_and_reaches_every_retain_item(sampling_dataset):
    """6 forget items, 24 retain items: fixed pairing sees at most 6 of them, ever; random sampling sees
    new ones each epoch (distinct within an epoch) and, over 8 epochs, most of the 24."""
    rand = sampling_dataset("random")
    seen, per_epoch = set(), []
    for epoch in range(8):
        rand.set_epoch(epoch)
        drawn = retain_ids(rand, range(6))
        assert len(set(drawn)) == 6
        per_epoch.append(drawn)
        seen |= set(drawn)
    assert per_epoch[0] != per_epoch[1] and len(seen) >= 20
    again = sampling_dataset("random")  # same seed: same draws
    again.set_epoch(1)
    assert retain_ids(again, range(6)) == per_epoch[1]
    other = sampling_dataset("random", seed=6)
    other.set_epoch(1)
    assert retain_ids(other, range(6)) != per_epoch[1]


def test_random_sampling_gives_disjoint_items_to_ranks_whatever_the_world_size(sampling_dataset):
    """Rank 0 holds items 0, 2, 4 and rank 1 items 1, 3, 5 (a distributed sampler's split): their retain items
    are disjoint, and each item's draw equals what one process draws for it."""
    rand = sampling_dataset("random")
    rand.set_epoch(2)
    rank0, rank1 = retain_ids(rand, [0, 2, 4]), retain_ids(rand, [1, 3, 5])
    assert not set(rank0) & set(rank1)
    single = sampling_dataset("random")
    single.set_epoch(2)
    assert retain_ids(single, range(6)) == [rank0[0], rank1[0], rank0[1], rank1[1], rank0[2], rank1[2]]


def test_random_sampling_keeps_the_refusal_pairing(sampling_dataset):
    rand = sampling_dataset("random", idk=REFUSALS)
    rand.set_epoch(1)
    for i in range(6):
        item = rand[i]
        # the retain refusal sample asks the drawn retain question
        q_len = sum(1 for x in item["retain"]["labels"] if x == -100)
        assert item["retain_idk"]["input_ids"][:q_len] == item["retain"]["input_ids"][:q_len]


def test_training_sets_the_epoch_on_the_dataset(target, tmp_path):
    """--retain_sampling random through the trainer: the dataset sees epochs 0, 1, 2 (DatasetEpochCallback)."""
    seen = []
    original = ForgetRetainDataset.set_epoch

    def spy(self, epoch):
        seen.append(epoch)
        original(self, epoch)

    ForgetRetainDataset.set_epoch = spy
    try:
        forget_me_gd.main(base_args(target, tmp_path, "--retain_sampling", "random", "--num_epochs", "3",
                                    "--bs", "16"))
    finally:
        ForgetRetainDataset.set_epoch = original
    # accelerate also forwards its own set_epoch when the sampler has none (not under a distributed sampler):
    # repeats of the same epoch, in order
    assert list(dict.fromkeys(seen)) == [0, 1, 2] and seen == sorted(seen)
