import logging

import pytest
import torch
from diffusers import CogVideoXPipeline

from mimir.fuser import FuserConfig
from mimir.pipeline import MimirPipeline
from mimir.testing import tiny_components, tiny_llm, uncached_llm_features, word_tokenizer
from mimir.text import LLMTextEncoder, TextFeatures, encode_t5, unknown_words

PROMPT = "a red circle moves to the left"


def llm_config(llm, **kw):
    base = dict(t5_dim=32, llm_dim=llm.config.hidden_size, text_len=16, answer_tokens=3)
    base.update(kw)
    return FuserConfig(**base)


def test_t5_matches_diffusers_encode_prompt():
    c = tiny_components()
    ref = CogVideoXPipeline(tokenizer=c["tokenizer"], text_encoder=c["text_encoder"], vae=c["vae"],
                            transformer=c["transformer"], scheduler=c["scheduler"])
    prompts = [PROMPT, "two blue squares"]
    with torch.no_grad():  # as in CogVideoXPipeline.__call__ (grad mode picks other kernels, ~1e-6 apart)
        expected, _ = ref.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=16, device="cpu")
    ours = encode_t5(c["tokenizer"], c["text_encoder"], prompts, max_length=16)
    assert ours.shape == (2, 16, 32)
    assert torch.equal(ours, expected)


def test_long_prompt_warns_how_many_tokens_were_dropped(caplog):
    c = tiny_components()
    prompt = " ".join(["red"] * 20)  # 20 words + </s> = 21 tokens for a limit of 16
    with caplog.at_level(logging.WARNING, logger="mimir.text"):
        encode_t5(c["tokenizer"], c["text_encoder"], [prompt], max_length=16)
    assert "5 tokens were dropped" in caplog.text


@pytest.mark.parametrize("kind", ["t5", "llm"])
def test_unknown_words_are_the_words_a_word_level_tokenizer_reads_as_unk(kind):
    tokenizer = word_tokenizer(kind=kind)
    assert unknown_words(tokenizer, "a red zebra moves up") == ["zebra"]
    assert unknown_words(tokenizer, "A Red circle moves UP") == []  # the demo's tokenizers lower-case
    assert unknown_words(tokenizer, "") == []


def test_prompt_encoding_names_the_unknown_words_of_each_tokenizer(caplog):
    pipe = MimirPipeline(**tiny_components())
    with caplog.at_level(logging.WARNING, logger="mimir"):
        pipe.encode_prompt("a red circle moves up")
    assert not caplog.records  # known words only (and the empty negative prompt): nothing to say
    with caplog.at_level(logging.WARNING, logger="mimir"):
        pipe.encode_prompt("a red zebra moves up")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all("'zebra'" in m and "'a red zebra moves up'" in m for m in messages)
    assert "T5 tokenizer" in messages[0] and "LLM tokenizer" in messages[1]


@pytest.mark.parametrize("arch", ["phi3", "llama"])
def test_query_tokens_are_the_prompt_positions_of_the_chat_templated_input(arch):
    tok = word_tokenizer(kind="llm")
    llm = tiny_llm(tok, arch=arch)
    enc = LLMTextEncoder(llm, tok, llm_config(llm, answer_tokens=0, stabilizer_tokens=0, instructions=()))
    templated = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(templated, add_special_tokens=False, return_tensors="pt").input_ids
    assert ids[0].tolist() == enc.prefix + enc._ids(PROMPT) + enc.suffix  # the crop sees what the template makes
    with torch.no_grad():
        hidden = llm(ids, output_hidden_states=True).hidden_states[-1][0]
    tokens, instructions = enc.encode_one(PROMPT)
    n = len(enc._ids(PROMPT))
    assert tokens.shape == (n, llm.config.hidden_size) and instructions is None
    torch.testing.assert_close(tokens, hidden[len(enc.prefix):len(enc.prefix) + n])


