import pytest
import torch
from diffusers import CogVideoXPipeline
from diffusers.utils.torch_utils import randn_tensor

from mimir.offload import Placement
from mimir.pipeline import MimirPipeline
from mimir.sampler import TextStream, check_video_size
from mimir.testing import tiny_components

PROMPT = "a red circle moves to the left"


def reference_latents(c, num_frames, steps=3, guidance=6.0, seed=0, dynamic_cfg=False):
    ref = CogVideoXPipeline(tokenizer=c["tokenizer"], text_encoder=c["text_encoder"], vae=c["vae"],
                            transformer=c["transformer"], scheduler=c["scheduler"])
    ref.set_progress_bar_config(disable=True)
    out = ref(PROMPT, negative_prompt="", num_frames=num_frames, height=32, width=32, num_inference_steps=steps,
              guidance_scale=guidance, use_dynamic_cfg=dynamic_cfg, generator=torch.Generator().manual_seed(seed),
              max_sequence_length=16, output_type="latent").frames
    return out


@pytest.mark.parametrize("variant,scheduler", [("2b", "ddim"), ("2b", "dpm"), ("5b", "ddim"), ("5b", "dpm"),
                                               ("1.5", "ddim")])
def test_parity_with_diffusers_cogvideox(variant, scheduler):
    """The correctness anchor: no stabilizer tokens + a fresh fuser == plain CogVideoX, latent for latent."""
    c = tiny_components(variant=variant, stabilizer_tokens=0, scheduler=scheduler)
    frames = 17 if variant == "1.5" else 9
    expected = reference_latents(c, frames)
    ours = MimirPipeline(**c)(PROMPT, num_frames=frames, height=32, width=32, steps=3, guidance=6.0, seed=0,
                              output_type="latent")
    expected = expected[:, expected.shape[1] - ours.shape[1]:]  # diffusers keeps 1.5's padding frame in latents
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() <= 1e-5


def test_parity_with_dynamic_cfg():
    c = tiny_components(variant="5b", stabilizer_tokens=0)
    expected = reference_latents(c, 9, steps=4, dynamic_cfg=True)
    ours = MimirPipeline(**c)(PROMPT, num_frames=9, height=32, width=32, steps=4, seed=0, dynamic_cfg=True,
                              output_type="latent")
    assert (ours - expected).abs().max() <= 1e-5


def test_stabilizer_tokens_reach_the_dit_and_change_the_result():
    c = tiny_components(variant="5b", stabilizer_tokens=4)
    pipe = MimirPipeline(**c)
    cond, uncond = pipe.encode_prompt(PROMPT)
    assert cond.shape == (1, 20, 32) and uncond.shape == (1, 20, 32)
    plain = tiny_components(variant="5b", stabilizer_tokens=0)
    a = pipe(PROMPT, num_frames=9, height=32, width=32, steps=2, output_type="latent")
    b = MimirPipeline(**plain)(PROMPT, num_frames=9, height=32, width=32, steps=2, output_type="latent")
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_negative_prompt_goes_through_the_whole_fuser():
    c = tiny_components(variant="5b")
    pipe = MimirPipeline(**c)
    with torch.no_grad():
        c["fuser"].z_beta.weight.normal_()  # a trained LLM branch
    cond, uncond = pipe.encode_prompt(PROMPT, negative_prompt="blue")
    feats = pipe.encode_features(["blue"])
    assert torch.equal(uncond, pipe.fuse(feats))
    assert not torch.equal(uncond[:, :16], feats.t5)  # the LLM branch contributed to the negative stream


def test_seed_and_callback_interrupt():
    pipe = MimirPipeline(**tiny_components(variant="5b"))
    seen = []
    a = pipe(PROMPT, num_frames=9, height=32, width=32, steps=3, seed=1, output_type="latent",
             callback=lambda i, n, x: seen.append((i, n, tuple(x.shape))))
    assert seen == [(1, 3, (1, 3, 4, 4, 4)), (2, 3, (1, 3, 4, 4, 4)), (3, 3, (1, 3, 4, 4, 4))]
    b = pipe(PROMPT, num_frames=9, height=32, width=32, steps=3, seed=1, output_type="latent")
    c = pipe(PROMPT, num_frames=9, height=32, width=32, steps=3, seed=2, output_type="latent")
    assert torch.equal(a, b) and not torch.equal(a, c)

    class Stop(Exception):
        pass

    def interrupt(i, n, x):
        if i == 1:
            raise Stop

    with pytest.raises(Stop):
        pipe(PROMPT, num_frames=9, height=32, width=32, steps=3, callback=interrupt)
    assert torch.equal(pipe(PROMPT, num_frames=9, height=32, width=32, steps=3, seed=1, output_type="latent"), a)


