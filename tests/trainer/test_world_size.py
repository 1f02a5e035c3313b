"""World-size invariance: a step gives the same loss and update however its items are split across
processes and accumulation micro-batches (1 process bs 2 = 2 processes bs 1 = accumulation 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import forget_me_gd
from tests.conftest import base_args, launch_two_processes
from trainer.losses import LOSSES, LossParams, PartOutput

PARTS = ("forget", "retain", "forget_idk", "retain_idk")


def random_outputs(rows: int, seed: int = 0) -> dict[str, PartOutput]:
    """Every part with logits, labels (answers of different lengths, a masked prompt, padding), reference
    logits, hidden and reference hidden states."""
    gen = torch.Generator().manual_seed(seed)
    length, vocab, hidden = 9, 7, 4
    outputs = {}
    for name in PARTS:
        labels = torch.randint(0, vocab, (rows, length), generator=gen)
        for r in range(rows):
            start = 2 + r % 3  # prompt length differs per row
            end = length - (r % 2) * 2  # some rows padded at the end
            labels[r, :start] = -100
            labels[r, end:] = -100
        labels[2] = -100  # a row with no answer at all (SimNPO leaves it out of its mean; NPO does not)
        outputs[name] = PartOutput(
            torch.randn(rows, length, vocab, generator=gen, dtype=torch.float64),
            labels,
            torch.randn(rows, length, vocab, generator=gen, dtype=torch.float64),
            torch.randn(rows, length, hidden, generator=gen, dtype=torch.float64),
            torch.randn(rows, length, hidden, generator=gen, dtype=torch.float64),
        )
    return outputs


def rows_of(outputs: dict[str, PartOutput], sl: slice) -> dict[str, PartOutput]:
    return {k: PartOutput(*(None if t is None else t[sl] for t in v)) for k, v in outputs.items()}


def term_names() -> list[tuple[str, int]]:
    return [(name, i) for name, terms in LOSSES.items() for i, t in enumerate(terms) if t is not None]


@pytest.mark.parametrize(("loss_type", "index"), term_names(), ids=lambda v: str(v))
def test_every_term_is_a_mean_over_its_units(loss_type, index):
    """For rows split into micro-batches A = {0} and B = {1, 2, 3}: ``L(A+B) * n(A+B) = L(A) * n(A) + L(B) * n(B)``
    with n the term's ``units``. That identity is what lets the trainer weight each micro-batch by n / N and
    get the global mean; a wrong unit counter (rows for a token mean, skip ignored, ...) breaks it."""
    term = LOSSES[loss_type][index]
    params = LossParams(steering=torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
                        ceu_skip_tokens=2)
    outputs = random_outputs(4)

    def value_and_units(out):
        loss = term.compute(out, params)
        units = term.units({k: v.labels for k, v in out.items()}, params)
        return loss.double(), units.double()

    full, n_full = value_and_units(outputs)
    parts = [value_and_units(rows_of(outputs, sl)) for sl in (slice(0, 1), slice(1, 4))]
    assert n_full == sum(n for _, n in parts) and n_full > 0
    assert (full * n_full).item() == pytest.approx(sum((v * n).item() for v, n in parts), rel=1e-9, abs=1e-12)


def test_kl_batchmean_is_a_mean_over_every_position_and_reads_them_all(target, tmp_path):
    """--kl_reduction batchmean: the KL term's units are every position of its part (so the step's mean is still
    exact across micro-batches), and the trainer hands it the logits of every position, not only those that
    predict answer tokens; its value equals open-unlearning's batchmean on the whole batch."""
    import torch.nn.functional as F

    from dataset.data_module import ForgetRetainCollator
    from trainer import recipe
    from trainer.unlearn_trainer import UnlearnTrainer

    term = LOSSES["NPO+KL"][1]
    params = LossParams(kl_reduction="batchmean")
    outputs = random_outputs(4)
    full = term.compute(outputs, params).double()
    n_full = term.units({k: v.labels for k, v in outputs.items()}, params).double()
    assert n_full == outputs["retain"].labels.numel()
    parts = [(term.compute(rows_of(outputs, sl), params).double(),
              term.units({k: v.labels[sl] for k, v in outputs.items()}, params).double())
             for sl in (slice(0, 1), slice(1, 4))]
    assert (full * n_full).item() == pytest.approx(sum((v * n).item() for v, n in parts), rel=1e-9)

    args = recipe.build_parser("me_gd", "").parse_args(base_args(target, tmp_path, "--loss_type", "NPO+KL",
                                                                 "--kl_reduction", "batchmean"))
    template = recipe.load_chat_template("tiny")
    tokenizer = recipe.load_tokenizer(args, template)
    dataset = recipe.build_dataset(args, tokenizer, template)
    model = recipe.build_model(args, template, False)
    forget, retain = LOSSES["NPO+KL"]
    trainer = UnlearnTrainer(model=model, args=recipe.build_training_args(args, tmp_path / "run", False),
                             train_dataset=dataset)
    assert trainer.every_position_parts == {"retain"}
    batch = ForgetRetainCollator(tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    _, out = trainer.compute_loss(model, batch, return_outputs=True)
    retain_ids = batch["retain"]["input_ids"]
    assert out["retain"].logits.shape[:2] == retain_ids.shape  # every position
    theirs = F.kl_div(F.log_softmax(out["retain"].logits.reshape(-1, out["retain"].logits.size(-1)), -1),
                      F.log_softmax(out["retain"].ref_logits.reshape(-1, out["retain"].logits.size(-1)), -1),
                      reduction="batchmean", log_target=True)
    assert retain.compute(out, trainer.params).item() == pytest.approx(theirs.item(), rel=1e-6)


# --------------------------------------------------------------------------- 1 process = 2 processes = accumulation


def run_outputs(run: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The per-step log rows and the final adapter's tensors of a finished run folder."""
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], load_file(run / "final_lora_model" / "adapter_model.safetensors")


def only_run(root: Path) -> Path:
    (run,) = (root / "adapter").iterdir()
    return run


# Measured (16 items, 2 epochs, lr 1e-3, 16 steps): per-step losses agree to 2e-6 (ME+GD 1e-6, NPO+GD 2e-6), the
# adapters to 4e-5 absolute while the LoRA B weights move by 9e-3; accumulation and 2 processes are bitwise equal.
LOSS_TOL = 1e-5  # relative, per logged value
WEIGHT_TOL = 1e-4  # absolute, per adapter weight


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["ME+GD", "NPO+GD"])
def test_one_process_two_processes_and_accumulation_train_alike(target, tmp_path, loss_type):
    """The same global batch of 2 three ways: 1 process with --bs 2, 2 gloo processes with --bs 1, 1 process
    with --bs 1 and accumulation 2. Same items in the same steps (a seeded order independent of the world
    size), each term a mean over the whole step: same per-step losses, same adapter. ME+GD runs with
    --group_by_length (grouped by the global batch, shuffled from seed and epoch); NPO+GD also reads the
    reference, and runs with random retain sampling (the pairing depends on the item and epoch alone).
    LoRA dropout is 0: its masks are per-process random draws (see docs/distributed.md)."""
    extra = ("--retain_sampling", "random") if loss_type == "NPO+GD" else ("--group_by_length",)
    common = ("--loss_type", loss_type, "--num_epochs", "2", "--lr", "1e-3", "--lora_dropout", "0", "--mask",
              "true", *extra)
    forget_me_gd.main(base_args(target, tmp_path / "one", *common, "--bs", "2"))
    forget_me_gd.main(base_args(target, tmp_path / "accum", *common, "--bs", "1", "--gradient_accumulation_steps", "2"))
    proc = launch_two_processes("forget_me_gd.py", base_args(target, tmp_path / "two", *common, "--bs", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_rows, one_weights = run_outputs(only_run(tmp_path / "one"))
    assert len(one_rows) == 16
    for name in ("accum", "two"):
        rows, weights = run_outputs(only_run(tmp_path / name))
        assert [r["step"] for r in rows] == [r["step"] for r in one_rows]
        for row, ref in zip(rows, one_rows, strict=True):
            for key in ("loss", "forget_loss", "retain_loss"):
                assert row[key] == pytest.approx(ref[key], rel=LOSS_TOL), (name, row["step"], key)
        assert weights.keys() == one_weights.keys()
        for key, value in weights.items():
            assert torch.allclose(value, one_weights[key], rtol=0, atol=WEIGHT_TOL), (name, key)
    # the adapter moved well beyond the tolerance: the comparison means something
    assert max(v.abs().max().item() for k, v in one_weights.items() if "lora_B" in k) > 50 * WEIGHT_TOL


@pytest.mark.slow
def test_micro_batch_reduction_restores_the_original_dependence_on_the_split(target, tmp_path):
    """--loss_reduction micro_batch: each micro-batch's own mean, averaged (the original's numbers). One process
    with --bs 2 then differs from accumulation 2 from the first step (a token mean over both answers vs the
    mean of two per-answer means), while with one micro-batch a step both reductions agree bitwise."""
    common = ("--num_epochs", "1", "--lr", "1e-3", "--lora_dropout", "0", "--mask", "true")
    forget_me_gd.main(base_args(target, tmp_path / "one", *common, "--bs", "2", "--loss_reduction", "micro_batch"))
    forget_me_gd.main(base_args(target, tmp_path / "global", *common, "--bs", "2"))
    forget_me_gd.main(base_args(target, tmp_path / "accum", *common, "--bs", "1", "--gradient_accumulation_steps",
                                "2", "--loss_reduction", "micro_batch"))
    one, _ = run_outputs(only_run(tmp_path / "one"))
    glob, _ = run_outputs(only_run(tmp_path / "global"))
    accum, _ = run_outputs(only_run(tmp_path / "accum"))
    assert [r["loss"] for r in one] == [r["loss"] for r in glob]
    assert abs(accum[0]["loss"] - one[0]["loss"]) > 1e-3


def test_length_grouping_draws_from_seed_and_epoch_over_the_global_batch(target, tmp_path):
    """--group_by_length: the sampler groups by the optimizer step's items (--bs x processes x accumulation), and
    its shuffle comes from (seed, epoch) alone, whatever the global random state (which processes consume
    differently: dropout masks, one sampler per process)."""
    from trainer import recipe
    from trainer.unlearn_trainer import SeededLengthGroupedSampler, UnlearnTrainer

    args = recipe.build_parser("me_gd", "").parse_args(base_args(
        target, tmp_path, "--group_by_length", "--bs", "1", "--gradient_accumulation_steps", "4"))
    template = recipe.load_chat_template("tiny")
    dataset = recipe.build_dataset(args, recipe.load_tokenizer(args, template), template)
    trainer = UnlearnTrainer(model=recipe.build_model(args, template, False),
                             args=recipe.build_training_args(args, tmp_path / "run", False), train_dataset=dataset)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, SeededLengthGroupedSampler) and sampler.batch_size == 4
    torch.manual_seed(0)
    first = list(sampler)
    torch.manual_seed(123)
    assert list(sampler) == first and sorted(first) == list(range(len(dataset)))
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_multinode_config_keeps_the_global_batch():
    """config/accelerate_multinode.yaml loads as accelerate's cluster config for several machines and keeps
    accelerate_config.yaml's 128 items a step (16 GPUs x 8 vs 8 GPUs x 16), so it trains the same."""
    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).resolve().parents[2]
    multi = load_config_from_file(str(root / "config" / "accelerate_multinode.yaml"))
    single = load_config_from_file(str(root / "accelerate_config.yaml"))
    assert multi.num_machines > 1 and multi.machine_rank == 0 and multi.main_process_ip
    assert multi.deepspeed_config["zero_stage"] == single.deepspeed_config["zero_stage"] == 2

    def global_batch(config):
        return config.num_processes * config.deepspeed_config["gradient_accumulation_steps"]

    assert global_batch(multi) == global_batch(single) == 128