def test_answer_tokens_are_greedy_continuation_and_hidden_layer_is_selectable():
    tok = word_tokenizer(kind="llm")
    llm = tiny_llm(tok)
    cfg = llm_config(llm, answer_tokens=3, stabilizer_tokens=0, instructions=(), llm_hidden_layer=1)
    enc = LLMTextEncoder(llm, tok, cfg)
    context = enc.prefix + enc._ids(PROMPT) + enc.suffix
    with torch.no_grad():
        greedy = llm.generate(torch.tensor([context]), max_new_tokens=3, do_sample=False)[0, len(context):].tolist()
    answer = enc._answer(context, None, None)[0]
    assert answer == [t for t in greedy if t != tok.eos_token_id][: len(answer)] and len(answer) > 0
    tokens, _ = enc.encode_one(PROMPT)
    with torch.no_grad():
        hidden = llm(torch.tensor([context + answer]), output_hidden_states=True).hidden_states[1][0]
    assert tokens.shape[0] == len(enc._ids(PROMPT)) + len(answer)
    torch.testing.assert_close(tokens[-len(answer):], hidden[len(context):])


def test_answer_is_cut_at_every_end_id_of_the_generation_config():
    """Phi-3.5 stops at <|end|> (32007, in generation_config.eos_token_id), not at the tokenizer's eos (32000):
    the stop token's state must not join the answer."""
    tok = word_tokenizer(kind="llm")
    llm = tiny_llm(tok)
    enc = LLMTextEncoder(llm, tok, llm_config(llm, answer_tokens=4, stabilizer_tokens=0, instructions=()))
    context = enc.prefix + enc._ids(PROMPT) + enc.suffix
    free = enc._answer(context, None, None)[0]
    assert len(free) >= 2 and tok.eos_token_id not in free[:2]
    llm.generation_config.eos_token_id = [free[1], tok.eos_token_id]  # as Phi-3.5's list of end ids
    assert enc._answer(context, None, None)[0] == free[:1]


def test_sampled_answers_need_a_seed_and_are_reproducible():
    tok = word_tokenizer(kind="llm")
    llm = tiny_llm(tok)
    enc = LLMTextEncoder(llm, tok, llm_config(llm, answer_tokens=6, answer_sampling=True, stabilizer_tokens=0,
                                             instructions=()))
    with pytest.raises(ValueError, match="explicit seed"):
        enc.encode_one(PROMPT)
    a, _ = enc.encode_one(PROMPT, seed=3)
    b, _ = enc.encode_one(PROMPT, seed=3)
    assert torch.equal(a, b)


def test_instruction_tokens_batched_equal_one_by_one():
    tok = word_tokenizer(kind="llm")
    llm = tiny_llm(tok, arch="llama")
    enc = LLMTextEncoder(llm, tok, llm_config(llm, answer_tokens=0))
    _, instructions = enc.encode_one(PROMPT)
    assert instructions.shape == (4, llm.config.hidden_size)
    context = enc.prefix + enc._ids(PROMPT) + enc.suffix
    for k, text in enumerate(enc.config.instructions):
        ids = torch.tensor([context + enc._ids(text)])
        with torch.no_grad():
            last = llm(ids, output_hidden_states=True).hidden_states[-1][0, -1]
        torch.testing.assert_close(instructions[k], last, atol=1e-5, rtol=1e-5)


def assert_matches_reference(encoder, prompts):
    """The cached encode (generation states, the context's KV cache, the empty-prompt memo) against the
    uncached reference: same masks, features within 1e-6 (fp32)."""
    tokens, mask, instructions = encoder(prompts)
    ref_tokens, ref_mask, ref_instructions = uncached_llm_features(encoder, prompts)
    assert torch.equal(mask, ref_mask)
    assert (tokens - ref_tokens).abs().max() <= 1e-6
    if ref_instructions is not None:
        assert instructions.shape == ref_instructions.shape
        assert (instructions - ref_instructions).abs().max() <= 1e-6
    return mask


