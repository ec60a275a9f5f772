import pytest
import torch
from safetensors.torch import load_file, save_file

from mimir.fuser import FuserConfig, TokenFuser, align_tokens, load_fuser, read_fuser_config, save_fuser

CFG = FuserConfig(t5_dim=32, llm_dim=24, text_len=10, stabilizer_tokens=4, answer_tokens=3)


def inputs(batch=2, m=7, cfg=CFG, seed=0):
    g = torch.Generator().manual_seed(seed)
    t5 = torch.randn(batch, cfg.text_len, cfg.t5_dim, generator=g)
    llm = torch.randn(batch, m, cfg.llm_dim, generator=g) * 30  # LLM states are large: the Norm must tame them
    mask = torch.ones(batch, m, dtype=torch.long)
    mask[1, 4:] = 0
    instr = torch.randn(batch, cfg.stabilizer_tokens, cfg.llm_dim, generator=g)
    return t5, llm, mask, instr


def test_fresh_fuser_is_identity_on_t5_and_stabilizer_is_e_l():
    fuser = TokenFuser(CFG)
    t5, llm, mask, instr = inputs()
    out = fuser(t5, llm, mask, instr)
    assert out.shape == (2, CFG.text_len + 4, CFG.t5_dim)
    assert torch.equal(out[:, : CFG.text_len], t5)  # bit-equal: the video prior is untouched at step 0
    assert torch.equal(out[:, CFG.text_len:], fuser.stabilizer.detach().expand(2, -1, -1))


def test_no_stabilizer_returns_exactly_t5():
    cfg = FuserConfig(t5_dim=32, llm_dim=24, text_len=10, stabilizer_tokens=0, instructions=())
    t5, llm, mask, _ = inputs(cfg=cfg)
    out = TokenFuser(cfg)(t5, llm, mask)
    assert torch.equal(out, t5)


def test_every_parameter_receives_gradient():
    fuser = TokenFuser(CFG)
    opt = torch.optim.SGD(fuser.parameters(), lr=0.1)
    t5, llm, mask, instr = inputs()
    for _ in range(2):  # the scale's gradient flows through Z_beta, which is zero until the first step
        opt.zero_grad()
        fuser(t5, llm, mask, instr).square().mean().backward()
        opt.step()
    for name, p in fuser.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_padded_llm_slots_contribute_exactly_zero_after_training_the_bias():
    fuser = TokenFuser(CFG)
    with torch.no_grad():
        fuser.z_beta.bias.fill_(5.0)
        fuser.z_beta.weight.normal_()
    t5, llm, mask, instr = inputs(m=7)
    out = fuser(t5, llm, mask, instr)
    # sample 1 has 4 real LLM tokens: every later slot (padding, and slots past m) is the T5 stream alone
    assert torch.equal(out[1, 4:CFG.text_len], t5[1, 4:])
    assert not torch.equal(out[0, :7], t5[0, :7])
    # changing what sits under the mask changes nothing
    llm2 = llm.clone()
    llm2[1, 4:] = 1e3
    assert torch.equal(fuser(t5, llm2, mask, instr), out)


def test_align_tokens_cuts_and_pads():
    x, m = torch.ones(1, 5, 3), torch.ones(1, 5)
    cut, cm = align_tokens(x, m, 3)
    padded, pm = align_tokens(x, m, 8)
    assert cut.shape == (1, 3, 3) and cm.tolist() == [[1, 1, 1]]
    assert padded.shape == (1, 8, 3) and pm.tolist() == [[1] * 5 + [0] * 3] and padded[0, 5:].abs().sum() == 0


def test_save_load_round_trip_is_bit_exact(tmp_path):
    fuser = TokenFuser(CFG)
    with torch.no_grad():
        for p in fuser.parameters():
            p.normal_()
    path = tmp_path / "fuser.safetensors"
    save_fuser(fuser, path)
    loaded = load_fuser(path)
    assert loaded.config == CFG
    for (k, a), (_, b) in zip(fuser.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    t5, llm, mask, instr = inputs()
    assert torch.equal(loaded(t5, llm, mask, instr), fuser(t5, llm, mask, instr))


def test_file_with_the_old_scalar_scale_loads_and_fuses_the_same(tmp_path):
    """Fuser files written while the scale was 0-dim (the bundled demo model's) load into today's [1] scale."""
    fuser = TokenFuser(CFG)
    with torch.no_grad():
        for p in fuser.parameters():
            p.normal_()
    state = {k: v.contiguous() for k, v in fuser.state_dict().items()}
    assert state["scale"].shape == (1,)
    state["scale"] = state["scale"].reshape(())
    path = tmp_path / "old.safetensors"
    save_file(state, str(path), metadata={"format": "mimir-token-fuser", "config": CFG.to_json()})
    loaded = load_fuser(path)
    assert loaded.scale.shape == (1,) and torch.equal(loaded.scale, fuser.scale)
    t5, llm, mask, instr = inputs()
    assert torch.equal(loaded(t5, llm, mask, instr), fuser(t5, llm, mask, instr))


def test_file_with_wrong_dims_is_refused(tmp_path):
    path = tmp_path / "f.safetensors"
    save_fuser(TokenFuser(CFG), path)
    state, meta = load_file(path), {"format": "mimir-token-fuser", "config": CFG.to_json()}
    state["z_beta.weight"] = torch.zeros(32, 99)
    save_file(state, path, metadata=meta)
    with pytest.raises(ValueError, match=r"z_beta.weight: shape \(32, 99\) but the config needs \(32, 24\)"):
        load_fuser(path)


def test_file_with_missing_keys_is_refused(tmp_path):
    path = tmp_path / "f.safetensors"
    save_fuser(TokenFuser(CFG), path)
    state = load_file(path)
    del state["stabilizer"]
    save_file(state, path, metadata={"format": "mimir-token-fuser", "config": CFG.to_json()})
    with pytest.raises(ValueError, match="missing stabilizer"):
        load_fuser(path)


def test_file_without_config_is_refused(tmp_path):
    path = tmp_path / "f.safetensors"
    save_file(TokenFuser(CFG).state_dict(), path)
    with pytest.raises(ValueError, match="not a Mimir token-fuser file"):
        read_fuser_config(path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        load_fuser(junk)


def test_config_validation():
    with pytest.raises(ValueError, match="one instruction per stabilizer token"):
        FuserConfig(stabilizer_tokens=2)
    with pytest.raises(ValueError, match="unknown fields"):
        FuserConfig.from_json('{"t5_dim": 8, "colour": 1}')


def test_wrong_input_shapes_name_what_was_expected():
    fuser = TokenFuser(CFG)
    t5, llm, mask, instr = inputs()
    with pytest.raises(ValueError, match="LLM features must be"):
        fuser(t5, torch.randn(2, 7, 99), mask, instr)
    with pytest.raises(ValueError, match="instruction tokens must be"):
        fuser(t5, llm, mask, None)
