import pytest
import torch

from ldpipe.model.generate import GenerationConfig, generate
from ldpipe.model.lm import TinyModelConfig, build_model, train_tokenizer

TEXTS = [f"the cat {i} sat on the mat and the dog {i % 7} ran to the park" for i in range(200)]


@pytest.fixture(scope="module")
def lm():
    tok = train_tokenizer(TEXTS, vocab_size=300)
    model = build_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
                        vocab_size=len(tok))
    return model, tok


def test_greedy_is_deterministic_and_batch_independent(lm):
    model, tok = lm
    prompts = ["the cat 3 sat", "the dog", "on the mat and the dog 5 ran to"]
    cfg = GenerationConfig(max_new_tokens=8, batch_size=3)
    together = generate(model, tok, prompts, cfg)
    alone = [generate(model, tok, [p], GenerationConfig(max_new_tokens=8, batch_size=1))[0] for p in prompts]
    assert together == alone            # left padding must not change a greedy continuation
    assert len(together) == 3 and all(isinstance(t, str) for t in together)
    # greedy = argmax of the next-token distribution, step by step
    ids = tok(prompts[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        first = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    if first != tok.eos_token_id:
        assert together[0].startswith(tok.decode([first]).strip())


def test_sampling_is_seeded(lm):
    model, tok = lm
    prompts = ["the cat", "the dog 2"]
    a = generate(model, tok, prompts, GenerationConfig(max_new_tokens=10, do_sample=True, seed=1))
    b = generate(model, tok, prompts, GenerationConfig(max_new_tokens=10, do_sample=True, seed=1))
    c = generate(model, tok, prompts, GenerationConfig(max_new_tokens=10, do_sample=True, seed=2))
    assert a == b
    assert a != c       # an untrained model's distributions are near uniform: two seeds differ


def test_bad_config_and_empty_input(lm):
    model, tok = lm
    assert generate(model, tok, []) == []
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)


def test_greedy_generations_are_cached_per_checkpoint_prompts_and_config(lm, tmp_path):
    from ldpipe.analysis.generations import greedy_generations
    from ldpipe.model.checkpoints import save_checkpoint

    model, tok = lm
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    loads = []

    def load():
        loads.append(1)
        return model, tok

    prompts = ["the cat 3 sat", "the dog"]
    cfg = GenerationConfig(max_new_tokens=6)
    first = greedy_generations(ckpt, prompts, cfg, tmp_path / "cache", load=load)
    assert first == generate(model, tok, prompts, cfg) and len(loads) == 1
    assert greedy_generations(ckpt, prompts, cfg, tmp_path / "cache", load=load) == first and len(loads) == 1
    # other settings or other prompts decode again
    greedy_generations(ckpt, prompts, GenerationConfig(max_new_tokens=3), tmp_path / "cache", load=load)
    greedy_generations(ckpt, prompts[:1], cfg, tmp_path / "cache", load=load)
    assert len(loads) == 3