@pytest.mark.parametrize("arch", ["phi3", "llama"])
@pytest.mark.parametrize("answer_tokens", [0, 3])
def test_cached_encode_matches_the_uncached_reference(arch, answer_tokens):
    tok = word_tokenizer(kind="llm")
    llm = tiny_llm(tok, arch=arch)
    enc = LLMTextEncoder(llm, tok, llm_config(llm, answer_tokens=answer_tokens))
    mask = assert_matches_reference(enc, ["", PROMPT, "two blue squares"])
    # no EOS in these greedy answers: every answer token is fused
    assert mask[1].sum() == len(enc._ids(PROMPT)) + answer_tokens


def test_answer_cut_at_eos_matches_the_reference():
    tok = word_tokenizer(kind="llm")
    llm = tiny_llm(tok)
    enc = LLMTextEncoder(llm, tok, llm_config(llm, answer_tokens=6))
    context = enc.prefix + enc._ids(PROMPT) + enc.suffix
    greedy = enc._answer(context, None, None)[0]
    tok.eos_token = tok.convert_ids_to_tokens(greedy[2])  # the model now ends its answer there
    llm.generation_config.eos_token_id = tok.eos_token_id
    answer, out = enc._answer(context, None, None)
    assert answer == greedy[:greedy.index(greedy[2])] and out.sequences.shape[1] > len(context) + len(answer)
    mask = assert_matches_reference(enc, [PROMPT])
    assert mask.sum() == len(enc._ids(PROMPT)) + len(answer)


def test_empty_prompt_is_encoded_once_per_llm_and_settings(monkeypatch):
    tok = word_tokenizer(kind="llm")
    llm = tiny_llm(tok)
    generations = []
    generate = llm.generate
    monkeypatch.setattr(llm, "generate", lambda *a, **kw: generations.append(1) or generate(*a, **kw))
    first = LLMTextEncoder(llm, tok, llm_config(llm))([""])
    again = LLMTextEncoder(llm, tok, llm_config(llm))([""])  # a new encoder (a new pipeline) over the same LLM
    assert len(generations) == 1 and all(torch.equal(a, b) for a, b in zip(first, again))
    LLMTextEncoder(llm, tok, llm_config(llm, answer_tokens=2))([""])  # other settings: encoded anew
    sampled = LLMTextEncoder(llm, tok, llm_config(llm, answer_sampling=True))
    sampled([""], seed=1)
    sampled([""], seed=1)  # sampled answers depend on the seed: never reused
    assert len(generations) == 4
    assert_matches_reference(LLMTextEncoder(llm, tok, llm_config(llm)), [""])


def test_batch_masks_and_feature_round_trip(tmp_path):
    c = tiny_components()
    steps = []
    feats = MimirPipeline(**c).encode_features([PROMPT, "red"], callback=lambda i, n: steps.append(i))
    lengths = feats.llm_mask.sum(1).tolist()
    assert lengths[0] > lengths[1] and feats.llm.shape[1] == max(lengths)
    assert feats.llm[1, lengths[1]:].abs().sum() == 0
    assert feats.instructions.shape == (2, 4, 48) and steps  # progress was reported during generation
    path = tmp_path / "prompt.safetensors"
    feats.save(path)
    back = TextFeatures.load(path)
    for name in ("t5", "llm", "llm_mask", "instructions"):
        assert torch.equal(getattr(back, name), getattr(feats, name))


def test_llm_with_wrong_hidden_size_is_refused():
    tok = word_tokenizer(kind="llm")
    llm = tiny_llm(tok, hidden_size=48)
    with pytest.raises(ValueError, match="hidden size 3072.*has hidden size 48"):
        LLMTextEncoder(llm, tok, FuserConfig())


def test_llm_hidden_layer_out_of_range_is_refused_before_encoding():
    tok = word_tokenizer(kind="llm")
    llm = tiny_llm(tok)  # 2 layers: hidden_states has 3 entries
    LLMTextEncoder(llm, tok, llm_config(llm, llm_hidden_layer=-3))
    with pytest.raises(ValueError, match=r"the fuser: llm_hidden_layer 3 is out of range for an LLM with 2 layers: "
                                         r"its hidden_states has 3 entries, so the index must be in -3..2"):
        LLMTextEncoder(llm, tok, llm_config(llm, llm_hidden_layer=3))
