"""GPU check of peft's LoRA on a pruned model (slope.peft.get_peft_model with a LoraConfig): a
tiny HF Llama pruned with ``auto`` on CUDA, adapters trained under bf16 autocast with the sparse
weights frozen (the 2:4 layers' input-gradient path with frozen values), against the same steps on
the CPU reference backend. Marked ``gpu``; skipped without CUDA."""
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="unset TRITON_INTERPRET to compile Triton on the GPU"),
]

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from slope import prune_model  # noqa: E402
from slope.peft import get_peft_model  # noqa: E402


def _trained(device, backend, steps=4):
    config = transformers.LlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                      intermediate_size=512, vocab_size=512)
    torch.manual_seed(0)
    model = prune_model(transformers.LlamaForCausalLM(config), backend=backend, verbose=False).to(device)
    values = {n: t.detach().clone() for n, t in model.state_dict().items() if n.endswith("values")}
    model = get_peft_model(model, peft.LoraConfig(r=8, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1)).to(device)
    losses = []
    for _ in range(steps):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    state = model.unload().state_dict()  # the pruned model, adapters removed
    unchanged = all(torch.equal(state[n], t) for n, t in values.items())
    return losses, unchanged


def test_peft_lora_trains_on_a_pruned_model_on_cuda_as_on_the_cpu_reference():
    gpu_losses, gpu_unchanged = _trained(torch.device("cuda"), "auto")
    cpu_losses, cpu_unchanged = _trained(torch.device("cpu"), "reference")
    assert gpu_unchanged and cpu_unchanged  # the 2:4 weights stay frozen
    assert gpu_losses[-1] < gpu_losses[0] - 0.05, gpu_losses
    assert all(abs(g - c) < 0.05 * abs(c) for g, c in zip(gpu_losses, cpu_losses)), (gpu_losses, cpu_losses)
