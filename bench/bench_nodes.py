"""ComfyUI node path vs direct library call for the same generation, timed interleaved.

The pack is imported the way ComfyUI imports it (the repository root as a package) and runs through its
no-ComfyUI fallbacks. Both paths use the same model objects, loaded once by the loader nodes from a
ComfyUI-style models folder (loading is not timed). Node path: Mimir Text Encode for the prompt and for the
empty negative prompt, Mimir Sampler, Mimir Decode. Library path: MimirPipeline(...)(prompt, "") with those
models.

Config: mimir.testing's tiny T5 (d_model 32) and Phi-3 LLM (hidden 48, 4 answer tokens), a fuser with
4 stabilizer tokens, a CogVideoX-5B-style transformer (rotary) of 2 layers x 4 heads x 32, the tiny VAE,
DDIM; 9 frames at 32 x 32, 8 steps, CFG 6, fp32.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from common import DEVICE, Row, check, interleaved, median, median_ratio, ratio_spread, table
from diffusers import CogVideoXTransformer3DModel

from mimir.fuser import save_fuser
from mimir.loading import save_single_file
from mimir.pipeline import MimirPipeline
from mimir.testing import import_pack, tiny_components

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle moves to the left and a blue square spins"
FRAMES, SIZE, STEPS, GUIDANCE, SEED = 9, 32, 8, 6.0, 3


def save_models(root: Path) -> None:
    c = tiny_components(variant="5b")
    config = dict(c["transformer"].config)
    config.update(num_attention_heads=4, attention_head_dim=32, sample_height=SIZE // 8, sample_width=SIZE // 8,
                  sample_frames=FRAMES)
    torch.manual_seed(3)
    transformer = CogVideoXTransformer3DModel(**config).eval()
    for sub in ("text_encoders", "LLM", "mimir", "diffusion_models", "vae"):
        (root / sub).mkdir(parents=True)
    c["text_encoder"].save_pretrained(root / "text_encoders" / "t5")
    c["tokenizer"].save_pretrained(root / "text_encoders" / "t5")
    c["llm"].save_pretrained(root / "LLM" / "llm")
    c["llm_tokenizer"].save_pretrained(root / "LLM" / "llm")
    save_fuser(c["fuser"], root / "mimir" / "fuser.safetensors")
    save_single_file(transformer, root / "diffusion_models" / "dit.safetensors",
                     vae_scaling_factor=c["vae"].config.scaling_factor)
    save_single_file(c["vae"], root / "vae" / "vae.safetensors")


def run(repeats: int = 21) -> list[Row]:
    pack = import_pack(ROOT)
    nodes, services = pack.nodes.NODE_CLASS_MAPPINGS, pack.nodes.comfy_services

    def node(kind, **inputs):
        cls = nodes[kind]
        return getattr(cls(), cls.FUNCTION)(**inputs)

    # the folder lives to the end: the T5 and LLM nodes load their files on first use, the prompt cache reads them
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        save_models(Path(folder))
        services.use_models_dir(folder)
        try:
            t5 = node("MimirT5Loader", t5_name="t5", dtype="auto")[0]
            llm = node("MimirLLMLoader", llm_name="llm", dtype="auto", trust_remote_code=False)[0]
            fuser = node("MimirFuserLoader", fuser_name="fuser.safetensors")[0]
            model = node("MimirModelLoader", model_name="dit.safetensors", dtype="auto", blocks_to_swap=0)[0]
            vae = node("MimirVAELoader", vae_name="vae.safetensors", dtype="auto")[0]
        finally:
            services.use_models_dir(None)
        pipe = MimirPipeline(model.transformer, vae, model.scheduler, t5.tokenizer, t5.model, llm.model,
                             llm.tokenizer, fuser)

        def node_path():
            encode = dict(t5=t5, llm=llm, fuser=fuser, answer_tokens=-1, instructions="", answer_seed=SEED,
                          prompt_cache=False)  # the same encoding work as the library call
            positive = node("MimirTextEncode", prompt=PROMPT, **encode)[0]
            negative = node("MimirTextEncode", prompt="", **encode)[0]
            latent = node("MimirSampler", model=model, positive=positive, negative=negative, width=SIZE, height=SIZE,
                          frames=FRAMES, steps=STEPS, cfg=GUIDANCE, seed=SEED, scheduler="ddim", dynamic_cfg=False,
                          denoise=1.0)[0]
            return node("MimirDecode", vae=vae, samples=latent, tiling=False)[0]

        def library():
            return pipe(PROMPT, "", num_frames=FRAMES, height=SIZE, width=SIZE, steps=STEPS, guidance=GUIDANCE,
                        seed=SEED)

        diff = (node_path() - library()[0]).abs().max().item()
        times = interleaved({"nodes": node_path, "library": library}, repeats)
    ratio = median_ratio(times, "nodes", "library")
    target, met = check(ratio, "<=", 1.05)
    detail = (f"median {median(times['nodes']) * 1e3:.1f} ms vs {median(times['library']) * 1e3:.1f} ms, {repeats} "
              f"interleaved repeats ({ratio_spread(times, 'nodes', 'library')}); {DEVICE.type.upper()}; {FRAMES} frames {SIZE}x{SIZE}, {STEPS} steps, CFG; "
              f"frames max abs diff {diff:.2g}")
    return [Row("ComfyUI node path / direct library call, prompt to frames", ratio, target, met, detail)]


if __name__ == "__main__":
    print(table(run()))