def test_denoise_from_input_latents_with_strength():
    pipe = MimirPipeline(**tiny_components(variant="5b"))
    cond, uncond = pipe.encode_prompt(PROMPT)
    start = torch.randn(1, 3, 4, 4, 4)
    steps = []
    out = pipe.denoise(cond, uncond, 9, 32, 32, steps=4, latents=start, strength=0.5,
                       callback=lambda i, n, x: steps.append(n))
    assert out.shape == start.shape and steps == [2, 2]
    with pytest.raises(ValueError, match="input latents"):
        pipe.denoise(cond, uncond, 9, 32, 48, steps=4, latents=start, strength=0.5)
    with pytest.raises(ValueError, match="strength"):
        pipe.denoise(cond, uncond, 9, 32, 32, steps=4, latents=start, strength=0.0)


def test_decode_gives_frames_in_unit_range():
    pipe = MimirPipeline(**tiny_components(variant="2b"))
    frames = pipe(PROMPT, num_frames=9, height=32, width=48, steps=2)
    assert frames.shape == (1, 9, 32, 48, 3) and frames.dtype == torch.float32
    assert 0.0 <= frames.min() and frames.max() <= 1.0
    tiled = pipe.decode(pipe(PROMPT, num_frames=9, height=32, width=48, steps=2, output_type="latent"), tiling=True,
                        slicing=True)  # the tiny VAE's tiles do not fit diffusers' scheme: decoded whole
    torch.testing.assert_close(tiled, frames)


@pytest.mark.parametrize("frames,h,w,msg", [(10, 32, 32, "8k\\+1"), (13, 32, 32, "8k\\+1"), (9, 30, 32, "height must be a positive multiple of 16"),
                                            (9, 32, 40, "width must be"), (0, 32, 32, "8k\\+1")])
def test_bad_video_sizes_are_refused(frames, h, w, msg):
    with pytest.raises(ValueError, match=msg):
        check_video_size(frames, h, w)


