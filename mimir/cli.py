"""`mimir` command line: generate a video, inspect a checkpoint, cache features, train."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .demo import DEMO_GUIDANCE, DEMO_STEPS

DTYPES = ("fp32", "fp16", "bf16")


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="text -> video file (.mp4, .webp or .gif)",
                       description="Generate a video. With no model arguments it uses the bundled demo model.")
    p.add_argument("prompt")
    p.add_argument("--negative-prompt", default="", help="goes through the whole fuser, like the prompt")
    p.add_argument("--frames", type=int, default=None, help="8k+1 (default: the variant's usual length, 49 or 81; the demo's 9)")
    p.add_argument("--height", type=int, default=None, help="multiple of 16 (default: the variant's usual size, e.g. 480 x 720; 1.5: 768 x 1360)")
    p.add_argument("--width", type=int, default=None, help="multiple of 16 (default: the variant's usual size, e.g. 480 x 720; 1.5: 768 x 1360)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; demo model 25)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale, 1 disables (default 6; demo model 2)")
    p.add_argument("--dynamic-cfg", action="store_true", help="CogVideoX's cosine guidance schedule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", choices=("ddim", "dpm"), default="ddim")
    p.add_argument("--model", type=Path, default=None,
                   help="Mimir/CogVideoX diffusers folder (transformer/ vae/ text_encoder/ tokenizer/ [llm/ fuser.safetensors])")
    p.add_argument("--transformer", type=Path, help="override: transformer single file or folder")
    p.add_argument("--vae", type=Path, help="override: VAE single file or folder")
    p.add_argument("--llm", type=Path, help="override: transformers LLM folder")
    p.add_argument("--fuser", type=Path, help="override: token fuser .safetensors")
    p.add_argument("--no-fuser", action="store_true",
                   help="T5 only: plain CogVideoX (--model read without its fuser and LLM; with no --model, the "
                        "bundled demo's T5-only arm, a DiT trained on T5 alone)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the LLM folder's own Python code")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="compute device (default: cuda if available)")
    p.add_argument("--offload-device", default="cpu", help="where idle models wait between stages")
    p.add_argument("--fp8", action="store_true", help="store the DiT's block weights in fp8 (e4m3fn), upcast per layer")
    p.add_argument("--blocks-to-swap", type=int, default=0,
                   help="keep this many DiT blocks on the offload device, moved in just in time (less GPU memory)")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (first step compiles)")
    p.add_argument("--prompt-cache", nargs="?", const="", default=None, metavar="DIR",
                   help="reuse encoded prompts (default folder ~/.cache/mimir/prompts): a cached prompt loads "
                        "neither T5 nor the LLM")
    p.add_argument("--tiling", action="store_true", help="VAE tiled decoding (less memory)")
    p.add_argument("--slicing", action="store_true", help="VAE decodes one video of the batch at a time")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("-o", "--output", type=Path, default=Path("mimir.mp4"))
    _speed_parser(p)


def _speed_parser(p) -> None:
    p.add_argument("--attention", default="native", metavar="BACKEND",
                   help="the DiT's attention backend through diffusers' dispatcher: native (torch SDPA, default), "
                        "flash, sage or xformers (each needs its package)")
    p.add_argument("--step-cache", default=None, metavar="METHOD[:SETTING]",
                   help="diffusers' step caching during denoising: fbc[:threshold], pab[:skip], faster[:skip], "
                        "taylorseer[:interval] or mag[:threshold] (mag calibrates on its first run); off by default")


def _check_args(args) -> None:
    """Every value refused before a model loads or a step runs, with what is allowed."""
    import math

    from .sampler import check_video_size
    from .video import SUPPORTED_EXTENSIONS

    for name in ("prompt", "negative_prompt"):
        try:
            getattr(args, name).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"--{name.replace('_', '-')} is not valid UTF-8 text: {getattr(args, name)!r}") from None
    if not args.prompt.strip():
        print("mimir generate: warning: the prompt is empty: the video follows no text", file=sys.stderr)
    if args.frames is not None or args.height is not None or args.width is not None:
        check_video_size(*(v if v is not None else ok for v, ok in ((args.frames, 1), (args.height, 16),
                                                                    (args.width, 16))))
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 1.0):
        raise ValueError(f"--guidance must be a finite number >= 1 (1 turns guidance off), got {args.guidance}")
    if not 0 <= args.seed < 2 ** 64:
        raise ValueError(f"--seed must be in 0 .. 2**64 - 1, got {args.seed}")
    if args.fps < 1:
        raise ValueError(f"--fps must be at least 1, got {args.fps}")
    if args.blocks_to_swap < 0:
        raise ValueError(f"--blocks-to-swap must be 0 or more, got {args.blocks_to_swap}")
    if args.no_fuser and (args.fuser or args.llm):
        raise ValueError("--no-fuser reads T5 alone: it cannot take --fuser or --llm")
    if args.output.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise ValueError(f"-o {args.output}: unknown extension {args.output.suffix!r}, supported: "
                         f"{', '.join(SUPPORTED_EXTENSIONS)}")
    _check_writable(args.output)


def _check_writable(output: Path) -> None:
    """The output folder must exist and take a file: found out now, not after the whole generation."""
    import tempfile

    folder = output.parent
    if not folder.is_dir():
        raise ValueError(f"-o {output}: the folder {folder} does not exist")
    if output.is_dir():
        raise ValueError(f"-o {output}: that is a folder; give a file name such as {output / 'mimir.mp4'}")
    try:
        tempfile.TemporaryFile(dir=folder).close()  # os.access says yes to root on a read-only mount
    except OSError as exc:
        raise ValueError(f"-o {output}: cannot write into {folder} ({exc.strerror})") from None


def _resolve_device(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for flag, name in (("--device", device), ("--offload-device", args.offload_device)):
        _check_device(flag, name)
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    return device, dtype


def _check_device(flag: str, name: str) -> None:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{flag} {name!r} is not a device name (e.g. cpu, cuda, cuda:1, mps)") from None
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
                 "mps": lambda: torch.backends.mps.is_available()}.get(device.type, lambda: False)()
    if not available:
        raise ValueError(f"{flag} {name}: this machine has no {device.type} device (this torch: {torch.__version__})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{flag} {name}: there are {torch.cuda.device_count()} CUDA devices")


def _load(args, device, dtype, cached: bool = False):
    from .components import load_transformer, load_vae
    from .loading import DEMO_MODEL_DIR, load_pipeline
    from .offload import Placement

    placement = Placement(device, args.offload_device)
    folder = _model_folder(args)
    if folder is None:
        raise FileNotFoundError(f"no --model given and the bundled demo model is missing ({DEMO_MODEL_DIR}); "
                                f"reinstall the package or pass --model")
    arm = _t5_only_arm(args)
    pipe = load_pipeline(folder, dtype=dtype, device=args.offload_device, placement=placement,
                         fuser_path=args.fuser, llm_path=args.llm, trust_remote_code=args.trust_remote_code,
                         text_encoders=not cached, with_fuser=not args.no_fuser, transformer_path=arm)
    scaling = pipe.vae.config.scaling_factor  # what the folder's transformer was trained with
    if args.transformer:  # without a fuser it keeps its own text length (the T5 encoding follows it)
        pipe.transformer, info = load_transformer(args.transformer, dtype=dtype, device=args.offload_device,
                                                  text_len=pipe.fuser.config.out_len if pipe.fuser else None)
        scaling = info.vae_scaling_factor or scaling
    if args.vae:  # a single file does not tell its scaling factor: the transformer's VAE's is the right one
        pipe.vae, _ = load_vae(args.vae, dtype=dtype, device=args.offload_device, scaling_factor=scaling)
    pipe.use_scheduler(args.scheduler)
    _memory_options(args, pipe, device)
    _speed_options(args, pipe)
    return pipe, ("demo, T5-only arm" if arm else "demo") if folder == DEMO_MODEL_DIR else str(folder)


def _t5_only_arm(args):
    """--no-fuser without --model (or --transformer): the bundled demo's T5-only arm, its DiT's folder."""
    from .loading import DEMO_T5_ONLY_DIR

    if not args.no_fuser or args.model is not None or args.transformer is not None:
        return None
    folder = DEMO_T5_ONLY_DIR / "transformer"
    if not folder.is_dir():
        raise FileNotFoundError(f"--no-fuser without --model runs the bundled demo's T5-only arm, which is not "
                                f"installed ({folder} is missing); build it with `python -m mimir.demo.build`, or "
                                f"pass --model")
    return folder


def _check_speed_options(args) -> None:
    """Fail on a bad --attention or --step-cache before any model is loaded."""
    from .speed import StepCache, check_attention_backend

    check_attention_backend(args.attention)
    args.step_cache = None if args.step_cache is None else StepCache.parse(args.step_cache)


def _speed_options(args, pipe) -> None:
    from .speed import set_attention_backend

    set_attention_backend(pipe.transformer, args.attention)
    pipe.step_cache = args.step_cache


def _model_folder(args):
    from .loading import DEMO_MODEL_DIR

    return args.model or (DEMO_MODEL_DIR if DEMO_MODEL_DIR.is_dir() else None)


def _memory_options(args, pipe, device) -> None:
    from .memory import MemoryOptions, apply_memory_options

    apply_memory_options(pipe.transformer, MemoryOptions(args.fp8, args.blocks_to_swap, args.compile), device,
                         args.offload_device)


def _prompt_cache(args, prompts: list[str], dtype: str):
    """-> (cache, key identities, all prompts cached?) or None. Identities come from the model files, so a
    cached prompt needs neither T5 nor the LLM loaded."""
    from .fuser import read_fuser_config
    from .loading import pipeline_paths, text_sources
    from .prompt_cache import PromptCache, encoding_key_parts, files_identity

    folder = _model_folder(args)
    if args.prompt_cache is None or folder is None or args.no_fuser:
        return None
    root, fuser_path, llm_folder = pipeline_paths(folder, args.fuser, args.llm)
    if fuser_path is None:
        return None
    cache = PromptCache(args.prompt_cache or None)
    ids = tuple(files_identity(files, dtype) for files in text_sources(root, llm_folder))
    config = read_fuser_config(fuser_path)
    hit = all(cache.get(encoding_key_parts(p, *ids, config, args.seed)) is not None for p in prompts)
    return cache, ids, hit


def _encode(args, pipe, prompts: list[str], cached):
    """The text streams of `prompts`, through the prompt cache when one is used."""
    from .prompt_cache import encode_features_cached

    if cached is None:
        features = pipe.encode_features(prompts, seed=args.seed)
    else:
        cache, (t5_id, llm_id), _ = cached
        features = encode_features_cached(pipe, prompts, cache, seed=args.seed, t5_identity=t5_id, llm_identity=llm_id)
    return pipe.fuse(features)


def _defaults(args, pipe, demo: bool):
    """Unset sizes: the published variant's usual size, else (the demo, custom models) the training size."""
    from .variants import DEFAULT_VIDEO_SIZES, match_variant

    cfg, spatial = pipe.transformer.config, pipe.codec.spatial
    trained = (cfg.sample_frames, cfg.sample_height * spatial, cfg.sample_width * spatial)
    usual = DEFAULT_VIDEO_SIZES.get(match_variant(dict(cfg)), trained)
    args.frames, args.height, args.width = (given if given is not None else default for given, default in
                                            zip((args.frames, args.height, args.width), usual))
    if args.steps is None:
        args.steps = DEMO_STEPS if demo else 50


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from .loading import DEMO_MODEL_DIR
    from .sampler import check_video_size
    from .video import write_video

    _check_args(args)
    device, dtype = _resolve_device(args)
    start = time.perf_counter()
    _check_speed_options(args)
    demo = _model_folder(args) == DEMO_MODEL_DIR  # the bundled model or its T5-only arm: the demo's settings
    if args.guidance is None:
        args.guidance = DEMO_GUIDANCE if demo else 6.0
    guided = args.guidance > 1.0
    prompts = [args.negative_prompt, args.prompt] if guided else [args.prompt]
    cached = _prompt_cache(args, prompts, dtype)
    pipe, name = _load(args, device, dtype, cached=bool(cached and cached[2]))
    _defaults(args, pipe, demo)
    check_video_size(args.frames, args.height, args.width)
    streams = _encode(args, pipe, prompts, cached)
    cond, uncond = (streams[1:], streams[:1]) if guided else (streams, None)
    bar = tqdm(total=args.steps, desc="denoising", unit="step")
    latents = pipe.denoise(cond, uncond, args.frames, args.height, args.width, args.steps, args.guidance, args.seed,
                           args.dynamic_cfg, callback=lambda i, n, x: bar.update(1))
    bar.close()
    frames = pipe.decode(latents, tiling=args.tiling, slicing=args.slicing)
    write_video(frames[0], args.output, fps=args.fps)
    print(f"wrote {args.output} ({frames.shape[1]} frames, {args.width}x{args.height}, model: {name}, "
          f"{time.perf_counter() - start:.1f} s)")
    return 0


def cmd_inspect(args) -> int:
    from .describe import describe

    print(json.dumps(describe(args.path), indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="mimir", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    p = sub.add_parser("inspect", help="say what a checkpoint file or folder is")
    p.add_argument("path", type=Path)
    sub.add_parser("train", help="train a fuser + DiT (see `mimir train --help`)", add_help=False)
    sub.add_parser("cache", help="precompute VAE latents and text features (see `mimir cache --help`)", add_help=False)
    if argv[:1] in (["train"], ["cache"]):  # these parse their own options
        from . import train

        return (train.main_train if argv[0] == "train" else train.main_cache)(argv[1:])
    args = parser.parse_args(argv)
    try:
        return {"generate": cmd_generate, "inspect": cmd_inspect}[args.command](args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mimir {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
