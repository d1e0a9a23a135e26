"""A bf16 model that has decoded on the CPU (its linear layers hold oneDNN-packed weights, gpt.ops.linear)
can still be deep-copied (it could not: "Cannot access storage of OpaqueTensorImpl"), and the copy
gives the same logits (it packs its own weights again)."""

import copy

import torch

from gpt.model import GPT, GPTConfig


def test_a_model_that_decoded_can_be_deepcopied():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    model = GPT(config).to(torch.bfloat16).eval()
    x = torch.randint(0, 64, (1, 8))
    with torch.inference_mode():
        want = model(x)  # packs every linear layer's weight (where oneDNN runs bf16)
    twin = copy.deepcopy(model)
    with torch.inference_mode():
        assert torch.equal(twin(x), want)
        assert torch.equal(model(x), want)  # the original keeps its packed weights