def test_placement_moves_each_model_only_for_its_stage():
    moves = []

    class Recorder(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def to(self, device):
            moves.append((self.name, str(device)))
            return self

    placement = Placement(device="cuda", offload_device="cpu")  # .to is recorded, nothing really moves
    with placement.stage(Recorder("llm"), None):
        moves.append(("work", ""))
    assert moves == [("llm", "cuda"), ("work", ""), ("llm", "cpu")]
    moves.clear()
    with pytest.raises(RuntimeError):
        with placement.stage(Recorder("dit")):
            raise RuntimeError("boom")
    assert moves == [("dit", "cuda"), ("dit", "cpu")]  # back to the offload device even when the stage fails


def test_sincos_transformer_takes_a_stream_of_another_length():
    """A 2B-style model loaded for 16 + 4 fused tokens still runs plain T5 streams (16), e.g. for a baseline."""
    c = tiny_components(variant="2b", stabilizer_tokens=4)
    pipe = MimirPipeline(**c)
    t5 = pipe.encode_features([PROMPT, ""]).t5
    reference = tiny_components(variant="2b", stabilizer_tokens=0)["transformer"]  # same seed: same weights
    assert reference.config.max_text_seq_length == 16 and c["transformer"].config.max_text_seq_length == 20
    expected = MimirPipeline(reference, c["vae"], c["scheduler"]).denoise(t5[:1], t5[1:], 9, 32, 32, steps=2)
    ours = pipe.denoise(t5[:1], t5[1:], 9, 32, 32, steps=2)
    assert torch.equal(ours, expected)
    assert c["transformer"].config.max_text_seq_length == 16


def test_steps_are_checked_before_any_model_runs():
    pipe = MimirPipeline(**tiny_components(variant="5b"))
    cond, uncond = pipe.encode_prompt(PROMPT)
    for steps in (0, -3):
        with pytest.raises(ValueError, match=f"^steps must be a whole number of at least 1, got {steps}"):
            pipe.denoise(cond, uncond, 9, 32, 32, steps=steps)
    pipe.text_encoder = None  # encoding would now fail otherwise: the check comes first
    with pytest.raises(ValueError, match="^steps must be"):
        pipe(PROMPT, num_frames=9, height=32, width=32, steps=0)


def test_a_strength_that_rounds_to_no_step_runs_one():
    """50 steps at strength 0.01 used to give no timestep at all (round(0.5) == 0) and a tensor-size error."""
    pipe = MimirPipeline(**tiny_components(variant="5b"))
    cond, uncond = pipe.encode_prompt(PROMPT)
    start = torch.randn(1, 3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    seen = []
    out = pipe.denoise(cond, uncond, 9, 32, 32, steps=50, latents=start, strength=0.01,
                       callback=lambda i, n, x: seen.append((i, n)))
    assert seen == [(1, 1)]
    assert torch.equal(out, pipe.denoise(cond, uncond, 9, 32, 32, steps=50, latents=start, strength=0.02))


# ---- several conditioning entries, as ComfyUI's samplers combine them -----------------------------------------

def streams(count, seed=0):
    """Random text streams as the tiny 2B transformer reads them (16 tokens, 32 wide)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 16, 32, generator=generator) for _ in range(count)]


def test_timestep_ranges_follow_comfyui_percents():
    """ComfyUI maps percent p to the sigma of timestep (1 - p) x 999 (percent_to_sigma) and runs an entry when
    sigma_end <= sigma <= sigma_start; 0 and 1 are open ends."""
    tokens = torch.zeros(1, 1, 1)
    first_half, second_half = TextStream(tokens, start=0.0, end=0.5), TextStream(tokens, start=0.5, end=1.0)
    assert [first_half.active(t, 999) for t in (999, 500, 499, 0)] == [True, True, False, False]
    assert [second_half.active(t, 999) for t in (999, 500, 499, 0)] == [False, False, True, True]
    assert not TextStream(tokens, start=1.0).active(0, 999) and not TextStream(tokens, end=0.0).active(999, 999)
    for bad, message in [(dict(strength=-1.0), "^strength must be"), (dict(strength=float("nan")), "^strength"),
                         (dict(end=1.5), "^end percent must be in")]:
        with pytest.raises(ValueError, match=message):
            TextStream(tokens, **bad)


def test_timestep_ranges_switch_prompts_as_diffusers_does_with_switched_embeddings():
    c = tiny_components(variant="2b", stabilizer_tokens=0)
    a, b, negative = streams(3)
    ref = CogVideoXPipeline(c["tokenizer"], c["text_encoder"], c["vae"], c["transformer"], c["scheduler"])
    ref.set_progress_bar_config(disable=True)

    def to_b_after_two_steps(pipe, i, t, tensors):  # 4 steps: timesteps 999, 749 | 499, 249
        return {"prompt_embeds": torch.cat([negative, b])} if i == 1 else {}

    expected = ref(prompt_embeds=a, negative_prompt_embeds=negative, num_frames=9, height=32, width=32,
                   num_inference_steps=4, guidance_scale=6.0, generator=torch.Generator().manual_seed(0),
                   output_type="latent", callback_on_step_end=to_b_after_two_steps,
                   callback_on_step_end_tensor_inputs=["prompt_embeds"]).frames
    pipe = MimirPipeline(**c)
    split = [TextStream(a, start=0.0, end=0.5), TextStream(b, start=0.5, end=1.0)]
    ours = pipe.denoise(split, negative, 9, 32, 32, steps=4)
    assert (ours - expected).abs().max() <= 1e-5
    assert (ours - pipe.denoise(a, negative, 9, 32, 32, steps=4)).abs().max() > 1e-2
    whole = pipe.denoise([TextStream(a, start=0.0, end=1.0)], [TextStream(negative)], 9, 32, 32, steps=4)
    assert torch.equal(whole, pipe.denoise(a, negative, 9, 32, 32, steps=4))


def hand_sampled(c, positive, negative, steps=4, guidance=6.0, seed=0):
    """The reference: the transformer and DDIM scheduler stepped by hand, one forward per entry;
    positive(t) / negative(t) -> the [(stream, strength)] active at timestep t."""
    transformer, scheduler = c["transformer"], c["scheduler"]

    def mean(entries, x, t):
        preds = [transformer(hidden_states=x, encoder_hidden_states=s, timestep=t.expand(1), return_dict=False)[0] * w
                 for s, w in entries]
        return sum(preds) / sum(w for _, w in entries)

    scheduler.set_timesteps(steps)
    x = randn_tensor((1, 3, 4, 4, 4), generator=torch.Generator().manual_seed(seed))
    for t in scheduler.timesteps:
        uncond, cond = mean(negative(t), x, t), mean(positive(t), x, t)
        x = scheduler.step(uncond + guidance * (cond - uncond), t, x, return_dict=False)[0]
    return x


def test_several_entries_average_their_predictions_by_strength():
    c = tiny_components(variant="2b", stabilizer_tokens=0)
    a, b, n, m = streams(4)
    expected = hand_sampled(c, lambda t: [(a, 1.0), (b, 3.0)], lambda t: [(n, 1.0)] + ([(m, 1.0)] if t < 500 else []))
    pipe = MimirPipeline(**c)
    ours = pipe.denoise([TextStream(a), TextStream(b, strength=3.0)],
                        [TextStream(n), TextStream(m, start=0.5, end=1.0)], 9, 32, 32, steps=4)
    assert (ours - expected).abs().max() <= 1e-5
    unweighted = pipe.denoise([TextStream(a), TextStream(b)], [TextStream(n), TextStream(m, start=0.5)], 9, 32, 32,
                              steps=4)
    assert (ours - unweighted).abs().max() > 1e-2
    with pytest.raises(ValueError, match="^positive: no conditioning entry of strength > 0 is active at timestep 499"):
        pipe.denoise([TextStream(a, end=0.5)], n, 9, 32, 32, steps=4)
    with pytest.raises(ValueError, match=r"^negative: entry 2 has shape \[1, 8, 32\] but positive entry 1 has"):
        pipe.denoise(a, [TextStream(n), TextStream(m[:, :8])], 9, 32, 32, steps=4)


def test_the_pipeline_is_its_parts_and_reads_the_vae_factors_from_its_config():
    """The text side, the sampler and the codec are objects of their own (the nodes call them directly); a VAE
    with 3 blocks compresses 4x, not the published 8x, and the pipeline follows its config as diffusers does."""
    import copy

    from diffusers import AutoencoderKLCogVideoX

    from mimir.codec import VideoCodec, comfy_latent, diffusion_latent

    parts = tiny_components(variant="5b")
    pipe = MimirPipeline(**parts)
    assert pipe.text.fuser is parts["fuser"] and pipe.sampler.transformer is parts["transformer"]
    assert pipe.codec.vae is parts["vae"] and (pipe.codec.spatial, pipe.codec.temporal) == (8, 4)
    other = copy.copy(pipe)
    other.transformer = None  # a copy's parts are its own
    assert pipe.transformer is parts["transformer"]
    assert pipe.encode_features(["x"]).llm is not None and MimirPipeline(
        parts["transformer"], None, parts["scheduler"], parts["tokenizer"], parts["text_encoder"]
    ).encode_features(["x"]).llm is None  # T5 alone: still TextFeatures, no LLM features
    torch.manual_seed(0)
    small = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 3,
                                   up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 8, 8),
                                   latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                   sample_height=32, sample_width=32).eval()
    pipe.vae = small
    assert VideoCodec(small).spatial == 4
    latents = pipe("a red circle", num_frames=9, height=32, width=48, steps=1, guidance=1.0, output_type="latent")
    assert latents.shape == (1, 3, 4, 8, 12)
    assert pipe.decode(latents).shape == (1, 9, 32, 48, 3)
    samples = comfy_latent(latents, 0.7)
    assert samples.shape == (1, 4, 3, 8, 12) and torch.allclose(diffusion_latent(samples, 0.7), latents)
