"""The competition's training loop, reduced to what decides its clipping (run by test_original_clipping.py under
`accelerate launch` with DeepSpeed on CPU): `Accelerator()`, `prepare`, each micro-batch's loss divided by the
accumulation steps before `accelerator.backward`, `optimizer.step()` every accumulation steps; no `accumulate()`,
no `clip_grad_norm_` (the original guarded it with `hasattr(args, 'max_grad_norm')`, an option it never defined).
Prints one JSON line: DeepSpeed's gradient clipping and accumulation, its optimizer steps over the micro-batches,
the gradient norm DeepSpeed measured (and clips) at its first step, and two gradient norms of the same model
computed outside DeepSpeed: the first micro-batch's loss, and the mean loss of the first accumulation window."""

from __future__ import annotations

import copy
import json

import torch
from accelerate import Accelerator


def grad_norm(model: torch.nn.Module, loss: torch.Tensor) -> float:
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    return float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))


def main() -> None:
    torch.manual_seed(0)
    accelerator = Accelerator()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    reference = copy.deepcopy(model)
    data = [(torch.randn(2, 8), torch.randn(2, 1)) for _ in range(8)]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat([x for x, _ in data]),
                                                                        torch.cat([y for _, y in data])),
                                         batch_size=2, shuffle=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accumulation = accelerator.gradient_accumulation_steps
    first_step_norm = None
    for step, (x, y) in enumerate(loader):
        loss = torch.nn.functional.mse_loss(engine(x), y)
        accelerator.backward(loss / accumulation)  # as the original: scaled_loss = total_loss / accumulation
        if first_step_norm is None and engine.global_steps > 0:
            first_step_norm = float(engine.get_global_grad_norm())
        if (step + 1) % accumulation == 0:
            optimizer.step()  # a no-op under DeepSpeed (its engine steps), as in the original
            optimizer.zero_grad()
    losses = [torch.nn.functional.mse_loss(reference(x), y) for x, y in data[:accumulation]]
    if accelerator.is_main_process:
        print("RESULT " + json.dumps({
            "gradient_clipping": engine.gradient_clipping(), "accumulation": engine.gradient_accumulation_steps(),
            "optimizer_steps": engine.global_steps, "micro_batches": len(data), "first_step_norm": first_step_norm,
            "micro_batch_norm": grad_norm(reference, losses[0]),
            "window_mean_norm": grad_norm(reference, torch.stack(losses).mean())}))


if __name__ == "__main__":
    main()
